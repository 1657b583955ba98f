"""What differs between Apache Kafka and the embedded Tansu broker, and how the code finds
out (adr/0016). Every test runs once on each broker (``each_broker``: the session's, and
``other_broker``), so both sides of every difference stay proven in every run:

- the idempotent producer: ``auto`` gets one where the broker grants a producer id, and
  the batches in the log carry that id; plain acks=all where InitProducerId is refused;
- LogAppendTime on the claim-requests topic: verified and, if need be, switched at
  start-up where the broker applies topic configs; said once in a log line where not;
- the log end: the fetch high watermark (what the lag metric uses) is right on both;
  ``end_offsets()`` (ListOffsets) only on Apache Kafka;
- Kafka-side group offsets: the admin API shows the projector's group commits nothing
  (adr/0002) on Apache Kafka; Tansu's answer does not decode;
- a broker that stops answering: publishes fail within the producer's patience on both,
  although aiokafka's idempotent producer would retry for ever (the publisher bounds it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.memory_records import MemoryRecords

import topology_store.runtime.topics as topics_module
from tests.integration.test_projector import Member, wait_for
from tests.servers import APACHE, Broker, detect_kind, private_broker
from topology_store.producer.publisher import EventPublisher, Published, PublishFailed
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import LOG_APPEND_TIME, TIMESTAMP_TYPE, _topic_config, ensure_topics
from topology_store.schemas.models import ClaimBucket, ClaimCreated, OwnerType

pytestmark = pytest.mark.integration

LOG_APPEND_TIME_TYPE = 1  # a record's timestamp_type: 0 CreateTime, 1 LogAppendTime


@pytest.fixture
async def on_broker(each_broker: Broker, settings: Settings) -> AsyncIterator[Settings]:
    """This test's settings on ``each_broker``, with its topics created there."""
    own = settings.model_copy(update={"kafka_bootstrap": each_broker.bootstrap})
    await ensure_topics(own)
    yield own


def claim(n: int) -> ClaimCreated:
    return ClaimCreated(source="cell-1", bucket=ClaimBucket.NAMESPACE, value=f"capability-{n}", cell_id="cell-1",
                        owner_type=OwnerType.GROUP, owner_id=1)


async def publish(settings: Settings, count: int) -> tuple[EventPublisher, dict[int, int]]:
    """Publish ``count`` claims (gzip, linger: multi-record batches); the publisher, and the
    log end per partition from the acknowledgements."""
    ends: dict[int, int] = {}
    async with EventPublisher(settings) as publisher:
        async for outcome in publisher.publish_many(claim(n) for n in range(count)):
            assert not isinstance(outcome, PublishFailed), outcome
            ends[outcome.partition] = max(ends.get(outcome.partition, 0), outcome.offset + 1)
    return publisher, ends


async def batches_in_log(bootstrap: str, topic: str, partition: int) -> list[tuple[int, int, int, int]]:
    """(producer id, producer epoch, base sequence, records) of every record batch the broker
    keeps for the partition, read with a plain Fetch request: what the broker stored."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        client.add_topic(topic)
        await client.force_metadata_update()
        leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        request = FetchRequest(100, 1, 32 * 1024 * 1024, 0, [(topic, [(partition, 0, 32 * 1024 * 1024)])])
        response = await client.send(leader, request)
        found = []
        for _, partitions in response.topics:
            for _, error_code, _, *data in partitions:
                assert error_code == 0, error_code
                records = MemoryRecords(data[-1])
                while records.has_next():
                    batch = records.next_batch()
                    found.append((batch.producer_id, batch.producer_epoch, batch.base_sequence, len(list(batch))))
        return found
    finally:
        await client.close()


async def test_the_broker_is_told_apart_by_what_it_answers(each_broker: Broker) -> None:
    assert await asyncio.to_thread(detect_kind, each_broker.bootstrap) == each_broker.kind


async def test_auto_idempotence_is_on_exactly_where_the_broker_grants_a_producer_id(
    each_broker: Broker, on_broker: Settings
) -> None:
    publisher, ends = await publish(on_broker, 200)
    assert sum(ends.values()) == 200
    partition = max(ends, key=lambda p: ends[p])
    batches = await batches_in_log(on_broker.kafka_bootstrap, on_broker.claims_topic, partition)
    assert sum(count for *_, count in batches) == ends[partition]
    strict = EventPublisher(on_broker.model_copy(update={"producer_idempotence": "on"}))
    if each_broker.kind == APACHE:
        # auto chose the idempotent producer, and the broker really assigned the id: every
        # batch of the partition carries it, with sequence numbers following on.
        assert publisher.idempotent and publisher.producer_id is not None and publisher.producer_id >= 0
        assert {(pid, epoch) for pid, epoch, *_ in batches} == {(publisher.producer_id, 0)}
        sequences = [(sequence, count) for *_, sequence, count in batches]
        assert sequences[0][0] == 0
        assert all(nxt == seq + count for (seq, count), (nxt, _) in itertools.pairwise(sequences))
        await strict.start()  # "on" starts too
        assert strict.idempotent
        await strict.stop()
    else:
        # Tansu refuses InitProducerId: auto falls back to plain acks=all, "on" refuses to start.
        assert not publisher.idempotent and publisher.producer_id is None
        assert {pid for pid, *_ in batches} == {-1}
        with pytest.raises(KafkaError):
            await strict.start()
        await strict.stop()


async def request_timestamp(settings: Settings) -> tuple[int, int]:
    """(timestamp type, timestamp) the broker acknowledges for a record sent to the
    claim-requests topic with a producer timestamp of 1970 plus one second."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        ack = await (await producer.send(settings.claim_requests_topic, b"not an event", key=b"k", timestamp_ms=1000))
    finally:
        await producer.stop()
    return ack.timestamp_type, ack.timestamp


