"""The projector on a real broker and database: records it cannot read become dead
letters and never block their partition; two members of one group share the work
without losing or doubling anything."""

from __future__ import annotations

import asyncio
import random

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.scenario import build
from tests.servers import APACHE, Servers
from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.projector.consumer import KafkaStartRefused, Projector
from topology_store.projector.store import ProjectionStore
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.models import ClaimBucket, ClaimCreated, Event, OwnerType

pytestmark = pytest.mark.integration


def count(settings: Settings, query: str) -> int:
    with psycopg.connect(settings.libpq_url) as conn:
        row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0


async def wait_for(settings: Settings, query: str, expected: int, timeout_s: float = 60) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if count(settings, query) == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{query} never reached {expected} (now {count(settings, query)})")


class Member:
    """A projector running as a task in this process, as one consumer-group member."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Member:
        self.engine = create_engine(self.settings.sqlalchemy_url)
        self.projector = Projector(self.settings, ProjectionStore(self.engine, self.settings.claim_secret))
        self.task = asyncio.create_task(self.projector.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await self.task
        await self.engine.dispose()


def claim(value: str) -> ClaimCreated:
    return ClaimCreated(source="cell-1", bucket=ClaimBucket.NAMESPACE, value=value, cell_id="cell-1",
                        owner_type=OwnerType.GROUP, owner_id=1)


async def test_unreadable_records_become_dead_letters_and_the_partition_moves_on(topics: Settings) -> None:
    good_before, good_after = claim("before"), claim("after")
    codec = EventCodec()
    wrong_key = claim("keyed-wrong")
    producer = AIOKafkaProducer(bootstrap_servers=topics.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        # Everything on one partition, so "moves on" is about the same partition.
        for key, value in [
            (good_before.partition_key.encode(), codec.encode("ClaimCreated", good_before.to_avro())),
            (b"x", b"not avro at all"),
            (b"x", b"\xc3\x01" + b"\x00" * 8 + b"unknown fingerprint"),
            (b"x", codec.encode("ClaimCreated", wrong_key.to_avro())),  # key is not NAMESPACE:keyed-wrong
            (b"x", codec.encode("ClaimCreated", {**claim("x").to_avro(), "value": "Not/Canonical"})),
            (good_after.partition_key.encode(), codec.encode("ClaimCreated", good_after.to_avro())),
        ]:
            await producer.send_and_wait(topics.claims_topic, value=value, key=key, partition=0)
    finally:
        await producer.stop()

    async with Member(topics):
        await wait_for(topics, "SELECT count(*) FROM processed_events", 2)
        await wait_for(topics, "SELECT count(*) FROM dead_letters", 4)

    with psycopg.connect(topics.libpq_url) as conn:
        letters = conn.execute('SELECT "offset", value, error FROM dead_letters ORDER BY "offset"').fetchall()
        claimed = [row[0] for row in conn.execute("SELECT value FROM claims ORDER BY 1")]
        next_offset = conn.execute(
            "SELECT next_offset FROM partition_offsets WHERE topic = %s AND partition = 0", (topics.claims_topic,)
        ).fetchone()
    assert claimed == ["after", "before"]
    assert [offset for offset, _, _ in letters] == [1, 2, 3, 4]
    assert letters[0][1] == b"not avro at all"
    assert "single-object" in letters[0][2]
    assert "unknown writer schema fingerprint" in letters[1][2]
    assert "partition key" in letters[2][2]
    assert "value" in letters[3][2]
    assert next_offset == (6,)


async def publish(settings: Settings, events: list[Event]) -> None:
    async with EventPublisher(settings) as publisher:
        async for outcome in publisher.publish_many(events):
            assert not isinstance(outcome, PublishFailed), outcome


@pytest.mark.both_brokers
async def test_two_members_with_partitions_moving_apply_every_event_exactly_once(topics: Settings) -> None:
    settings = topics.model_copy(update={"batch_max_events": 50})
    scenario = build(namespaces=1200, seed=5)
    rng = random.Random(1)
    chunks = [scenario.events[i : i + 400] for i in range(0, len(scenario.events), 400)]
    async with Member(settings):
        for chunk in chunks:
            # The second member joins and leaves while events flow: partitions move both ways.
            async with Member(settings):
                await publish(settings, chunk)
                await asyncio.sleep(rng.uniform(0.0, 0.5))
        await wait_for(settings, "SELECT count(*) FROM processed_events", scenario.distinct_events, timeout_s=120)

    with psycopg.connect(settings.libpq_url) as conn:
        outcomes = dict(conn.execute("SELECT outcome, count(*) FROM processed_events GROUP BY 1").fetchall())
        namespaces = dict(conn.execute("SELECT value, cell_id FROM claims WHERE bucket = 'NAMESPACE'").fetchall())
        states = dict(conn.execute("SELECT cell_id, state FROM cells").fetchall())
    assert outcomes == {"applied": scenario.applied, "rejected": scenario.rejected}
    assert namespaces == scenario.namespaces
    assert states == {cell_id: cell["state"] for cell_id, cell in scenario.cells.items()}


async def test_a_group_join_the_broker_refuses_is_a_clear_error_not_an_endless_retry(
    topics: Settings, servers: Servers
) -> None:
    """A session timeout past the broker's ``group.max.session.timeout.ms`` (30 minutes by
    default) is answered with InvalidSessionTimeout every time: the projector says so at once."""
    if servers.broker_kind != APACHE:
        pytest.skip("Tansu accepts any session timeout")
    settings = topics.model_copy(update={"consumer_session_timeout_ms": 3_600_000})
    engine = create_engine(settings.sqlalchemy_url)
    try:
        projector = Projector(settings, ProjectionStore(engine, settings.claim_secret))
        with pytest.raises(KafkaStartRefused, match="InvalidSessionTimeout"):
            await asyncio.wait_for(projector.run(asyncio.Event()), 60)
    finally:
        await engine.dispose()
