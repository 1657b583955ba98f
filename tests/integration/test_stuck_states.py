"""States the projector once could not leave by itself (adr/0019), each created on the
real broker and PostgreSQL: stored offsets moved backwards (read again and skipped
against the archive), a topic recreated behind the stored offsets or records deleted
before they were read (refused, named on /readyz with the fix, nothing overwritten), and a
revoke that lands while a seek waits on the database (no crash)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from tests.integration.routing import cell
from tests.integration.test_projector import Member, claim, count, publish, wait_for
from tests.servers import APACHE, Servers
from topology_store.projector.consumer import LogRewrittenError
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.models import ClaimCreated

pytestmark = pytest.mark.integration


def rows(settings: Settings, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.libpq_url) as conn:
        return conn.execute(query, params).fetchall()


def execute(settings: Settings, statement: str, params: Any = None) -> None:
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        conn.execute(statement, params)


async def until(condition: Any, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def state(settings: Settings) -> dict[str, Any]:
    """What the projection holds, beside the offsets."""
    return {
        "claims": rows(settings, "SELECT bucket, value, cell_id, version FROM claims ORDER BY 1, 2"),
        "cells": rows(settings, "SELECT cell_id, address, version FROM cells ORDER BY 1"),
        "processed": rows(settings, 'SELECT event_id, topic, partition, "offset", outcome FROM processed_events '
                                    "ORDER BY 2, 3, 4"),
        "archive": rows(settings, 'SELECT topic, partition, "offset", key, value, headers::text, archived_at '
                                  "FROM event_archive ORDER BY 1, 2, 3"),
        "dead_letters": rows(settings, 'SELECT topic, partition, "offset", error FROM dead_letters ORDER BY 1, 2, 3'),
        "event_keys": rows(settings, "SELECT kind, key, event_id FROM event_keys ORDER BY 1, 2, 3"),
        "version": rows(settings, "SELECT version FROM topology_version"),
    }


@pytest.mark.both_brokers
async def test_stored_offsets_moved_backwards_are_read_again_and_skipped_against_the_archive(
    topics: Settings,
) -> None:
    """An operator resets every stored offset to 0. Before, the archive's COPY collided on
    its primary key, the bisection could blame no record and the member re-read for ever;
    now the records read again are compared with the archive, skipped, and the member
    goes on with what is new."""
    settings = topics.model_copy(update={"batch_max_events": 7})  # many batches, some half old, half new
    first = [claim(f"before-{n}") for n in range(40)] + [cell(1)]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(settings.claims_topic, b"not avro at all", key=b"x", partition=1)
    finally:
        await producer.stop()
    await publish(settings, first)
    async with Member(settings):
        await wait_for(settings, "SELECT count(*) FROM processed_events", 41)
        await wait_for(settings, "SELECT count(*) FROM dead_letters", 1)
    before = state(settings)
    archived = len(before["archive"])
    assert archived == 42
    execute(settings, "UPDATE partition_offsets SET next_offset = 0")  # the operator's reset

    later = [claim(f"after-{n}") for n in range(10)]
    async with Member(settings) as member:
        await publish(settings, later)
        await wait_for(settings, "SELECT count(*) FROM processed_events", 51)
        await wait_for(settings, "SELECT sum(next_offset) FROM partition_offsets", 52)
        metrics, health = member.projector.metrics, member.projector.health
        assert metrics.reread._value.get() == archived  # every old record read again, and skipped
        assert health.ready and health.document()["log"] == {"state": "ok", "refused": {}}
        assert metrics.isolated._value.get() == 0 and metrics.database_errors._value.get() == 0
    after = state(settings)
    # What was there is untouched, byte for byte and row for row (the archive's first copy kept,
    # no dead letter twice, no decision recorded again); only the new events were added.
    for table in ("archive", "processed", "dead_letters", "event_keys"):
        assert set(before[table]) <= set(after[table]), table
    assert len(after["archive"]) == archived + 10
    assert after["dead_letters"] == before["dead_letters"]
    assert {row[4] for row in after["processed"]} == {"applied"}
    assert [value for _, value, _, _ in after["claims"]] == sorted(
        [f"after-{n}" for n in range(10)] + [f"before-{n}" for n in range(40)])
    assert set(before["claims"]) <= set(after["claims"])  # the old claims keep the version that made them


async def _recreate(settings: Settings, topic: str) -> None:
    """Delete ``topic`` on the broker and create it again, empty, with the same layout."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        deadline = time.monotonic() + 60
        while topic in await admin.list_topics():
            assert time.monotonic() < deadline, f"{topic} was not deleted"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    deadline = time.monotonic() + 60
    while True:  # the broker may still be finishing the deletion
        try:
            await ensure_topics(settings)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_a_topic_recreated_behind_the_stored_offsets_is_refused_named_and_never_overwrites_the_archive(
    topics: Settings, servers: Servers
) -> None:
    if servers.broker_kind != APACHE:
        pytest.skip("recreating a topic on the embedded Tansu broker does not restart its log at offset 0 "
                    "(the member never saw a restarted log here)")
    settings = topics
    cells = TopicPartition(settings.cells_topic, 0)
    await publish(settings, [cell(1), cell(2), cell(3)])
    async with Member(settings):
        await wait_for(settings, "SELECT count(*) FROM cells", 3)
    before = state(settings)

    await _recreate(settings, settings.cells_topic)
    await publish(settings, [cell(7), cell(8)])  # a new history at offsets 0 and 1
    async with Member(settings) as member:
        projector, health = member.projector, member.projector.health
        # Stored offset 3, the log ends at 2: the broker resets the fetch to 0, which is refused.
        await until(lambda: cells in projector.refused, "the cells partition refused")
        reason = health.document()["log"]["refused"][f"{cells.topic}[0]"]
        assert "stored offset is 3 but the log restarts at 0" in reason and "TOPOLOGY_*_TOPIC" in reason
        assert not health.ready and health.document()["status"] == "unready"
        assert projector.metrics.refused_partitions._value.get() == 1
        # The member's other partitions go on.
        await publish(settings, [claim("still-served")])
        await wait_for(settings, "SELECT count(*) FROM claims", 1)

        # The tempting fix, offsets back to 0, meets a different record at an archived offset.
        execute(settings, "UPDATE partition_offsets SET next_offset = 0 WHERE topic = %s", (cells.topic,))
        await until(lambda: isinstance(getattr(projector.refused.get(cells), "error", None), LogRewrittenError),
                    "the rewritten record refused")
        reason = health.document()["log"]["refused"][f"{cells.topic}[0]"]
        assert f"{cells.topic}[0]: offset 0 holds a different record than the archive kept there" in reason
        assert not health.ready
    after = state(settings)
    assert after["archive"][:3] == before["archive"]  # the audit record is not overwritten
    assert after["cells"] == before["cells"]  # nothing of the new history applied
    assert count(settings, f"SELECT count(*) FROM processed_events WHERE topic = '{cells.topic}'") == 3

    # The documented way on: the new history under a new name, projected with its own offsets.
    renamed = settings.model_copy(update={"cells_topic": f"{settings.cells_topic}.v2"})
    await ensure_topics(renamed)
    await publish(renamed, [cell(7), cell(8)])
    async with Member(renamed) as member:
        await wait_for(renamed, "SELECT count(*) FROM cells", 5)
        assert member.projector.health.document()["log"] == {"state": "ok", "refused": {}}


