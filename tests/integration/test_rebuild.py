"""Zero-downtime rebuild on the real stack (adr/0013): a shadow schema rebuilt from
offset 0 while the live projector keeps applying, resumable after SIGKILL, and an
atomic switch that a commit in flight waits for, that readers follow without a
restart, and that routers see as one ordinary newer version."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import threading
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import psycopg
import pytest

import topology_store.projector.rebuild as rebuild_module
from tests.conftest import AUTH
from tests.integration.processes import read_api, scalar, start, stop, wait_until
from tests.integration.routing import claim, release
from tests.integration.scenario import build
from tests.integration.test_projector import Member
from tests.integration.workload import build_workload
from topology_store.core.fold import PositionedEvent
from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.projector.archive import RawRecord
from topology_store.projector.rebuild import RETIRED_SCHEMA, RebuildError, RebuildResult, rebuild
from topology_store.projector.replay import LIVE_SCHEMA, compare, replay, verify
from topology_store.projector.sources import Cut, DecisionDecoder, decode_event
from topology_store.projector.store import CommitResult, PartitionAdvance, ProjectionStore
from topology_store.query_api.snapshot import SnapshotCache
from topology_store.router.client import Inconsistent, RoutingTable
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.models import (
    CellRegistered,
    ClaimBucket,
    ClaimRef,
    ClaimsCommitted,
    ClaimsDestroyed,
    Conflict,
    Event,
    LeaseCommitted,
    LeaseGranted,
    LeaseReleased,
    OwnerTransferred,
    OwnerType,
    RejectionReason,
    ReleaseCause,
    RequestRejected,
    SequenceRangeGranted,
)
from topology_store.schemas.router_sync import CELLS_QUERY, VERSION_HEADER

pytestmark = pytest.mark.integration

T = TypeVar("T")


class LiveLog:
    """The live projector's write path without a broker: batches committed through the
    real ``ProjectionStore``, each record archived as the consumer archives it, at
    consecutive offsets of its topic's partition 0. On an event loop of its own, so a
    commit can be left waiting on the switch's lock while the test goes on."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = EventCodec()
        self.next: dict[tuple[str, int], int] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._engine = create_engine(settings.sqlalchemy_url)
        self.store = ProjectionStore(self._engine, settings.claim_secret, self.codec)

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def commit_later(self, events: list[Event]) -> Any:
        """Start committing one batch; a future of its CommitResult."""
        positioned: list[PositionedEvent] = []
        archive: list[RawRecord] = []
        advances: dict[tuple[str, int], PartitionAdvance] = {}
        for event in events:
            tp = (self.settings.topic_for(event.EVENT_TYPE), 0)
            offset = self.next.get(tp, 0)
            self.next[tp] = offset + 1
            advances[tp] = PartitionAdvance(advances[tp].expected if tp in advances else offset, offset + 1)
            positioned.append(PositionedEvent(event, tp[0], 0, offset, event.occurred_at))
            archive.append(RawRecord(tp[0], 0, offset, event.partition_key.encode(),
                                     self.codec.encode(event.EVENT_TYPE, event.to_avro()), (),
                                     log_time=event.occurred_at))

        async def run() -> CommitResult:
            await self.store.stored_offsets(list(advances))
            return await self.store.commit_batch(positioned, [], advances, archive)

        return self._submit(run())

    def commit(self, events: list[Event]) -> CommitResult:
        return self.commit_later(events).result(60)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._submit(self._engine.dispose()).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def waiting_locks(settings: Settings, table: str) -> int:
    """How many sessions wait for a lock on ``table`` right now."""
    return cast(int, scalar(settings, "SELECT count(*) FROM pg_locks WHERE NOT granted "
                                      f"AND relation = '{table}'::regclass"))


def namespace_route(conn: psycopg.Connection[Any], path: str) -> str | None:
    row = conn.execute("SELECT cell_id FROM claims WHERE bucket = 'NAMESPACE' AND value = %s", (path,),
                       prepare=True).fetchone()
    return row[0] if row else None


