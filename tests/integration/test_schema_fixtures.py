"""The current projector reads every shipped schema version: the encoded fixtures of
every version of every consumed event type go through the broker, the projector's
``read_record`` and its store on a real PostgreSQL, and each one is decided; none
becomes a dead letter."""

from __future__ import annotations

import json

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from tests.fixtures.make_event_fixtures import fixture_paths, sample_events
from tests.integration.test_projector import Member, wait_for
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.compatibility import load_versions
from topology_store.schemas.models import DECISION_EVENT_TYPES, parse_event

pytestmark = pytest.mark.integration


async def test_every_consumed_schema_version_is_decided_by_the_current_projector(topics: Settings) -> None:
    versions = load_versions()[0]
    order = [e.EVENT_TYPE for e in sample_events() if e.EVENT_TYPE not in DECISION_EVENT_TYPES]
    codec = EventCodec()
    published: dict[str, str] = {}  # event_id -> "Type.vN"
    producer = AIOKafkaProducer(bootstrap_servers=topics.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for event_type in order:
            for version in versions[event_type]:  # oldest first, as producers shipped them
                binary, _ = fixture_paths(event_type, version.number)
                value = binary.read_bytes()
                decoded = codec.decode(value)
                event = parse_event(decoded.payload, decoded.event_type)
                await producer.send_and_wait(topics.topic_for(event_type), value=value,
                                             key=event.partition_key.encode(), headers=[("event_type",
                                                                                         event_type.encode())])
                published[str(event.event_id)] = f"{event_type}.v{version.number}"
    finally:
        await producer.stop()
    assert len(published) == sum(len(versions[t]) for t in order) >= 14

    async with Member(topics):
        await wait_for(topics, "SELECT count(*) FROM processed_events", len(published))

    with psycopg.connect(topics.libpq_url) as conn:
        decided = {str(event_id): (outcome, reason) for event_id, outcome, reason in conn.execute(
            "SELECT event_id, outcome, reason FROM processed_events")}
        dead = conn.execute("SELECT error FROM dead_letters").fetchall()
    assert dead == []
    assert set(decided) == set(published)
    by_fixture = {published[event_id]: outcome for event_id, outcome in decided.items()}
    # The old ClaimCreated (before PACKAGE, IMAGE, ORGANIZATION_ID existed) claims; the
    # current one, same holder, changes nothing; the old release frees it; the current
    # one then has nothing to release.
    assert [by_fixture[f"ClaimCreated.v{n}"][0] for n in (1, 2)] == ["applied", "unchanged"]
    assert [by_fixture[f"ClaimReleased.v{n}"][0] for n in (1, 2)] == ["applied", "rejected"]
    assert by_fixture["CellRegistered.v1"][0] == "applied"
    assert by_fixture["ClaimsRequested.v1"][0] == "applied", json.dumps(by_fixture)
