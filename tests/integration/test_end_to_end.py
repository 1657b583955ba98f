"""Walking skeleton, end to end on real servers: events through the broker, the
projector process, PostgreSQL and the read API over HTTP; SIGKILL of the projector
mid-stream loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import AUTH, settings_env
from tests.integration import scenario as scenarios
from tests.integration.processes import read_api, scalar, start, stop, wait_until
from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.projector.consumer import Projector
from topology_store.projector.store import ProjectionStore
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import Event

pytestmark = pytest.mark.integration


async def publish(settings: Settings, events: list[Event]) -> None:
    async with EventPublisher(settings) as publisher:
        async for outcome in publisher.publish_many(events):
            assert not isinstance(outcome, PublishFailed), outcome


def emit_with_cli(settings: Settings, events: list[Event], path: Path) -> None:
    path.write_text("".join(json.dumps({"type": e.EVENT_TYPE, **e.model_dump(mode="json")}) + "\n" for e in events))
    done = subprocess.run([sys.executable, "-m", "topology_store.cli", "emit", "-f", str(path)], env=settings_env(settings),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == len(events)


def table_rows(settings: Settings) -> dict[str, list[tuple[object, ...]]]:
    """The projection's content, without the version column (batching decides versions)."""
    with psycopg.connect(settings.libpq_url) as conn:
        return {
            "cells": conn.execute(
                "SELECT cell_id, address, session_prefix, region, weight, state, state_reason, number FROM cells "
                "ORDER BY 1"
            ).fetchall(),
            "claims": conn.execute(
                "SELECT bucket, value, cell_id, owner_type, owner_id, claimed_at FROM claims ORDER BY 1, 2"
            ).fetchall(),
            "decisions": conn.execute(
                'SELECT event_id, topic, partition, "offset", outcome, reason FROM processed_events ORDER BY 1'
            ).fetchall(),
        }


@pytest.mark.both_brokers
def test_events_flow_to_the_snapshot_and_survive_sigkill_of_the_projector(
    topics: Settings, tmp_path: Path, new_database: Callable[[], str]
) -> None:
    settings = topics.model_copy(update={"batch_max_events": 40})
    scenario = scenarios.build(namespaces=2500)
    first, second = scenario.events[:2000], scenario.events[2000:]
    emit_with_cli(settings, first, tmp_path / "first.jsonl")

    projector = start(["project"], settings, tmp_path / "projector-1.log")
    processed = lambda: int(scalar(settings, "SELECT count(*) FROM processed_events"))  # noqa: E731
    try:
        at_kill = wait_until(lambda: (n := processed()) >= 300 and n, timeout_s=60, interval_s=0.01,
                             what="projector to make progress")
    finally:
        projector.send_signal(signal.SIGKILL)
        projector.wait(10)
    assert at_kill < scenario.distinct_events, "the kill must land mid-stream"

    asyncio.run(publish(settings, second))  # events keep arriving while the projector is down
    restarted = start(["project"], settings, tmp_path / "projector-2.log")
    try:
        wait_until(lambda: processed() == scenario.distinct_events, timeout_s=120, what="all events processed")
        with read_api(settings, tmp_path / "api.log") as url:
            version = int(scalar(settings, "SELECT version FROM topology_version"))
            wait_until(lambda: httpx.get(f"{url}/v1/snapshot", headers=AUTH).headers["X-Topology-Version"] == str(version),
                       timeout_s=15, what="snapshot at the stored version")
            response = httpx.get(f"{url}/v1/snapshot", headers=AUTH)
            not_modified = httpx.get(f"{url}/v1/snapshot", headers={**AUTH, "If-None-Match": f'"{version}"'})
    finally:
        assert stop(restarted) == 0, (tmp_path / "projector-2.log").read_text()[-3000:]

    snapshot = response.json()
    assert response.status_code == 200 and snapshot["version"] == version
    assert snapshot["namespaces"] == scenario.namespaces
    assert {c["cell_id"]: c for c in snapshot["cells"]} == scenario.cells
    assert not_modified.status_code == 304 and not_modified.content == b""

    # Exactly once: one decision per distinct event, and the decisions are the scenario's.
    with psycopg.connect(settings.libpq_url) as conn:
        outcomes = dict(conn.execute("SELECT outcome, count(*) FROM processed_events GROUP BY 1").fetchall())
        offsets = conn.execute("SELECT sum(next_offset) FROM partition_offsets").fetchone()
    assert outcomes == {"applied": scenario.applied, "rejected": scenario.rejected}
    assert offsets is not None and offsets[0] == len(scenario.events)  # every record read, none skipped

    # The same log replayed from scratch into an empty database gives the same tables.
    replay = settings.model_copy(update={"database_url": new_database(), "consumer_group": settings.consumer_group + "-replay",
                                         "batch_max_events": 997})
    asyncio.run(_project_until(replay, scenario.distinct_events))
    assert table_rows(replay) == table_rows(settings)


async def _project_until(settings: Settings, distinct_events: int) -> None:
    engine = create_engine(settings.sqlalchemy_url)
    stop_event = asyncio.Event()
    projector = Projector(settings, ProjectionStore(engine, settings.claim_secret))
    task = asyncio.create_task(projector.run(stop_event))
    try:
        for _ in range(1200):
            if task.done():
                task.result()
            count = int(scalar(settings, "SELECT count(*) FROM processed_events"))
            if count == distinct_events:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("replay did not finish")
    finally:
        stop_event.set()
        await task
        await engine.dispose()
