"""Encoded samples of every schema version ever shipped (tests/fixtures/events) decode
with today's reader schemas into the events their writers meant; decisions fold
through the replay path. (tests/integration/test_schema_fixtures.py runs the
consumed ones through the projector on a real broker and database.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.make_event_fixtures import FIXTURE_DIR, fixture_paths
from topology_store.core.fold import replayed as fold
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.compatibility import load_versions
from topology_store.schemas.models import DECISION_EVENT_TYPES, Event, parse_event

VERSIONS = [version for family in load_versions()[0].values() for version in family]


def fixtures() -> list[tuple[str, int, Path, Path]]:
    return [(v.event_type, v.number, *fixture_paths(v.event_type, v.number)) for v in VERSIONS]


def test_every_schema_version_has_a_fixture() -> None:
    missing = [f"{t}.v{n}" for t, n, binary, sidecar in fixtures() if not (binary.exists() and sidecar.exists())]
    assert missing == [], "run `python -m tests.fixtures.make_event_fixtures` and commit its output"
    expected = {p.name for _, _, binary, sidecar in fixtures() for p in (binary, sidecar)}
    assert {p.name for p in FIXTURE_DIR.iterdir()} == expected  # no fixture of a version that does not exist


def decoded(binary: Path) -> Event:
    event = EventCodec().decode(binary.read_bytes())
    return parse_event(event.payload, event.event_type)


@pytest.mark.parametrize(("event_type", "number", "binary", "sidecar"), fixtures(),
                         ids=[f"{t}.v{n}" for t, n, _, _ in fixtures()])
def test_the_current_reader_reads_every_version_as_written(event_type: str, number: int, binary: Path,
                                                           sidecar: Path) -> None:
    written: dict[str, Any] = json.loads(sidecar.read_text(encoding="utf-8"))
    version = next(v for v in VERSIONS if (v.event_type, v.number) == (event_type, number))
    assert binary.read_bytes()[2:10].hex() == version.fingerprint  # bytes of that very version
    event = decoded(binary)
    assert event.EVENT_TYPE == event_type
    now = event.model_dump(mode="json")
    # Every field the writer wrote arrives unchanged (compared after the same model
    # read both, so that only values, not JSON spellings of times, are compared)...
    as_written = parse_event(written, event_type).model_dump(mode="json")
    assert {name: now[name] for name in written} == {name: as_written[name] for name in written}
    # ...and fields it did not have take their defaults.
    defaults = {name: now[name] for name in now if name not in written}
    assert defaults == {name: as_written[name] for name in defaults}


def test_every_decision_version_folds_through_the_replay_path() -> None:
    decisions = [decoded(binary) for t, _, binary, _ in fixtures() if t in DECISION_EVENT_TYPES]
    assert {d.EVENT_TYPE for d in decisions} == DECISION_EVENT_TYPES
    order = ["LeaseGranted", "LeaseCommitted", "ClaimsCommitted", "ClaimsDestroyed", "OwnerTransferred",
             "LeaseReleased", "SequenceRangeGranted", "RequestRejected"]
    projection = fold([], sorted(decisions, key=lambda d: order.index(d.EVENT_TYPE)))
    held = projection.registry.claims[("USERNAME", "fixture-user")]
    assert (held.cell_id, held.status.value) == ("cell-fy", "COMMITTED")  # granted, committed, transferred
    assert ("NAMESPACE", "fixture-group-2") not in projection.registry.claims  # committed, then destroyed
    assert projection.registry.sequences == {"fixture.ids": 1001}
