"""What must hold once a fault is over, each checked against the log itself:

acknowledged -> in the log at the acknowledged offset -> consumed once (event_archive)
-> decided once, at its first occurrence (processed_events) -> the tables equal a
replay of the archive and a replay of the log (cells topic + the decision log the relay
wrote) -> the read API's snapshot equals that replay; and every claim race has one
winner, the one the tables name.
"""

from __future__ import annotations

import io
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg import sql

from tests.conftest import AUTH
from tests.integration.workload import Workload
from topology_store.projector.replay import LIVE_SCHEMA, Cut, compare, verify
from topology_store.projector.replay import replay as replay_into
from topology_store.query_api.snapshot import CELLS_QUERY, NAMESPACES_QUERY
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EventCodec

from .traffic import Traffic

Position = tuple[str, int, int]  # topic, partition, offset


@dataclass(frozen=True)
class Record:
    position: Position
    key: bytes | None
    value: bytes | None
    event_id: uuid.UUID


async def read_log(settings: Settings, topics: list[str]) -> dict[Position, Record]:
    """Every record of ``topics``, from the beginning to the end offsets (Apache Kafka's
    end offsets are exact; only the embedded broker's are not)."""
    codec = EventCodec()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                request_timeout_ms=20_000, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for topic in topics for p in range(partition_count(settings, topic))]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: dict[Position, Record] = {}
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for tp, batch in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).items():
                for r in batch:
                    if r.offset >= ends[tp]:
                        continue
                    payload = codec.decode(r.value).payload if r.value is not None else {}
                    records[(r.topic, r.partition, r.offset)] = Record(
                        (r.topic, r.partition, r.offset), r.key, r.value, uuid.UUID(str(payload.get("event_id"))))
        return records
    finally:
        await consumer.stop()


def partition_count(settings: Settings, topic: str) -> int:
    return {settings.cells_topic: settings.cells_partitions, settings.claims_topic: settings.claims_partitions,
            settings.claim_requests_topic: settings.claim_requests_partitions,
            settings.claim_decisions_topic: settings.claim_decisions_partitions}[topic]


def first_positions(log: dict[Position, Record], topics: list[str]) -> dict[uuid.UUID, Position]:
    """Where each event id of ``topics`` first occurs (one key, one partition: first by offset)."""
    first: dict[uuid.UUID, Position] = {}
    for position in sorted(p for p in log if p[0] in topics):
        first.setdefault(log[position].event_id, position)
    return first


def assert_nothing_acknowledged_lost(log: dict[Position, Record], traffic: Traffic) -> None:
    lost = [a for a in traffic.acks if (a.topic, a.partition, a.offset) not in log]
    assert not lost, f"{len(lost)} acknowledged records are not in the log, e.g. {lost[:5]}"
    moved = [a for a in traffic.acks if log[(a.topic, a.partition, a.offset)].event_id != a.event_id]
    assert not moved, f"{len(moved)} acknowledged offsets hold another event, e.g. {moved[:5]}"
    published = {e.event_id for e in traffic.work.events} | {p.event.event_id for p in traffic.probes}
    acknowledged = {a.event_id for a in traffic.acks}
    assert published <= acknowledged, f"{len(published - acknowledged)} events never acknowledged"


def assert_applied_exactly_once(settings: Settings, log: dict[Position, Record]) -> None:
    consumed = list(settings.topics)
    first = first_positions(log, consumed)
    with psycopg.connect(settings.libpq_url) as conn:
        processed = {row[0]: (row[1], row[2], row[3]) for row in conn.execute(
            'SELECT event_id, topic, partition, "offset" FROM processed_events')}
        archive = {(t, p, o): bytes(v) if v is not None else None for t, p, o, v in conn.execute(
            'SELECT topic, partition, "offset", value FROM event_archive')}
        archived_rows = conn.execute("SELECT count(*) FROM event_archive").fetchone()
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
        outbox, distinct_outbox = conn.execute("SELECT count(*), count(DISTINCT event_id) FROM topology_outbox").fetchone()
    # Every record of the consumed topics archived exactly once, byte for byte.
    in_log = {p: r.value for p, r in log.items() if p[0] in consumed}
    assert archived_rows == (len(archive),)
    assert archive.keys() == in_log.keys(), (sorted(in_log.keys() - archive.keys())[:5],
                                             sorted(archive.keys() - in_log.keys())[:5])
    assert archive == in_log
    # Every event decided exactly once, at its first occurrence in the log.
    assert processed.keys() == first.keys(), (len(processed), len(first))
    wrong = {e: (processed[e], first[e]) for e in first if processed[e] != first[e]}
    assert not wrong, f"{len(wrong)} events decided at a later occurrence: {list(wrong.items())[:5]}"
    assert dead == (0,)
    assert outbox == distinct_outbox  # no decision recorded twice