async def test_the_switch_waits_for_a_commit_in_flight_and_readers_follow_without_a_restart(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = build(120)  # five cells, namespaces ns-N held by cell-(N % 4 + 1), some released
    live = LiveLog(settings)
    # Routes change live between the switch's namespace diff (taken before its locks)
    # and the locks: ns-1, wrong at the diff, is destroyed by the owner the wrong row
    # names, live and (following that recorded decision) in the shadow, so the switch
    # must not hand routers the route the diff found; ns-late is new on both sides.
    pre_diff = rebuild_module._pre_diff

    async def pre_diff_then_live_changes(*args: Any) -> Any:
        taken = await pre_diff(*args)
        assert taken.namespaces == {"ns-1": "cell-2", "ns-2": "cell-3"}
        await asyncio.wrap_future(live.commit_later([claim("ns-late"), release("ns-1", "cell-3", owner_id=1)]))
        return taken

    monkeypatch.setattr(rebuild_module, "_pre_diff", pre_diff_then_live_changes)
    engine = create_engine(settings.sqlalchemy_url)
    cache = SnapshotCache(engine, settings.libpq_url, poll_interval_s=60)
    try:
        for start_at in range(0, len(scenario.events), 20):  # many commits: the store's statements get prepared
            live.commit(scenario.events[start_at:start_at + 20])
        # A projection bug, as a rebuild is for: two live routes are wrong.
        with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
            conn.execute("UPDATE claims SET cell_id = 'cell-3' WHERE bucket = 'NAMESPACE' AND value = 'ns-1'")
            conn.execute("UPDATE claims SET cell_id = 'cell-1' WHERE bucket = 'NAMESPACE' AND value = 'ns-2'")
        before = await cache.refresh()
        assert before is not None and before.namespaces.get("ns-2") == "cell-1"
        reader = psycopg.connect(settings.libpq_url, autocommit=True)
        for _ in range(6):  # past psycopg's prepare threshold: a server-side prepared statement
            assert namespace_route(reader, "ns-2") == "cell-1"

        # A long read holds the live claims table: the switch gets partition_offsets,
        # topology_version and cells, then waits.
        blocker = psycopg.connect(settings.libpq_url)
        blocker.execute("LOCK TABLE public.claims IN ACCESS SHARE MODE")
        out = io.StringIO()
        rebuilding = asyncio.create_task(asyncio.to_thread(
            rebuild, settings, chunk_events=50, lock_timeout_s=30, out=out))
        await asyncio.to_thread(wait_until, lambda: waiting_locks(settings, "public.claims") == 1
                                or rebuilding.done(), 30, 0.02, "the switch to wait for the claims table")
        assert not rebuilding.done(), out.getvalue()
        # Meanwhile the projector commits a new namespace, and the read API refreshes.
        in_flight = live.commit_later([claim("ns-new")])
        refreshing = asyncio.create_task(cache.refresh())
        await asyncio.sleep(0.5)
        assert not in_flight.done() and not refreshing.done()  # both wait; neither failed
        assert waiting_locks(settings, "public.partition_offsets") == 1
        assert waiting_locks(settings, "public.topology_version") == 1
        blocker.rollback()
        result: RebuildResult = await rebuilding
        after = await refreshing
        committed: CommitResult = await asyncio.wrap_future(in_flight)
    finally:
        live.close()

    assert result.switched_version == before.version + 2  # one live commit came in between
    assert result.routing_changes == {"cells": 0, "namespaces": 1}
    assert "switched at version" in out.getvalue()
    # The refresh waited at its barrier and took its snapshot after the switch: the
    # fixed route, by one incremental step, not a reload.
    assert after is not None and after.version == result.switched_version
    assert after.namespaces.get("ns-2") == "cell-3" and cache.full_loads == 1
    assert after.namespaces.get("ns-late") == "cell-1" and after.namespaces.get("ns-1") is None
    # The commit that waited went on into the new tables, one version later.
    assert committed.version == result.switched_version + 1
    with psycopg.connect(settings.libpq_url) as conn:
        assert namespace_route(conn, "ns-new") == "cell-1"
        # The change log holds the switch as an ordinary version: exactly the difference.
        assert conn.execute("SELECT kind, key, value FROM routing_changes WHERE version = %s",
                            (result.switched_version,)).fetchall() == [("namespace", "ns-2", {"cell_id": "cell-3"})]
        retired = conn.execute("SELECT cell_id FROM topology_retired.claims WHERE value = 'ns-2'").fetchone()
        assert retired == ("cell-1",)
        assert conn.execute("SELECT to_regnamespace('topology_shadow')").fetchone() == (None,)
    # A statement prepared on the old table is re-planned by name onto the new one.
    assert namespace_route(reader, "ns-2") == "cell-3"
    reader.close()
    blocker.close()
    check = await asyncio.to_thread(verify, settings)
    assert check.equal, (check.missing, check.unexpected)
    await engine.dispose()


def shadow_checkpoint(settings: Settings) -> tuple[int, int]:
    """(events applied, chunks committed) of the rebuild in topology_shadow."""
    with psycopg.connect(settings.libpq_url) as conn:
        row = conn.execute("SELECT events_read, chunks FROM topology_shadow.rebuild_checkpoint").fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


def log_size(settings: Settings) -> int:
    """What a whole rebuild reads: cells records and decisions."""
    return cast(int, scalar(settings, "SELECT (SELECT count(*) FROM event_archive "
                                      f"WHERE topic = '{settings.cells_topic}') "
                                "+ (SELECT count(*) FROM topology_outbox)"))


def result_of(log_path: Path) -> dict[str, Any]:
    """The JSON result line a `topology rebuild` printed last."""
    lines = [line for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert lines, log_path.read_text()[-3000:]
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def test_a_rebuild_killed_midway_resumes_from_its_checkpoint_and_ends_identical(
    settings: Settings, tmp_path: Path
) -> None:
    work = build_workload(12_000, seed=5)
    live = LiveLog(settings)
    try:
        for n in range(0, len(work.events), 500):
            live.commit(work.events[n:n + 500])
    finally:
        live.close()
    total = log_size(settings)

    first_log = tmp_path / "rebuild-1.log"
    first = start(["rebuild", "--no-switch", "--chunk-events", "300"], settings, first_log)
    try:
        wait_until(lambda: "chunk 1 committed" in first_log.read_text() or first.poll() is not None, 60, 0.01,
                   "the first committed chunk")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    killed_at, chunks = shadow_checkpoint(settings)
    assert 0 < killed_at < total and chunks >= 1, (killed_at, total, first_log.read_text()[-2000:])

    second_log = tmp_path / "rebuild-2.log"
    assert start(["rebuild", "--no-switch", "--chunk-events", "300"], settings, second_log).wait(120) == 0, \
        second_log.read_text()[-3000:]
    resumed = result_of(second_log)
    # It went on from the last committed chunk: nothing read twice, nothing skipped.
    assert f"resuming topology_shadow from its checkpoint: {killed_at:,} events already applied" in \
        second_log.read_text()
    assert resumed["resumed"] and resumed["events_at_start"] == killed_at
    assert resumed["events_this_run"] == total - killed_at and resumed["events_total"] == total
    replay(settings, "clean_replay", Cut(), "archive", True)
    assert compare(settings, "clean_replay", "topology_shadow").equal
    assert compare(settings, LIVE_SCHEMA, "topology_shadow").equal

    # Resuming once more, now with the switch: nothing left to apply but the switch itself.
    third_log = tmp_path / "rebuild-3.log"
    assert start(["rebuild", "--chunk-events", "300"], settings, third_log).wait(120) == 0, \
        third_log.read_text()[-3000:]
    switched = result_of(third_log)
    assert switched["resumed"] and switched["events_this_run"] == 0 and switched["switched_version"] is not None
    assert switched["routing_changes"] == {"cells": 0, "namespaces": 0}
    check = verify(settings)
    assert check.equal, (check.missing, check.unexpected)


class Follower(threading.Thread):
    """A router following the read API by long-poll + deltas (adr/0009): it keeps its
    table with the router client's ``RoutingTable`` (which checks every delta's count
    and digest) and records every version it is shown and every problem."""

    def __init__(self, api: str) -> None:
        super().__init__(daemon=True)
        self.api = api
        self.halt = threading.Event()
        self.table: RoutingTable | None = None
        self.versions: list[int] = []  # X-Topology-Version of every answer, in order
        self.problems: list[str] = []
        self.deltas = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.api, headers=AUTH, timeout=10) as client:
            while not self.halt.is_set():
                try:
                    if self.table is None:
                        answer = client.get("/v1/snapshot")
                    else:
                        answer = client.get("/v1/snapshot", params={"since": self.table.version, "wait": "1s"})
                except httpx.HTTPError as exc:
                    self.problems.append(f"request failed: {exc!r}")
                    continue
                if VERSION_HEADER in answer.headers:
                    self.versions.append(int(answer.headers[VERSION_HEADER]))
                if answer.status_code == 304:
                    continue
                if answer.status_code != 200:
                    self.problems.append(f"HTTP {answer.status_code}: {answer.text[:300]}")
                    continue
                try:
                    if self.table is None:
                        self.table = RoutingTable.from_document(answer.json())
                    else:
                        self.table.apply(answer.json())
                        self.deltas += 1
                except Inconsistent as exc:
                    self.problems.append(f"inconsistent: {exc}")
                    self.table = None


async def publish(settings: Settings, events: list[Event]) -> None:
    async with EventPublisher(settings) as publisher:
        async for outcome in publisher.publish_many(events):
            assert not isinstance(outcome, PublishFailed), outcome


def consumed(settings: Settings) -> int:
    return cast(int, scalar(settings, "SELECT coalesce(sum(next_offset), 0) FROM partition_offsets"))


def live_routes(settings: Settings) -> tuple[int, dict[str, str], dict[str, dict[str, Any]]]:
    with psycopg.connect(settings.libpq_url) as conn:
        version = conn.execute("SELECT version FROM topology_version").fetchone()
        namespaces: dict[str, str] = dict(conn.execute("SELECT value, cell_id FROM claims WHERE bucket = 'NAMESPACE' "
                                       "AND status = 'COMMITTED'").fetchall())
        cursor = conn.execute(CELLS_QUERY)  # each cell's document as routers see it
        names = [column.name for column in cursor.description or ()]
        cells = {row[0]: dict(zip(names, row, strict=True)) for row in cursor}
    assert version is not None
    return int(version[0]), namespaces, cells


async def test_rebuild_and_switch_while_events_flow_keeps_routers_and_the_projector_going(
    topics: Settings, tmp_path: Path
) -> None:
    settings = topics
    work = build_workload(14_000, seed=23)
    before, during, after = work.events[:6_000], work.events[6_000:12_000], work.events[12_000:]
    projector = start(["project"], settings, tmp_path / "projector.log")
    try:
        await publish(settings, before)
        await asyncio.to_thread(wait_until, lambda: consumed(settings) == len(before), 90, 0.1, "the first events")
        # A projection bug for the rebuild to fix: one live route points at the wrong cell.
        with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
            path, cell_id = conn.execute(  # type: ignore[misc]
                "SELECT value, cell_id FROM claims WHERE bucket = 'NAMESPACE' AND status = 'COMMITTED' "
                "ORDER BY value LIMIT 1").fetchone()
            wrong = "cell-1" if cell_id != "cell-1" else "cell-2"
            conn.execute("UPDATE claims SET cell_id = %s WHERE bucket = 'NAMESPACE' AND value = %s", (wrong, path))

        with read_api(settings, tmp_path / "api.log") as api:
            follower = Follower(api)
            follower.start()
            await asyncio.to_thread(wait_until, lambda: follower.table is not None, 30, 0.05, "the first snapshot")
            assert follower.table is not None and follower.table.namespaces[path] == wrong

            rebuild_log = tmp_path / "rebuild.log"
            rebuilding = start(["rebuild", "--chunk-events", "1000", "--max-tail", "2000"], settings, rebuild_log)
            for n in range(0, len(during), 1_000):  # events keep flowing while it builds, catches up, switches
                await publish(settings, during[n:n + 1_000])
                await asyncio.sleep(0.2)
            assert await asyncio.to_thread(rebuilding.wait, 120) == 0, rebuild_log.read_text()[-3000:]
            switched = result_of(rebuild_log)
            # The live projector keeps applying after the switch, into the new tables.
            await publish(settings, after)
            await asyncio.to_thread(wait_until, lambda: consumed(settings) == len(work.events), 90, 0.1,
                                    "every event applied")
            version, namespaces, cells = live_routes(settings)
            await asyncio.to_thread(wait_until, lambda: follower.table is not None
                                    and follower.table.version == version, 30, 0.05, "the follower to catch up")
            follower.halt.set()
            await asyncio.to_thread(follower.join, 15)
            full = httpx.get(f"{api}/v1/snapshot", headers=AUTH, timeout=10).json()
        assert stop(projector) == 0, (tmp_path / "projector.log").read_text()[-3000:]
    finally:
        stop(projector)

    assert switched["switched_version"] is not None and switched["routing_changes"]["namespaces"] >= 1
    # It caught up with events that arrived while it was building, before it switched.
    at_start = re.search(r"building topology_shadow from the archive: about ([\d,]+) events", rebuild_log.read_text())
    assert at_start is not None and switched["events_total"] > int(at_start[1].replace(",", ""))
    assert version > switched["switched_version"]  # versions moved on after the switch
    with psycopg.connect(settings.libpq_url) as conn:
        after_switch = conn.execute(
            "SELECT count(*) FROM processed_events WHERE version > %s", (switched["switched_version"],)).fetchone()
    assert after_switch is not None and after_switch[0] > 0
    # The router never failed a request, never saw a version go back, never met a
    # delta that did not check out, and ends with what the tables hold.
    assert follower.problems == []
    assert follower.versions == sorted(follower.versions) and switched["switched_version"] in range(
        follower.versions[0], follower.versions[-1] + 1)
    assert follower.deltas > 0 and follower.table is not None
    assert follower.table.namespaces == namespaces == full["namespaces"]
    assert follower.table.cells == cells
    assert namespaces[path] == cell_id  # the wrong route was fixed, and routers got the fix as a delta
    # The result equals a clean replay of the whole log; the old tables are kept aside.
    check = verify(settings)
    assert check.equal, (check.missing, check.unexpected)
    with psycopg.connect(settings.libpq_url) as conn:
        assert conn.execute(f"SELECT cell_id FROM {RETIRED_SCHEMA}.claims WHERE value = %s", (path,)).fetchone() \
            == (wrong,)
    dropped = start(["rebuild", "--drop-retired"], settings, tmp_path / "drop.log")
    assert dropped.wait(60) == 0 and result_of(tmp_path / "drop.log") == {"retired_schema": RETIRED_SCHEMA,
                                                                           "dropped": True}
    assert scalar(settings, f"SELECT to_regnamespace('{RETIRED_SCHEMA}')") is None


async def test_kafka_source_switches_only_once_the_relay_published_every_decision(
    topics: Settings, tmp_path: Path
) -> None:
    settings = topics
    work = build_workload(3_000, seed=31)
    more = build_workload(400, seed=32).events[24:]  # claims and requests only: its cells are the same cells

    def start_relay(name: str) -> Any:
        return start(["relay", "--source", settings.libpq_url], settings, tmp_path / name,
                     TOPOLOGY_RELAY_METRICS_PORT="0", TOPOLOGY_RELAY_POLL_INTERVAL_S="0.2")

    def unpublished() -> int:
        return cast(int, scalar(settings, "SELECT count(*) FROM topology_outbox WHERE published_at IS NULL"))

    relay = start_relay("relay-1.log")
    try:
        async with Member(settings):
            await publish(settings, work.events)
            await asyncio.to_thread(wait_until, lambda: consumed(settings) == len(work.events) and unpublished() == 0,
                                    90, 0.1, "the log applied and published")
            stop(relay)
            built = await asyncio.to_thread(rebuild, settings, source="kafka", switch=False, chunk_events=500,
                                            out=io.StringIO())
            assert built.chunks > 1 and not built.resumed
            assert (await asyncio.to_thread(compare, settings, LIVE_SCHEMA, "topology_shadow")).equal
            # The same source stops at an offsets cut: nothing after it is read, nor counted.
            cut = Cut(until_offsets={(settings.cells_topic, 0): 3, (settings.claim_decisions_topic, 0): 10})
            await asyncio.to_thread(replay, settings, "kafka_cut", cut, "kafka", True, io.StringIO())
            assert scalar(settings, "SELECT concat_ws(' ', cells_next_offset, decisions_position, events_read) "
                                    "FROM kafka_cut.rebuild_checkpoint") == "3 10 13"
            # More decisions now, but no relay to put them on the decision topic.
            await publish(settings, more)
            await asyncio.to_thread(wait_until, lambda: consumed(settings) == len(work.events) + len(more), 90, 0.1,
                                    "the later events applied")
        version = cast(int, scalar(settings, "SELECT version FROM topology_version"))
        with pytest.raises(RebuildError, match="not on .* yet: is `topology relay` running"):
            await asyncio.to_thread(rebuild, settings, source="kafka", tail_timeout_s=1.0, out=io.StringIO())
        # Refused as a whole: nothing moved, the shadow is kept for the next run.
        assert scalar(settings, "SELECT version FROM topology_version") == version
        assert scalar(settings, f"SELECT to_regnamespace('{RETIRED_SCHEMA}')") is None
        relay = start_relay("relay-2.log")
        await asyncio.to_thread(wait_until, lambda: unpublished() == 0, 60, 0.1, "the relay to catch up")
        out = io.StringIO()
        switched = await asyncio.to_thread(rebuild, settings, source="kafka", out=out)
    finally:
        stop(relay)
    assert switched.resumed and switched.switched_version == version + 1, out.getvalue()
    check = await asyncio.to_thread(verify, settings)
    assert check.equal, (check.missing, check.unexpected)


async def test_the_archive_source_refuses_decisions_the_relay_deleted_and_names_the_setting_and_kafka(
    topics: Settings, tmp_path: Path
) -> None:
    """A decision relay run with TOPOLOGY_RELAY_DELETE_PUBLISHED empties the outbox the
    archive source reads decisions from. Before, the rebuild read no decision, its coverage
    check counted the same missing rows, and the switch dropped every claim and route."""
    settings = topics
    work = build_workload(1_500, seed=33)
    relay = start(["relay", "--source", settings.libpq_url], settings, tmp_path / "relay.log",
                  TOPOLOGY_RELAY_METRICS_PORT="0", TOPOLOGY_RELAY_POLL_INTERVAL_S="0.2",
                  TOPOLOGY_RELAY_DELETE_PUBLISHED="true")
    try:
        async with Member(settings):
            await publish(settings, work.events)
            await asyncio.to_thread(
                wait_until, lambda: consumed(settings) == len(work.events)
                and scalar(settings, "SELECT count(*) FROM topology_outbox") == 0, 90, 0.1,
                "the log applied and every decision published and deleted")
    finally:
        stop(relay)
    version, namespaces, cells = live_routes(settings)
    claims = scalar(settings, "SELECT count(*) FROM claims")
    decided = scalar(settings, "SELECT sum(jsonb_array_length(detail)) FROM processed_events")
    assert namespaces and claims and decided
    refusal = rf"recorded {decided:,} decisions \(processed_events.detail\) but topology_outbox holds 0 \(event_id " \
              r".* is gone\).*TOPOLOGY_RELAY_DELETE_PUBLISHED.*--source kafka"
    with pytest.raises(RebuildError, match=refusal):
        await asyncio.to_thread(rebuild, settings, source="archive", out=io.StringIO())
    # Nothing switched; replay and verify, which read the same source, refuse alike.
    assert live_routes(settings) == (version, namespaces, cells)
    assert scalar(settings, "SELECT count(*) FROM claims") == claims
    assert scalar(settings, f"SELECT to_regnamespace('{RETIRED_SCHEMA}')") is None
    with pytest.raises(RebuildError, match="TOPOLOGY_RELAY_DELETE_PUBLISHED"):
        await asyncio.to_thread(verify, settings)
    # The alternative it names: the decision topic kept every decision the relay published.
    out = io.StringIO()
    switched = await asyncio.to_thread(rebuild, settings, source="kafka", restart=True, out=out)
    assert switched.switched_version == version + 1, out.getvalue()
    assert switched.routing_changes == {"cells": 0, "namespaces": 0}
    assert live_routes(settings)[1:] == (namespaces, cells)
    assert scalar(settings, "SELECT count(*) FROM claims") == claims


def test_recorded_decisions_decode_without_validation_into_the_models_validation_builds() -> None:
    request, lease = uuid.uuid4(), uuid.uuid4()
    at = datetime(2026, 11, 23, 17, 0, 0, 123000, tzinfo=UTC)
    refs = (ClaimRef(bucket=ClaimBucket.USERNAME, value="Ada"),
            ClaimRef(bucket=ClaimBucket.EMAIL, value="ada@example.com"))
    owner: dict[str, Any] = {"cell_id": "cell-1", "owner_type": OwnerType.USER, "owner_id": 42}
    decisions: list[Event] = [
        LeaseGranted(source="decider", request_id=request, lease_id=lease, claims=refs, expires_at=at, **owner),
        LeaseCommitted(source="decider", request_id=request, lease_id=lease, claims=refs, trace_id="t" * 32, **owner),
        LeaseReleased(source="decider", request_id=None, lease_id=lease, claims=refs, cause=ReleaseCause.EXPIRED,
                      **owner),
        ClaimsCommitted(source="decider", request_id=request, claims=refs[:1], occurred_at=at, **owner),
        ClaimsDestroyed(source="decider", request_id=request, claims=refs, **owner),
        OwnerTransferred(source="decider", request_id=request, owner_type=OwnerType.GROUP, owner_id=7,
                         from_cell_id="cell-1", to_cell_id="cell-2", to_owner_id=8, claims=refs),
        SequenceRangeGranted(source="decider", request_id=request, cell_id="cell-3", sequence_name="projects.id",
                             start=1, end=2**40),
        RequestRejected(source="decider", request_id=request, request_type="ClaimsRequested",
                        reason=RejectionReason.CONFLICT, message="held", conflicts=(
                            Conflict(bucket=ClaimBucket.NAMESPACE, value="gitlab-org", cell_id="cell-2"),)),
        RequestRejected(source="decider", request_id=request, request_type="LeaseCommitRequested",
                        reason=RejectionReason.UNKNOWN_LEASE, message="no such lease"),
    ]
    codec = EventCodec()
    fast = DecisionDecoder(codec, check_every=1)  # every one also compared with parse_event inside
    for decision in decisions:
        encoded = codec.encode(decision.EVENT_TYPE, decision.to_avro())
        built = fast.decode(encoded)
        assert built == decision == decode_event(codec, encoded)
        assert type(built) is type(decision) and built.model_dump() == decision.model_dump()
    # Not a decision, or not readable: the validating path answers, as decode_event does.
    cell = CellRegistered(source="ops", cell_id="cell-1", address="https://c1.example.com", session_prefix="c1",
                          region="eu")
    assert fast.decode(codec.encode(cell.EVENT_TYPE, cell.to_avro())) == cell
    assert fast.decode(b"not avro at all") is None
    assert fast.decode(codec.encode(decisions[0].EVENT_TYPE, decisions[0].to_avro()) + b"\x00") is None
