"""The producer on a real broker: acknowledged means in the log, with the right key,
header and bytes; invalid input sends nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.conftest import settings_env
from topology_store.producer.publisher import EventPublisher
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EVENT_TYPE_HEADER, EventCodec
from topology_store.schemas.models import CellRegistered, ClaimBucket, ClaimCreated, OwnerType, parse_event

pytestmark = pytest.mark.integration


async def read_partition(settings: Settings, topic: str, partition: int, count: int) -> list:  # type: ignore[type-arg]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        records: list = []  # type: ignore[type-arg]
        for _ in range(50):
            batch = await consumer.getmany(tp, timeout_ms=200)
            records.extend(batch.get(tp, []))
            if len(records) >= count:
                break
        return records
    finally:
        await consumer.stop()


async def test_published_means_in_the_log_with_key_header_and_single_object_bytes(topics: Settings) -> None:
    event = ClaimCreated(
        source="cell-1", bucket=ClaimBucket.NAMESPACE, value="GitLab-Org", cell_id="cell-1",
        owner_type=OwnerType.GROUP, owner_id=7,
    )
    async with EventPublisher(topics) as publisher:
        published = await publisher.publish(event)
    assert published.topic == topics.claims_topic
    records = await read_partition(topics, published.topic, published.partition, published.offset + 1)
    record = next(r for r in records if r.offset == published.offset)
    assert record.key == b"NAMESPACE:gitlab-org"
    assert dict(record.headers)[EVENT_TYPE_HEADER] == b"ClaimCreated"
    assert record.value[:2] == b"\xc3\x01"
    decoded = EventCodec().decode(record.value)
    assert parse_event(decoded.payload, decoded.event_type) == event


async def test_events_of_one_key_keep_their_order_in_one_partition(topics: Settings) -> None:
    events = [
        ClaimCreated(source="c", bucket=ClaimBucket.USERNAME, value="ada", cell_id="cell-1",
                     owner_type=OwnerType.USER, owner_id=n)
        for n in range(20)
    ]
    async with EventPublisher(topics) as publisher:
        outcomes = [o async for o in publisher.publish_many(events)]
    assert len({o.partition for o in outcomes}) == 1  # type: ignore[union-attr]
    offsets = [o.offset for o in outcomes]  # type: ignore[union-attr]
    assert offsets == sorted(offsets) and len(set(offsets)) == 20


def test_emit_cli_prints_one_acknowledgement_per_event(topics: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lines = [
        json.dumps({"type": "CellRegistered", "source": "ops", "cell_id": "cell-9", "address": "https://c9.example.com",
                    "session_prefix": "c9", "region": "eu"}),
        json.dumps({"type": "ClaimCreated", "source": "cell-9", "bucket": "EMAIL", "value": "Ada@Example.com",
                    "cell_id": "cell-9", "owner_type": "USER", "owner_id": 1}),
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, "-m", "topology_store.cli", "emit", "--file", str(path)],
                          env=settings_env(topics), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["type"], r["status"]) for r in results] == [("CellRegistered", "acknowledged"), ("ClaimCreated", "acknowledged")]
    assert results[0]["topic"] == topics.cells_topic and results[1]["topic"] == topics.claims_topic
    assert all(isinstance(r["offset"], int) and r["offset"] >= 0 for r in results)


async def test_emit_cli_sends_nothing_when_any_line_is_invalid(topics: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = {"type": "CellRegistered", "source": "ops", "cell_id": "cell-8", "address": "https://c8.example.com",
            "session_prefix": "c8", "region": "eu"}
    bad = {"type": "ClaimCreated", "source": "cell-8", "bucket": "NAMESPACE", "value": "a/b", "cell_id": "cell-8",
           "owner_type": "GROUP"}
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\nnot json\n")
    done = subprocess.run([sys.executable, "-m", "topology_store.cli", "emit", "-f", str(path)],
                          env=settings_env(topics), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "line 2: ClaimCreated:" in done.stderr and "value" in done.stderr and "owner_id" in done.stderr
    assert "line 3: not JSON" in done.stderr
    assert "nothing was sent" in done.stderr
    assert await read_partition(topics, topics.cells_topic, 0, 1) == []


@pytest.mark.both_brokers
async def test_auto_idempotence_falls_back_only_when_the_broker_refuses(topics: Settings) -> None:
    async with EventPublisher(topics) as publisher:
        published = await publisher.publish(
            CellRegistered(source="ops", cell_id="cell-7", address="https://c7.example.com", session_prefix="c7", region="eu")
        )
    assert published.offset >= 0
    # Tansu refuses InitProducerId; a real Kafka grants it. Either way the event was acknowledged,
    # and with "on" the refusal is an error rather than a silent downgrade.
    if not publisher.idempotent:
        strict = EventPublisher(topics.model_copy(update={"producer_idempotence": "on"}))
        with pytest.raises(Exception):
            await strict.start()
        await strict.stop()
