"""``topology schemas check``: the repository's schemas pass (this is how CI runs the
check), and each kind of breaking change, made to a copy of them, fails it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from topology_store.cli.main import main
from topology_store.schemas.compatibility import _Names, check, resolution_problems
from topology_store.schemas.registry import SCHEMA_DIR


def test_the_repository_schemas_are_compatible_and_locked() -> None:
    report = check()
    assert report.problems == []
    assert sum(len(family) for family in report.versions.values()) >= 22
    assert [v.number for v in report.versions["ClaimCreated"]] == [1, 2, 3]


def test_the_cli_check_exits_zero_on_the_repository(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schemas", "check"]) == 0
    assert "every pair readable both ways" in capsys.readouterr().out


@pytest.fixture
def schemas(tmp_path: Path) -> Path:
    """A copy of schemas/ (current files, history, lock) to break."""
    target = tmp_path / "schemas"
    target.mkdir()
    for path in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(path, target)
    shutil.copytree(SCHEMA_DIR / "history", target / "history")
    shutil.copy(SCHEMA_DIR / "fingerprints.json", target)
    return target


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def write(path: Path, raw: dict[str, Any]) -> None:
    path.write_text(json.dumps(raw, indent=2), encoding="utf-8")


def new_version(schemas: Path, event_type: str) -> dict[str, Any]:
    """The documented way to change a schema: keep the old one in history/ first."""
    existing = sorted((schemas / "history").glob(f"{event_type}.v*.avsc"))
    shutil.copy(schemas / f"{event_type}.avsc", schemas / "history" / f"{event_type}.v{len(existing) + 1}.avsc")
    return read(schemas / f"{event_type}.avsc")


def messages(report_problems: list[Any]) -> str:
    return "\n".join(map(str, report_problems))


def test_a_doc_only_edit_in_place_passes(schemas: Path) -> None:
    raw = read(schemas / "CellRegistered.avsc")
    raw["doc"] = "Reworded documentation."
    write(schemas / "CellRegistered.avsc", raw)
    assert check(schemas).problems == []


def test_an_edit_in_place_fails_even_when_avro_would_resolve_it(schemas: Path) -> None:
    raw = read(schemas / "CellRegistered.avsc")
    raw["fields"].append({"name": "zone", "type": ["null", "string"], "default": None})
    write(schemas / "CellRegistered.avsc", raw)
    report = check(schemas, update_lock=True)
    text = messages(report.problems)
    assert "CellRegistered v2 (CellRegistered.avsc" in text and "is gone" in text
    # --update-lock never papers over a lost version.
    assert read(schemas / "fingerprints.json") == read(SCHEMA_DIR / "fingerprints.json")


def test_a_logical_type_edited_in_place_fails_although_the_fingerprint_is_the_same(schemas: Path) -> None:
    raw = read(schemas / "CellUpdated.avsc")
    occurred = next(f for f in raw["fields"] if f["name"] == "occurred_at")
    occurred["type"]["logicalType"] = "timestamp-micros"
    write(schemas / "CellUpdated.avsc", raw)
    assert "CellUpdated v1" in messages(check(schemas).problems)


def test_a_properly_versioned_compatible_change_needs_only_the_lock_update(schemas: Path) -> None:
    raw = new_version(schemas, "ClaimCreated")
    raw["fields"].append({"name": "note", "type": ["null", "string"], "default": None})
    write(schemas / "ClaimCreated.avsc", raw)
    pending = check(schemas)
    assert [str(p) for p in pending.problems if p.kind != "lock"] == []
    assert "ClaimCreated v4 (ClaimCreated.avsc) is not in the lock" in messages(pending.problems)
    assert "ClaimCreated v3 moved to history/ClaimCreated.v3.avsc" in messages(pending.problems)
    recorded = check(schemas, update_lock=True)
    assert recorded.ok and recorded.lock_updated
    assert [e["file"] for e in read(schemas / "fingerprints.json")["event_types"]["ClaimCreated"]] == [
        "history/ClaimCreated.v1.avsc", "history/ClaimCreated.v2.avsc", "history/ClaimCreated.v3.avsc",
        "ClaimCreated.avsc"]
    assert check(schemas).ok


def test_a_new_field_without_default_breaks_backward_compatibility(schemas: Path) -> None:
    raw = new_version(schemas, "CellStateChanged")
    raw["fields"].append({"name": "ticket", "type": "string"})
    write(schemas / "CellStateChanged.avsc", raw)
    text = messages(check(schemas).problems)
    assert "backward: CellStateChanged v1 data read with CellStateChanged v2: ticket: the reader's field has no " \
           "default" in text


def test_removing_a_field_the_old_reader_needs_breaks_forward_compatibility(schemas: Path) -> None:
    raw = new_version(schemas, "CellRegistered")
    raw["fields"] = [f for f in raw["fields"] if f["name"] != "region"]
    write(schemas / "CellRegistered.avsc", raw)
    text = messages(check(schemas).problems)
    assert "forward: CellRegistered v3 data read with CellRegistered v1: region: the reader's field has no default" \
           in text
    assert "backward" not in text  # dropping a field is fine for the newer reader


def test_widening_a_type_breaks_forward_compatibility(schemas: Path) -> None:
    raw = new_version(schemas, "CellUpdated")
    weight = next(f for f in raw["fields"] if f["name"] == "weight")
    weight["type"] = ["null", "long"]  # was ["null", "int"]: old data reads, new data does not
    write(schemas / "CellUpdated.avsc", raw)
    text = messages(check(schemas).problems)
    assert "forward: CellUpdated v3 data read with CellUpdated v1: weight: a long value matches no branch" in text
    assert "backward" not in text


def test_an_enum_symbol_unknown_to_an_old_reader_needs_its_default(schemas: Path) -> None:
    raw = new_version(schemas, "CellStateChanged")
    state = next(f for f in raw["fields"] if f["name"] == "state")["type"]
    del state["default"]
    state["symbols"].append("FROZEN")
    write(schemas / "CellStateChanged.avsc", raw)
    text = messages(check(schemas).problems)
    # The old reader has UNKNOWN as its default, so FROZEN resolves there...
    assert "forward" not in text
    # ...but the new reader lost its default: a symbol it does not know would break it,
    # which no old writer produces, so Avro's rule holds and only the lock complains.
    assert "compatibility" not in text


def test_deleting_an_event_type_fails(schemas: Path) -> None:
    (schemas / "SequenceRangeRequested.avsc").unlink()
    assert "SequenceRangeRequested v1 (SequenceRangeRequested.avsc" in messages(check(schemas).problems)


def test_the_cli_fails_on_a_broken_copy(schemas: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = new_version(schemas, "CellStateChanged")
    raw["fields"].append({"name": "ticket", "type": "string"})
    write(schemas / "CellStateChanged.avsc", raw)
    assert main(["schemas", "check", "--dir", str(schemas)]) == 1
    assert "compatibility: backward: CellStateChanged v1" in capsys.readouterr().err


# --- the resolution rules on small schemas -----------------------------------------------------


def resolve(raw: Any) -> Any:
    return _Names().resolve(raw)


def record(*fields: dict[str, Any], name: str = "R") -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields)}


@pytest.mark.parametrize(
    ("writer", "reader", "readable"),
    [
        ("int", "long", True),
        ("long", "int", False),
        ("int", "double", True),
        ("float", "double", True),
        ("double", "float", False),
        ("string", "bytes", True),
        ("bytes", "string", True),
        ("string", "int", False),
        ("null", ["null", "string"], True),
        (["null", "string"], "string", False),  # a null written cannot be read as a string
        (["null", "int"], ["null", "long"], True),
        ({"type": "long", "logicalType": "timestamp-millis"}, {"type": "long", "logicalType": "timestamp-micros"}, False),
        ({"type": "fixed", "name": "F", "size": 4}, {"type": "fixed", "name": "F", "size": 8}, False),
        ({"type": "array", "items": "int"}, {"type": "array", "items": "long"}, True),
        ({"type": "map", "values": "long"}, {"type": "map", "values": "int"}, False),
    ],
)
def test_primitive_promotions_unions_and_containers(writer: Any, reader: Any, readable: bool) -> None:
    assert (resolution_problems(resolve(writer), resolve(reader)) == []) is readable


def test_records_match_by_name_or_alias_and_fields_by_name_or_alias() -> None:
    old = record({"name": "a", "type": "int"})
    renamed = record({"name": "b", "type": "int", "aliases": ["a"]}, name="S")
    assert resolution_problems(resolve(old), resolve(renamed)) != []  # another record name, no alias
    renamed["aliases"] = ["R"]
    assert resolution_problems(resolve(old), resolve(renamed)) == []


def test_enum_symbols_need_a_reader_default_when_unknown() -> None:
    writer = {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]}
    reader = {"type": "enum", "name": "E", "symbols": ["A", "B"]}
    assert "symbols ['C'] unknown to the reader" in resolution_problems(resolve(writer), resolve(reader))[0]
    assert resolution_problems(resolve(writer), resolve({**reader, "default": "A"})) == []