async def test_log_append_time_is_verified_and_switched_where_the_broker_applies_topic_configs(
    each_broker: Broker, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    on_broker = settings.model_copy(update={"kafka_bootstrap": each_broker.bootstrap})
    # The claim-requests topic made elsewhere, with the default CreateTime and a config of its own.
    admin = AIOKafkaAdminClient(bootstrap_servers=on_broker.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(on_broker.claim_requests_topic, 2, 1,
                                            topic_configs={"retention.ms": "86400000"})])
        with caplog.at_level(logging.INFO, logger=topics_module.__name__):
            first = await ensure_topics(on_broker)
            second = await ensure_topics(on_broker)  # as every projector, relay and `topology topics` does
        config = {name: value for name, value, *_ in await _topic_config(admin, on_broker.claim_requests_topic)}
    finally:
        await admin.close()
    assert first == second
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    timestamp_type, timestamp = await request_timestamp(on_broker)
    if each_broker.kind == APACHE:
        assert first.topic_configs
        assert config[TIMESTAMP_TYPE] == LOG_APPEND_TIME and config["retention.ms"] == "86400000"
        assert len(warnings) == 1 and f"switching it to {LOG_APPEND_TIME}" in warnings[0]  # once: then it is right
        # The broker's clock, not the producer's.
        assert timestamp_type == LOG_APPEND_TIME_TYPE and abs(timestamp / 1000 - time.time()) < 60
    else:
        assert not first.topic_configs
        # Said by every start-up (each process calls it once), never an error.
        assert len(warnings) == 2 and all("does not apply topic configs" in w for w in warnings), warnings
        assert (timestamp_type, timestamp) == (0, 1000)  # Tansu keeps the producer's timestamp


async def test_the_fetch_high_watermark_is_the_log_end_on_both_and_end_offsets_only_on_apache_kafka(
    each_broker: Broker, on_broker: Settings
) -> None:
    _, ends = await publish(on_broker, 3100)
    tps = [TopicPartition(on_broker.claims_topic, p) for p in range(on_broker.claims_partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=on_broker.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        listed = await consumer.end_offsets(tps)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        highwater: dict[int, int | None] = {}
        deadline = time.monotonic() + 30
        while len(highwater) < len(tps) and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=200, max_records=1)
            highwater = {tp.partition: consumer.highwater(tp) for tp in tps if consumer.highwater(tp) is not None}
    finally:
        await consumer.stop()
    acknowledged = {tp.partition: ends.get(tp.partition, 0) for tp in tps}
    assert highwater == acknowledged  # what topology_projector_consumer_lag_records is built on (adr/0011)
    by_list_offsets = {tp.partition: offset for tp, offset in listed.items()}
    if each_broker.kind == APACHE:
        assert by_list_offsets == acknowledged
    else:
        # Measured since adr/0006: wrong after multi-record batches. When this fails, Tansu answers
        # ListOffsets right: update adr/0016's table (and replay's read-until-quiet may go).
        assert by_list_offsets != acknowledged


async def test_the_projector_commits_no_offsets_to_kafka_as_the_admin_api_shows(
    each_broker: Broker, on_broker: Settings
) -> None:
    await publish(on_broker, 50)
    async with Member(on_broker):
        await wait_for(on_broker, "SELECT count(*) FROM processed_events", 50)
    admin = AIOKafkaAdminClient(bootstrap_servers=on_broker.kafka_bootstrap)
    await admin.start()
    try:
        if each_broker.kind == APACHE:
            # Offsets live in PostgreSQL with the rows (adr/0002): the group has none in Kafka.
            assert await admin.list_consumer_group_offsets(on_broker.consumer_group) == {}
        else:
            # Tansu's OffsetFetch answer does not decode in aiokafka 0.14 (adr/0006): the
            # consumer-group offset API is not there to look at.
            with pytest.raises(KafkaError):
                await asyncio.wait_for(admin.list_consumer_group_offsets(on_broker.consumer_group), 30)
    finally:
        await admin.close()


async def test_a_broker_that_stops_answering_fails_publishes_within_the_patience_on_both(
    each_broker: Broker, settings: Settings, tmp_path: Path
) -> None:
    frozen = private_broker(each_broker.kind, tmp_path / "frozen-broker.log")
    try:
        assert frozen.kind == each_broker.kind
        own = settings.model_copy(update={"kafka_bootstrap": frozen.bootstrap, "producer_request_timeout_ms": 1000})
        await ensure_topics(own)
        async with EventPublisher(own) as publisher:
            assert publisher.idempotent == (each_broker.kind == APACHE)
            first_id = publisher.producer_id
            assert isinstance(await publisher.publish(claim(0)), Published)
            frozen.signal(signal.SIGSTOP)
            try:
                began = time.monotonic()
                during = [o async for o in publisher.publish_many(claim(n) for n in range(1, 21))]
                waited = time.monotonic() - began
            finally:
                frozen.signal(signal.SIGCONT)
            # Not one success while frozen, and no wait for ever (aiokafka's idempotent
            # producer has no delivery timeout; the publisher gives it one).
            assert all(isinstance(o, PublishFailed) for o in during)
            assert waited < publisher.patience_s + 5, waited
            after = await publisher.publish(claim(21))  # the same publisher carries on
            assert isinstance(after, Published)
            if each_broker.kind == APACHE:
                # The stuck producer was replaced: a new producer id from the broker.
                assert publisher.idempotent and publisher.producer_id not in (None, first_id)
    finally:
        frozen.stop()
