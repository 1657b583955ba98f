"""Observability on the real broker and database (adr/0011): the projector's
consumer lag from fetch high watermarks, W3C trace context from a publish to the
projector's apply span, and JSON logs that never show an e-mail or a token."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import topology_store.runtime.tracing
from tests.integration.processes import read_api, start, stop, wait_until
from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.projector.consumer import Projector
from topology_store.projector.metrics import ProjectorMetrics
from topology_store.projector.store import ProjectionStore
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.models import ClaimBucket, ClaimCreated, OwnerType

pytestmark = pytest.mark.integration


def claim(value: str, bucket: ClaimBucket = ClaimBucket.NAMESPACE) -> ClaimCreated:
    return ClaimCreated(source="cell-1", bucket=bucket, value=value, cell_id="cell-1",
                        owner_type=OwnerType.GROUP, owner_id=7)


def count(settings: Settings, query: str) -> int:
    with psycopg.connect(settings.libpq_url) as conn:
        row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0


async def eventually(check, timeout_s: float = 30, what: str = "condition"):  # type: ignore[no-untyped-def]
    last = None
    for _ in range(int(timeout_s / 0.05)):
        last = check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Member:
    """One projector in this process, with its own metrics registry."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ProjectorMetrics()
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Member:
        self.engine = create_engine(self.settings.sqlalchemy_url)
        self.projector = Projector(self.settings, ProjectionStore(self.engine, self.settings.claim_secret), self.metrics)
        self.task = asyncio.create_task(self.projector.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await self.task
        await self.engine.dispose()

    def sample(self, name: str, topic: str, partition: int) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"topic": topic, "partition": str(partition)})