def waiting(settings: Settings, statement: str) -> int:
    """Backends of this test's database waiting for a lock in a statement that contains
    ``statement`` (the projector's commit advances the offsets inside a WITH)."""
    found = rows(settings, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock' AND query LIKE %s", ("%" + statement + "%",))
    return int(found[0][0])


@pytest.mark.both_brokers
async def test_a_revoke_while_a_seek_waits_on_the_database_cannot_crash_the_member(topics: Settings) -> None:
    """The interleaving, forced with real locks on a real group: member A is fenced on a
    partition and seeks to its stored offsets, which waits on a lock this test holds; B
    joins, and the rebalance revokes partitions from A under that wait. Before, the seek
    then landed on partitions no longer A's: aiokafka's IllegalStateError, out of run()."""
    settings = topics
    codec = EventCodec()
    await publish(settings, [claim(f"first-{n}") for n in range(8)])
    async with Member(settings) as a:
        await wait_for(settings, "SELECT count(*) FROM processed_events", 8)
        projector = a.projector
        owned = set(projector.positions)
        assert TopicPartition(settings.claims_topic, 0) in owned and len(owned) > 2  # A alone owns every partition
        reset = await psycopg.AsyncConnection.connect(settings.libpq_url)
        holder = await psycopg.AsyncConnection.connect(settings.libpq_url)
        try:
            # An operator's reset of claims[0], not committed yet: A's next commit on it waits for it.
            await reset.execute("UPDATE partition_offsets SET next_offset = 0 WHERE topic = %s AND partition = 0",
                                (settings.claims_topic,))
            event = claim("fenced")
            producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
            await producer.start()
            try:
                await producer.send_and_wait(settings.claims_topic, codec.encode("ClaimCreated", event.to_avro()),
                                             key=event.partition_key.encode(), partition=0)
            finally:
                await producer.stop()
            await until(lambda: waiting(settings, "UPDATE partition_offsets") == 1, "A's commit to wait")
            # Queued behind A's commit: once the reset commits, A is fenced, rolls back, and the
            # INSERT of its seek_to_stored waits behind this lock.
            held = asyncio.create_task(holder.execute("LOCK TABLE partition_offsets IN SHARE MODE"))
            await until(lambda: waiting(settings, "LOCK TABLE partition_offsets") == 1, "the lock to queue")
            await reset.commit()
            await held
            await until(lambda: waiting(settings, "INSERT INTO partition_offsets") == 1, "A's seek to wait")
            assert projector.metrics.fenced._value.get() == 1
            rebalances = projector.rebalances
            async with Member(settings) as b:
                # The group rebalances while A's seek waits: A's partitions are revoked and
                # split between A and B (their own seeks wait on the same lock).
                await until(lambda: projector.rebalances >= rebalances + 2 and b.projector.rebalances >= 1,
                            "the rebalance")
                taken = owned - projector._consumer.assignment()
                assert taken, "B was assigned none of A's partitions"
                await holder.commit()  # A's seek goes on, after the revoke
                await until(lambda: waiting(settings, "INSERT INTO partition_offsets") == 0, "the seeks to end")
                await asyncio.sleep(0.5)
                assert not a.task.done(), a.task.exception()
                await publish(settings, [claim(f"later-{n}") for n in range(12)])
                await wait_for(settings, "SELECT count(*) FROM processed_events", 8 + 1 + 12)
                assert not a.task.done(), a.task
                assert set(projector.positions) <= projector._consumer.assignment()
                assert not set(projector.positions) & set(b.projector.positions)
        finally:
            await reset.close()
            await holder.close()
    outcomes = rows(settings, "SELECT outcome, count(*) FROM processed_events GROUP BY 1")
    assert outcomes == [("applied", 21)]


@pytest.mark.both_brokers
async def test_an_archived_position_the_member_did_not_expect_is_never_blamed_on_a_record(topics: Settings) -> None:
    """The stored offset moves back under a running member (here: the archive gains the
    position it is about to read). The archive's COPY then collides on its primary key;
    before, the bisection blamed no record and the member re-read for ever. Now it seeks
    again and the comparison with the archive decides: here a different record, refused."""
    settings = topics
    codec = EventCodec()
    async with Member(settings) as member:
        projector = member.projector
        await publish(settings, [claim(f"first-{n}") for n in range(4)])
        await wait_for(settings, "SELECT count(*) FROM processed_events", 4)
        claims = TopicPartition(settings.claims_topic, 0)
        await until(lambda: claims in projector.positions, "claims[0] assigned")
        position = projector.positions[claims]
        execute(settings, 'INSERT INTO event_archive (topic, partition, "offset", key, value, log_time) '
                          "VALUES (%s, 0, %s, 'k', 'another record', now())", (claims.topic, position))

        async def send(events: list[ClaimCreated], partition: int) -> None:
            producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
            await producer.start()
            try:
                for event in events:
                    await producer.send_and_wait(settings.claims_topic, codec.encode("ClaimCreated", event.to_avro()),
                                                 key=event.partition_key.encode(), partition=partition)
            finally:
                await producer.stop()

        await send([claim("collides")], 0)
        await until(lambda: isinstance(getattr(projector.refused.get(claims), "error", None), LogRewrittenError),
                    "claims[0] refused")
        assert f"offset {position} holds a different record" in projector.health.document()["log"]["refused"][
            f"{claims.topic}[0]"]
        # Other partitions go on; nothing was dead-lettered or isolated for it.
        await send([claim(f"later-{n}") for n in range(8)], 1)
        await wait_for(settings, "SELECT count(*) FROM processed_events", 4 + 8)
        assert projector.metrics.isolated._value.get() == 0
    assert count(settings, "SELECT count(*) FROM dead_letters") == 0
    assert count(settings, "SELECT count(*) FROM claims WHERE value = 'collides'") == 0


async def test_records_deleted_before_they_were_read_are_refused_until_the_named_update_skips_them(
    topics: Settings, servers: Servers
) -> None:
    """Retention (here DeleteRecords on the broker) removed records the projection never read:
    the partition is refused with the UPDATE that skips them; run, the member goes on by itself."""
    if servers.broker_kind != APACHE:
        pytest.skip("the embedded Tansu broker closes the connection on DeleteRecords")
    settings = topics
    cells = TopicPartition(settings.cells_topic, 0)
    await publish(settings, [cell(1), cell(2)])
    async with Member(settings):
        await wait_for(settings, "SELECT count(*) FROM cells", 2)
    await publish(settings, [cell(3), cell(4), cell(5)])  # offsets 2 to 4, never read
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_records({cells: RecordsToDelete(before_offset=4)})
    finally:
        await admin.close()
    async with Member(settings) as member:
        projector, health = member.projector, member.projector.health
        await until(lambda: cells in projector.refused, "the cells partition refused")
        reason = health.document()["log"]["refused"][f"{cells.topic}[0]"]
        assert "the stored offset is 2 but the log continues at 4" in reason
        update = reason[reason.index("UPDATE partition_offsets"):reason.index(";")]
        assert not health.ready and count(settings, "SELECT count(*) FROM cells") == 2
        execute(settings, update)  # the operator accepts the loss, as the message spells out
        await wait_for(settings, "SELECT count(*) FROM cells", 3)  # cell-5, at offset 4
        await until(lambda: health.ready, "ready again")
        assert health.document()["log"] == {"state": "ok", "refused": {}}
    assert [row[0] for row in rows(settings, "SELECT cell_id FROM cells ORDER BY 1")] == ["cell-1", "cell-2", "cell-5"]
