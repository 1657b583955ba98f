"""The PostgreSQL adapter on a real database: one transaction per batch, fencing,
idempotency by event_id, set-based writes, version and NOTIFY."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.core.fold import PositionedEvent
from topology_store.projector import store as store_module
from topology_store.projector.archive import RawRecord
from topology_store.projector.store import DeadLetter, FencedError, PartitionAdvance, ProjectionStore
from topology_store.runtime.database import VERSION_CHANNEL as NOTIFY_CHANNEL
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import (
    CellRegistered,
    ClaimBucket,
    ClaimCreated,
    ClaimReleased,
    OwnerType,
    SequenceRangeRequested,
)

pytestmark = pytest.mark.integration

TOPIC = "claims"


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.sqlalchemy_url)
    yield engine
    await engine.dispose()


def claim(value: str, cell: str = "cell-1", owner: int = 1) -> ClaimCreated:
    return ClaimCreated(
        source=cell, bucket=ClaimBucket.NAMESPACE, value=value, cell_id=cell, owner_type=OwnerType.GROUP, owner_id=owner
    )


def at(event: object, offset: int, partition: int = 0, topic: str = TOPIC) -> PositionedEvent:
    return PositionedEvent(event=event, topic=topic, partition=partition, offset=offset)  # type: ignore[arg-type]


async def rows(engine: AsyncEngine, query: str) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(text(query))]


async def test_a_batch_writes_rows_offsets_decisions_and_one_version(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine, b"test-secret")
    assert await store.stored_offsets([(TOPIC, 0), (TOPIC, 1)]) == {(TOPIC, 0): 0, (TOPIC, 1): 0}
    events = [at(claim("alpha"), 0), at(claim("beta", "cell-2", 2), 1), at(claim("alpha", "cell-2", 9), 0, partition=1)]
    result = await store.commit_batch(
        events, [], {(TOPIC, 0): PartitionAdvance(0, 2), (TOPIC, 1): PartitionAdvance(0, 1)}
    )
    assert result.version == 1 and result.changed
    assert await rows(engine, "SELECT bucket, value, cell_id, owner_id, version FROM claims ORDER BY value") == [
        ("NAMESPACE", "alpha", "cell-1", 1, 1),
        ("NAMESPACE", "beta", "cell-2", 2, 1),
    ]
    assert await rows(engine, "SELECT partition, next_offset FROM partition_offsets ORDER BY partition") == [(0, 2), (1, 1)]
    outcomes = await rows(engine, 'SELECT "offset", partition, outcome, reason FROM processed_events ORDER BY partition, "offset"')
    assert outcomes == [
        (0, 0, "applied", None),
        (1, 0, "applied", None),
        (0, 1, "rejected", "already claimed in cell cell-1"),
    ]


async def test_a_stale_member_is_fenced_and_writes_nothing(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine, b"test-secret")
    await store.stored_offsets([(TOPIC, 0)])
    await store.commit_batch([at(claim("alpha"), 0)], [], {(TOPIC, 0): PartitionAdvance(0, 1)})
    # A member that still believes partition 0 starts at 0 replays offset 0 with a different outcome.
    with pytest.raises(FencedError) as fenced:
        await store.commit_batch(
            [at(claim("gamma"), 0)], [], {(TOPIC, 0): PartitionAdvance(expected=0, next_offset=1)}
        )
    assert fenced.value.partitions == [(TOPIC, 0)]
    assert await rows(engine, "SELECT value FROM claims") == [("alpha",)]
    assert await rows(engine, "SELECT next_offset FROM partition_offsets") == [(1,)]
    assert await store.current_version() == 1


async def test_fencing_aborts_the_whole_batch_even_when_one_partition_is_still_owned(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine, b"test-secret")
    await store.stored_offsets([(TOPIC, 0), (TOPIC, 1)])
    await store.commit_batch([at(claim("one"), 0, partition=1)], [], {(TOPIC, 1): PartitionAdvance(0, 1)})
    with pytest.raises(FencedError):
        await store.commit_batch(
            [at(claim("zero"), 0, partition=0), at(claim("late"), 0, partition=1)],
            [],
            {(TOPIC, 0): PartitionAdvance(0, 1), (TOPIC, 1): PartitionAdvance(0, 1)},
        )
    assert await rows(engine, "SELECT value FROM claims") == [("one",)]
    assert await rows(engine, "SELECT partition, next_offset FROM partition_offsets ORDER BY 1") == [(0, 0), (1, 1)]


@pytest.mark.parametrize("statement_rows", [500, 0], ids=["in-statements", "by-copy"])
async def test_a_batch_writes_the_same_rows_in_statements_or_by_copy_and_a_fenced_one_archives_nothing(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, statement_rows: int
) -> None:
    # Small batches send their rows as array parameters of fewer statements, large ones COPY.
    monkeypatch.setattr(store_module, "STATEMENT_ROWS", statement_rows)
    store = ProjectionStore(engine, b"test-secret")
    await store.stored_offsets([(TOPIC, 0)])
    logged = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    archive = [RawRecord(TOPIC, 0, n, f"k{n}".encode(), None if n else b"v", (("event_type", b"ClaimCreated"),),
                         log_time=logged) for n in range(2)]
    events = [at(claim("alpha"), 0), at(claim("alpha", "cell-2", 2), 1)]
    await store.commit_batch(events, [], {(TOPIC, 0): PartitionAdvance(0, 2)}, archive)
    assert await rows(engine, 'SELECT "offset", key, value, headers, log_time FROM event_archive ORDER BY 1') == [
        (0, b"k0", b"v", [["event_type", b"ClaimCreated".hex()]], logged),
        (1, b"k1", None, [["event_type", b"ClaimCreated".hex()]], logged),
    ]
    assert await rows(engine, 'SELECT event_id, "offset", outcome, version FROM processed_events ORDER BY 2') == [
        (events[0].event.event_id, 0, "applied", 1), (events[1].event.event_id, 1, "rejected", 1)]
    assert await rows(engine, "SELECT kind, key FROM event_keys WHERE event_id = "
                              f"'{events[0].event.event_id}'") == [("claim", "NAMESPACE:alpha")]
    with pytest.raises(FencedError):
        await store.commit_batch([at(claim("gamma"), 0)], [], {(TOPIC, 0): PartitionAdvance(0, 1)},
                                 [RawRecord(TOPIC, 0, 0, b"other", b"other", (), log_time=logged)])
    assert await rows(engine, 'SELECT "offset", key FROM event_archive ORDER BY 1') == [(0, b"k0"), (1, b"k1")]


async def test_concurrent_commits_from_the_same_position_let_exactly_one_win(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine, b"test-secret")
    await store.stored_offsets([(TOPIC, 0)])
    attempts = [
        store.commit_batch([at(claim(f"racer-{n}"), 0)], [], {(TOPIC, 0): PartitionAdvance(0, 1)}) for n in range(5)
    ]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, FencedError) for r in results if isinstance(r, BaseException))
    assert len(await rows(engine, "SELECT value FROM claims")) == 1


async def test_a_redelivered_event_id_changes_nothing(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine, b"test-secret")
    await store.stored_offsets([(TOPIC, 0)])
    created = claim("alpha")
    released = ClaimReleased(**created.model_dump(exclude={"event_id", "occurred_at"}))
    await store.commit_batch([at(created, 0), at(released, 1)], [], {(TOPIC, 0): PartitionAdvance(0, 2)})
    # The producer retried the create (same event_id): it must not resurrect the claim.
    result = await store.commit_batch([at(created, 2)], [], {(TOPIC, 0): PartitionAdvance(2, 3)})
    assert not result.changed
    assert [d.outcome.value for _, d in result.result.decisions] == ["duplicate"]
    assert await rows(engine, "SELECT count(*) FROM claims") == [(0,)]
    assert await rows(engine, "SELECT count(*) FROM processed_events") == [(2,)]
    # Claimed and released in one batch: routers never saw it, so the version never moved.
    assert await store.current_version() == 0


async def test_a_batch_that_changes_nothing_does_not_bump_the_version(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine, b"test-secret")
    await store.stored_offsets([(TOPIC, 0)])
    await store.commit_batch([at(claim("alpha"), 0)], [], {(TOPIC, 0): PartitionAdvance(0, 1)})
    rejected = await store.commit_batch(
        [at(claim("alpha", "cell-2", 5), 1)], [], {(TOPIC, 0): PartitionAdvance(1, 2)}
    )
    assert (rejected.version, rejected.changed) == (1, False)
    assert await rows(engine, "SELECT next_offset FROM partition_offsets") == [(2,)]


async def test_dead_letters_are_kept_byte_for_byte(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine, b"test-secret")
    await store.stored_offsets([(TOPIC, 0)])
    letter = DeadLetter(TOPIC, 0, 0, b"NAMESPACE:x", b"\x00garbage\xff", (("event_type", b"ClaimCreated"),), "bad marker")
    await store.commit_batch([], [letter], {(TOPIC, 0): PartitionAdvance(0, 1)})
    assert await rows(engine, 'SELECT topic, partition, "offset", key, value, headers, error FROM dead_letters') == [
        (TOPIC, 0, 0, b"NAMESPACE:x", b"\x00garbage\xff", [["event_type", b"ClaimCreated".hex()]], "bad marker")
    ]
    assert await rows(engine, "SELECT next_offset FROM partition_offsets") == [(1,)]


async def test_commit_notifies_the_new_version_only_on_commit(engine: AsyncEngine, settings: Settings) -> None:
    store = ProjectionStore(engine, b"test-secret")
    await store.stored_offsets([("cells", 0)])
    async with await psycopg.AsyncConnection.connect(settings.libpq_url, autocommit=True) as listener:
        await listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        cell = CellRegistered(
            source="ops", cell_id="cell-1", address="https://c1.example.com", session_prefix="c1", region="eu"
        )
        await store.commit_batch([at(cell, 0, topic="cells")], [], {("cells", 0): PartitionAdvance(0, 1)})
        payloads = [n.payload async for n in listener.notifies(timeout=5, stop_after=1)]
    assert payloads == ["1"]


async def test_routing_changes_record_each_version_in_the_same_transaction(engine: AsyncEngine) -> None:
    store = ProjectionStore(engine, b"test-secret")
    await store.stored_offsets([(TOPIC, 0), ("cells", 0)])
    cell = CellRegistered(source="ops", cell_id="cell-1", address="https://c1.example.com", session_prefix="c1", region="eu")
    await store.commit_batch([at(cell, 0, topic="cells")], [], {("cells", 0): PartitionAdvance(0, 1)})
    created = claim("alpha")
    await store.commit_batch(
        [at(created, 0), at(claim("bob", owner=3).model_copy(update={"bucket": ClaimBucket.USERNAME}), 1)],
        [], {(TOPIC, 0): PartitionAdvance(0, 2)},
    )
    released = ClaimReleased(**created.model_dump(exclude={"event_id", "occurred_at"}))
    await store.commit_batch([at(released, 2)], [], {(TOPIC, 0): PartitionAdvance(2, 3)})
    changes = await rows(engine, "SELECT version, kind, key, value FROM routing_changes ORDER BY version, kind, key")
    assert changes == [
        (1, "cell", "cell-1", {"cell_id": "cell-1", "address": "https://c1.example.com", "session_prefix": "c1",
                               "region": "eu", "weight": 0, "state": "PROVISIONING", "state_reason": "",
                               "number": None, "sequence_ranges": []}),
        (2, "namespace", "alpha", {"cell_id": "cell-1"}),  # the USERNAME claim does not route
        (3, "namespace", "alpha", None),
    ]


async def test_a_cells_number_and_granted_ranges_are_in_its_row_and_routing_document(engine: AsyncEngine) -> None:
    # GitLab's CellInfo (adr/0021): the number from the event, the ranges the decider granted;
    # a grant is a new version whose change is the cell's whole document.
    store = ProjectionStore(engine, b"test-secret")
    await store.stored_offsets([("cells", 0), ("requests", 0)])
    cell = CellRegistered(source="ops", cell_id="cell-1", address="https://c1.example.com", session_prefix="c1",
                          region="eu", number=7)
    await store.commit_batch([at(cell, 0, topic="cells")], [], {("cells", 0): PartitionAdvance(0, 1)})
    assert await rows(engine, "SELECT cell_id, number, version FROM cells") == [("cell-1", 7, 1)]
    requests = [SequenceRangeRequested(source="cell-1", cell_id="cell-1", sequence_name=name, size=size)
                for name, size in (("projects.id", 100), ("projects.id", 50), ("users.id", 10))]
    committed = await store.commit_batch([at(r, n, topic="requests") for n, r in enumerate(requests)], [],
                                         {("requests", 0): PartitionAdvance(0, 3)})
    assert committed.changed and committed.version == 2
    granted = await rows(engine, 'SELECT sequence_name, start, "end" FROM sequence_ranges ORDER BY 1, 2')
    assert len(granted) == 3
    (document,) = [value for version, kind, key, value in await rows(
        engine, "SELECT version, kind, key, value FROM routing_changes WHERE version = 2")]
    assert isinstance(document, dict) and document["number"] == 7
    assert [(r["sequence_name"], r["start"], r["end"]) for r in document["sequence_ranges"]] == granted


async def test_a_batch_larger_than_the_lock_table_records_its_decisions_in_decision_order(engine: AsyncEngine) -> None:
    # A per-key advisory lock per outbox row used to exhaust PostgreSQL's lock table
    # ("out of shared memory") on a batch this large.
    store = ProjectionStore(engine, b"test-secret")
    await store.stored_offsets([(TOPIC, 0)])
    count = 16_000  # the old trigger failed from about 15,000 rows on a default server
    events = [at(claim(f"big-{n:05d}", owner=n), n) for n in range(count)]
    await store.commit_batch(events, [], {(TOPIC, 0): PartitionAdvance(0, count)})
    recorded = await rows(engine, "SELECT partition_key FROM topology_outbox ORDER BY id")
    # A decision's key is the request it answers: here, each ClaimCreated in log order.
    assert [key for (key,) in recorded] == [str(p.event.event_id) for p in events]
    assert await rows(engine, "SELECT count(*) FROM topology_outbox WHERE published_at IS NOT NULL") == [(0,)]


async def test_a_database_that_never_answers_fails_the_connection_within_the_connect_timeout() -> None:
    # A listener that accepts and never speaks: what a host dropping packets looks like
    # after the handshake. Without a connect timeout, the attempt hangs for minutes.
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x", connect_timeout_s=2)
    started = time.monotonic()
    try:
        with pytest.raises(Exception, match="timeout|timed out"):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        assert time.monotonic() - started < 10
    finally:
        await engine.dispose()
        silent.close()