@pytest.mark.both_brokers
async def test_consumer_lag_is_the_high_watermark_minus_the_offset_stored_in_postgres(topics: Settings) -> None:
    settings = topics
    partitions = range(settings.claims_partitions)
    async with Member(settings) as member:
        await eventually(lambda: {tp.topic for tp in member.projector.positions} == set(settings.topics),
                         what="partitions assigned and sought")
        # Hold back every commit: the batch transaction waits for this lock (reads still pass).
        async with await psycopg.AsyncConnection.connect(settings.libpq_url) as blocker:
            await blocker.execute("LOCK TABLE partition_offsets IN EXCLUSIVE MODE")
            async with EventPublisher(settings) as publisher:  # gzip, linger: multi-record batches
                outcomes = [o async for o in publisher.publish_many([claim(f"lag-{n}") for n in range(150)])]
            assert not any(isinstance(o, PublishFailed) for o in outcomes)
            # The log end per partition, from the broker's acknowledgements (never from ListOffsets).
            ends = {p: 0 for p in partitions}
            for published in outcomes:
                ends[published.partition] = max(ends[published.partition], published.offset + 1)
            assert sum(ends.values()) == 150

            def lag_seen() -> bool:
                return all(member.sample("topology_projector_consumer_lag_records", settings.claims_topic, p) == ends[p]
                           for p in partitions)

            await eventually(lag_seen, what="lag = acknowledged records per partition")
            for p in partitions:
                assert member.sample("topology_projector_log_end_offset", settings.claims_topic, p) == ends[p]
                assert member.sample("topology_projector_next_offset", settings.claims_topic, p) == 0
            assert member.metrics.registry.get_sample_value("topology_projector_last_commit_timestamp_seconds") == 0
            await blocker.rollback()

        await eventually(lambda: count(settings, "SELECT count(*) FROM processed_events") == 150, what="applied")
        await eventually(lambda: all(member.sample("topology_projector_consumer_lag_records", settings.claims_topic, p) == 0
                                     for p in partitions), what="lag back to 0")
        for p in partitions:
            assert member.sample("topology_projector_next_offset", settings.claims_topic, p) == ends[p]
        since = member.metrics.registry.get_sample_value("topology_projector_seconds_since_last_commit")
        assert since is not None and 0 <= since < 10
        applied = member.metrics.registry.get_sample_value(
            "topology_projector_events_total", {"event_type": "ClaimCreated", "outcome": "applied"})
        assert applied == 150


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> tuple[TracerProvider, InMemorySpanExporter]:
    """The project's tracer backed by an SDK provider with an in-memory exporter
    (the global provider stays untouched for the other tests)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(topology_store.runtime.tracing, "_tracer", provider.get_tracer(topology_store.runtime.tracing.TRACER_NAME))
    return provider, exporter


async def test_a_trace_around_a_publish_continues_in_the_projectors_apply_span(
    topics: Settings, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    event = claim("traced-group")
    with provider.get_tracer("monolith").start_as_current_span("create group") as root:
        async with EventPublisher(topics) as publisher:
            published = await publisher.publish(event)
    trace_id = root.get_span_context().trace_id

    # On the wire: the traceparent header (next to event_type) and the envelope's trace_id.
    consumer = AIOKafkaConsumer(bootstrap_servers=topics.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(published.topic, published.partition)
        consumer.assign([tp])
        consumer.seek(tp, published.offset)
        record = (await consumer.getmany(tp, timeout_ms=10_000))[tp][0]
    finally:
        await consumer.stop()
    headers = dict(record.headers)
    assert headers["event_type"] == b"ClaimCreated"
    version, header_trace, parent_span, flags = headers["traceparent"].decode().split("-")
    assert (version, int(header_trace, 16)) == ("00", trace_id)
    assert int(flags, 16) & 1  # sampled
    assert EventCodec().decode(record.value).payload["trace_id"] == header_trace

    async with Member(topics):
        await eventually(lambda: count(topics, "SELECT count(*) FROM processed_events") == 1, what="applied")
        await eventually(lambda: any(s.name == "topology apply" and "topology.version" in s.attributes
                                     for s in exporter.get_finished_spans()), what="apply span ended")

    finished = exporter.get_finished_spans()
    publish = next(s for s in finished if s.name == "topology publish")
    # The batch that committed (a fetch that raced the assignment may have been dropped before it).
    [apply] = [s for s in finished if s.name == "topology apply" and "topology.version" in s.attributes]
    assert publish.kind is SpanKind.PRODUCER and publish.parent is not None
    assert publish.parent.span_id == root.get_span_context().span_id
    assert format(publish.context.span_id, "016x") == parent_span
    # Continued: same trace, a child of the publish span, and linked to it.
    assert apply.kind is SpanKind.CONSUMER
    assert apply.context.trace_id == trace_id
    assert apply.parent is not None and apply.parent.span_id == publish.context.span_id
    assert [link.context.span_id for link in apply.links] == [publish.context.span_id]
    assert apply.attributes["messaging.batch.message_count"] == 1
    assert apply.attributes["topology.version"] >= 1


EMAILS = ("Ada.Lovelace@Example.com", "grace.hopper@example.org")


def _log_lines(path: Path) -> list[dict[str, object]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"{path.name}: not a JSON log line: {line[:300]}") from None
    return parsed


async def test_logs_are_json_and_never_show_an_email_or_a_token(topics: Settings, tmp_path: Path) -> None:
    """The real processes at DEBUG, driven through paths that see e-mails and
    tokens: dead letters whose key holds an e-mail, claim requests for e-mails,
    e-mail lookups in the access log, and requests with wrong or leaked tokens."""
    # One token for every scope the API knows (routing data, claims, audit), so the calls pass.
    token = f"observability-test-token-{uuid.uuid4().hex}"
    tokens = json.dumps({token: ["snapshot:read", "claims:read", "claims:write", "audit:read"]})
    settings = topics.model_copy(update={"api_access_log": True, "decision_wait_s": 10.0, "api_tokens": tokens})
    auth = {"Authorization": f"Bearer {token}"}
    wrong_token = f"wrong-token-{uuid.uuid4().hex}"
    projector_log, api_log = tmp_path / "projector.log", tmp_path / "api.log"
    projector = start(["-v", "project"], settings, projector_log, TOPOLOGY_LOG_FORMAT="json")
    try:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            good = claim(EMAILS[0].lower(), ClaimBucket.EMAIL)
            value = EventCodec().encode("ClaimCreated", good.to_avro())
            # Key not the canonical partition key: a dead letter whose error quotes the key.
            await producer.send_and_wait(settings.claims_topic, value=value, key=f"EMAIL:{EMAILS[0]}".encode(),
                                         partition=0)
            await producer.send_and_wait(settings.claims_topic, value=f"garbage {EMAILS[1]}".encode(),
                                         key=EMAILS[1].encode(), partition=0)
        finally:
            await producer.stop()
        with read_api(settings, api_log) as url:
            async with httpx.AsyncClient(base_url=url, timeout=20, headers=auth) as client:
                begin = await client.post("/v1/claims", json={
                    "cell_id": "cell-1", "owner_type": "USER", "owner_id": 42,
                    "claims": [{"bucket": "EMAIL", "value": EMAILS[1]}, {"bucket": "USERNAME", "value": "grace"}],
                })
                assert begin.status_code == 201, begin.text
                again = await client.post("/v1/claims", json={
                    "cell_id": "cell-2", "owner_type": "USER", "owner_id": 43,
                    "claims": [{"bucket": "EMAIL", "value": EMAILS[1].upper()}],
                })
                assert again.status_code == 409, again.text
                for path in (f"/v1/claims/EMAIL/{EMAILS[0]}", f"/v1/claims/EMAIL/{EMAILS[1].replace('@', '%40')}"):
                    assert (await client.get(path)).status_code in (200, 404)
                denied = await client.get("/v1/snapshot", headers={"Authorization": f"Bearer {wrong_token}"})
                assert denied.status_code == 401
                # A client that puts a real token in the query string: the access log must not show it.
                leaked = await client.get(f"/v1/snapshot?access_token={token}")
                assert leaked.status_code == 200
        wait_until(lambda: count(settings, "SELECT count(*) FROM dead_letters") == 2, timeout_s=30, what="dead letters")
    finally:
        assert stop(projector) == 0

    projector_lines, api_lines = _log_lines(projector_log), _log_lines(api_log)
    everything = (projector_log.read_text() + api_log.read_text()).lower()
    for email in EMAILS:
        for form in (email.lower(), email.lower().replace("@", "%40")):
            assert form not in everything, f"{form} in a log line"
    for secret in (wrong_token, token):
        assert secret.lower() not in everything

    dead = [line for line in projector_lines if str(line["message"]).startswith("dead letter")]
    assert len(dead) == 2 and all(line["level"] == "error" for line in dead)
    assert sorted(int(line["offset"]) for line in dead) == [0, 1]  # type: ignore[call-overload]
    assert {(line["topic"], line["partition"]) for line in dead} == {(settings.claims_topic, 0)}
    assert "<email:redacted>" in str(dead[0]["message"]) + str(dead[1]["message"])
    rejected = [line for line in projector_lines if str(line["message"]).startswith("event rejected")]
    assert any(line.get("event_type") == "ClaimsRequested" and line.get("event_id") for line in rejected)
    access = [str(line["message"]) for line in api_lines if line["logger"] == "uvicorn.access"]
    assert any("/v1/claims/EMAIL/<email:redacted>" in message for message in access), access
    assert any("access_token=<redacted>" in message for message in access), access
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in projector_lines + api_lines)