def assert_outcomes(settings: Settings, work: Workload, traffic: Traffic) -> Counter[str]:
    """The outcome of every decided event, as the workload, the probe and the races imply.
    (A workload event published again after a failed publish can land after a later event of
    its key; its outcome may then differ, so the workload's part is only checked without one.)"""
    with psycopg.connect(settings.libpq_url) as conn:
        outcomes = Counter(dict(conn.execute("SELECT outcome, count(*) FROM processed_events GROUP BY 1").fetchall()))
    expected = Counter(work.outcomes)
    expected["applied"] += 1 + len(traffic.probes)  # the probe cell, and every weight a new one
    expected["applied"] += len(traffic.races)
    expected["rejected"] += len(traffic.races)
    if not traffic.failures:
        assert outcomes == expected
    else:
        assert sum(outcomes.values()) == sum(expected.values())
    return outcomes


def assert_tables_equal_replays(settings: Settings) -> dict[str, Any]:
    """The live tables equal a replay of the archive, and a replay of the log itself (the
    cells topic and the decision log, which only the relay writes). Returns the snapshot
    the latter implies: its cells and its routed (committed NAMESPACE) claims."""
    from_archive = verify(settings, out=io.StringIO())
    assert from_archive.equal, (from_archive.missing, from_archive.unexpected)
    scratch = "cluster_replay"
    replay_into(settings, scratch, Cut(), source="kafka", replace=True, out=io.StringIO())
    try:
        from_log = compare(settings, LIVE_SCHEMA, scratch)
        with psycopg.connect(settings.libpq_url) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(scratch)))
            cursor = conn.execute(CELLS_QUERY)
            names = [c.name for c in cursor.description or []]
            cells = {row[0]: dict(zip(names, row, strict=True)) for row in cursor}
            namespaces = dict(conn.execute(NAMESPACES_QUERY).fetchall())
    finally:
        with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(scratch)))
    assert from_log.equal, (from_log.missing, from_log.unexpected)
    return {"cells": cells, "namespaces": namespaces}


def served_snapshot(api: str) -> dict[str, Any]:
    document = httpx.get(f"{api}/v1/snapshot", headers=AUTH, timeout=10).json()
    return {"version": document["version"], "cells": {c["cell_id"]: c for c in document["cells"]},
            "namespaces": document["namespaces"]}


def stored_version(settings: Settings) -> int:
    with psycopg.connect(settings.libpq_url) as conn:
        row = conn.execute("SELECT version FROM topology_version WHERE id = 1").fetchone()
    assert row is not None
    return int(row[0])


def assert_claims_unique(settings: Settings, traffic: Traffic) -> None:
    """Each race: one owner granted (201, or 200 when asked by id), the other refused
    (409), and the tables hold the value for the granted one only."""
    with psycopg.connect(settings.libpq_url) as conn:
        holders = {value: owners for value, owners in conn.execute(
            "SELECT value, array_agg(owner_id) FROM claims WHERE bucket = 'USERNAME' AND value LIKE 'race-%' "
            "GROUP BY value")}
    for first, second in traffic.races:
        statuses = sorted(a.status for a in (first, second))
        assert statuses in ([200, 409], [201, 409]), (first, second)
        winner = first if first.status != 409 else second
        assert holders.get(first.value) == [winner.owner_id], (first.value, holders.get(first.value), first, second)
    assert len(holders) == len(traffic.races)


def assert_decisions_relayed(settings: Settings, log: dict[Position, Record]) -> None:
    """Every decision the projector recorded is published, once at least, in id order."""
    with psycopg.connect(settings.libpq_url) as conn:
        unpublished = conn.execute("SELECT count(*) FROM topology_outbox WHERE published_at IS NULL").fetchone()
        in_order = [row[0] for row in conn.execute("SELECT event_id FROM topology_outbox ORDER BY id")]
    assert unpublished == (0,)
    first = first_positions(log, [settings.claim_decisions_topic])
    assert set(in_order) == first.keys()
    assert sorted(in_order, key=first.__getitem__) == in_order  # the decision log keeps the decision order
