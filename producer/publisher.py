"""Publishes events to Kafka and answers with their partition and offset once acknowledged.

Kafka key: the event's partition key (cell id, or ``bucket:value``), so every
event about one resource is totally ordered in one partition. Header
``event_type``: the event type, for tools that route without decoding; headers
``traceparent``/``tracestate``: the W3C trace context (adr/0011).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from uuid import UUID

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.partitioner import DefaultPartitioner
from opentelemetry.trace import SpanKind, Status, StatusCode

from topology_store.runtime.settings import Settings
from topology_store.runtime.tracing import inject_headers, trace_id_of, tracer
from topology_store.schemas.codec import EVENT_TYPE_HEADER, EventCodec
from topology_store.schemas.models import Event

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class Published:
    event_id: UUID
    event_type: str
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class EncodedRecord:
    """A record whose bytes were made elsewhere (the outbox relay's rows)."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


class PublishFailed(RuntimeError):
    """The broker did not acknowledge the event; it may or may not be in the log."""

    def __init__(self, event: Event, cause: BaseException) -> None:
        super().__init__(f"{event.EVENT_TYPE} {event.event_id} not acknowledged: {cause!r}")
        self.event = event
        self.cause = cause


class EventPublisher:
    """``async with EventPublisher(settings) as publisher: await publisher.publish(event)``."""

    def __init__(
        self,
        settings: Settings,
        codec: EventCodec | None = None,
        window: int = 1000,
        max_batch_bytes: int | None = None,
    ) -> None:
        self._settings = settings
        self._codec = codec or EventCodec()
        self._window = window
        self._max_batch_bytes = max_batch_bytes
        self._partitioner = DefaultPartitioner()
        self._producer: AIOKafkaProducer | None = None
        # Set by start(): whether the broker granted an idempotent producer, and the
        # producer id it assigned then (InitProducerId); adr/0002, adr/0016.
        self.idempotent = False
        self.producer_id: int | None = None

    def _new_producer(self, idempotent: bool) -> AIOKafkaProducer:
        sizing = {} if self._max_batch_bytes is None else {"max_batch_size": self._max_batch_bytes}
        return AIOKafkaProducer(
            bootstrap_servers=self._settings.kafka_bootstrap,
            acks="all",
            enable_idempotence=idempotent,
            linger_ms=self._settings.producer_linger_ms,
            request_timeout_ms=self._settings.producer_request_timeout_ms,
            compression_type="gzip",
            **sizing,
        )

    async def start(self) -> None:
        mode = self._settings.producer_idempotence
        if mode == "off":
            self._producer = self._new_producer(idempotent=False)
            await self._producer.start()
            return
        producer = self._new_producer(idempotent=True)
        try:
            await producer.start()
        except KafkaConnectionError:
            await producer.stop()
            raise
        except KafkaError as exc:
            await producer.stop()
            if mode == "on":
                raise
            # "auto" asks the broker rather than guessing it (adr/0016): Apache Kafka grants
            # a producer id; the embedded Tansu broker answers InitProducerId with an error.
            # Then plain acks=all: duplicates from retries are absorbed downstream by
            # event_id (adr/0002).
            log.warning("broker refused an idempotent producer (%r); publishing without idempotence", exc)
            producer = self._new_producer(idempotent=False)
            await producer.start()
        else:
            self.idempotent = True
            # aiokafka keeps the InitProducerId answer in its transaction manager.
            manager = getattr(producer, "_txn_manager", None)
            self.producer_id = getattr(manager, "producer_id", None)
            log.debug("idempotent producer (producer id %s)", self.producer_id)
        self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _record(
        self, event: Event, trace_headers: Sequence[tuple[str, bytes]] = (), trace_id: str | None = None
    ) -> tuple[str, bytes, bytes, list[tuple[str, bytes]]]:
        if trace_id is not None and event.trace_id is None:
            # The envelope names the trace too, for consumers that do not read headers.
            event = event.model_copy(update={"trace_id": trace_id})
        value = self._codec.encode(event.EVENT_TYPE, event.to_avro())
        return (
            self._settings.topic_for(event.EVENT_TYPE),
            event.partition_key.encode("utf-8"),
            value,
            [(EVENT_TYPE_HEADER, event.EVENT_TYPE.encode("ascii")), *trace_headers],
        )

    async def publish(self, event: Event) -> Published:
        """Publish one event; return only after the broker acknowledged it."""
        async for outcome in self.publish_many([event]):
            if isinstance(outcome, PublishFailed):
                raise outcome
            return outcome
        raise AssertionError("publish_many yields one outcome per event")

    async def publish_many(self, events: Iterable[Event]) -> AsyncIterator[Published | PublishFailed]:
        """Publish events in order, up to ``window`` in flight; yield one outcome per
        event, in input order, each only once its acknowledgement (or failure) is known.

        One producer span per call (a no-op without an OpenTelemetry SDK): its W3C
        context goes into every record's ``traceparent`` header and, unless the
        caller set one, the envelope's ``trace_id`` (runtime/tracing.py)."""
        producer = self._require_started()
        # Not made current: this is an async generator, and the caller's context must not change.
        span = tracer().start_span("topology publish", kind=SpanKind.PRODUCER,
                                   attributes={"messaging.system": "kafka", "messaging.operation.type": "send"})
        trace_headers, trace_id = inject_headers(span), trace_id_of(span)
        sent = failed = 0
        try:
            pending: list[tuple[Event, object]] = []
            for event in events:
                topic, key, value, headers = self._record(event, trace_headers, trace_id)
                try:
                    future = await producer.send(topic, value=value, key=key, headers=headers)
                except KafkaError as exc:
                    future = exc
                pending.append((event, future))
                sent += 1
                if len(pending) >= self._window:
                    for outcome in await _settle(pending):
                        failed += isinstance(outcome, PublishFailed)
                        yield outcome
                    pending = []
            for outcome in await _settle(pending):
                failed += isinstance(outcome, PublishFailed)
                yield outcome
        finally:
            span.set_attribute("messaging.batch.message_count", sent)
            if failed:
                span.set_status(Status(StatusCode.ERROR, f"{failed} of {sent} events not acknowledged"))
            span.end()

    async def partition_for(self, topic: str, key: bytes) -> int:
        """The partition ``publish`` would choose for ``key``: the Java client's murmur2 rule."""
        partitions = sorted(await self._require_started().partitions_for(topic))
        return int(self._partitioner(key, partitions, partitions))

    async def publish_encoded(self, records: Sequence[EncodedRecord]) -> list[KafkaError | None]:
        """Publish pre-encoded records; one outcome per record, in input order:
        ``None`` once acknowledged, else the error.

        Strict per-partition order, even across failures: a partition's records
        go out as record batches one at a time, each only after the previous one
        was acknowledged, and the first failure stops that partition, so the
        records after it are reported failed without ever being sent. A record
        is therefore never in the log unless every earlier record of its
        partition in this call was acknowledged (or was in its own, ambiguously
        failed, batch). Partitions proceed in parallel.
        """
        producer = self._require_started()
        outcomes: list[KafkaError | None] = [None] * len(records)
        partitions: dict[str, list[int] | KafkaError] = {}
        for topic in {record.topic for record in records}:
            try:
                partitions[topic] = sorted(await producer.partitions_for(topic))
            except KafkaError as exc:  # no metadata: every record of the topic fails alike
                partitions[topic] = exc
        chains: dict[tuple[str, int], list[int]] = {}
        for index, record in enumerate(records):
            known = partitions[record.topic]
            if isinstance(known, KafkaError):
                outcomes[index] = known
                continue
            partition = int(self._partitioner(record.key, known, known))
            chains.setdefault((record.topic, partition), []).append(index)

        async def send_chain(topic: str, partition: int, indexes: list[int]) -> None:
            position = 0
            while position < len(indexes):
                batch = producer.create_batch()
                taken = 0  # the first append always fits: aiokafka accepts one oversized record
                for index in indexes[position:]:
                    record = records[index]
                    if batch.append(key=record.key, value=record.value, timestamp=None,
                                    headers=list(record.headers)) is None:
                        break
                    taken += 1
                # Closed, so producer.send() from elsewhere cannot slip records into it.
                batch.close()
                try:
                    delivery = await producer.send_batch(batch, topic, partition=partition)
                    await delivery
                except KafkaError as exc:
                    for failed in indexes[position:]:
                        outcomes[failed] = exc
                    return
                position += taken

        await asyncio.gather(*(send_chain(topic, partition, indexes) for (topic, partition), indexes in chains.items()))
        return outcomes

    def _require_started(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("EventPublisher.start() was not called")
        return self._producer


async def _settle(pending: list[tuple[Event, object]]) -> list[Published | PublishFailed]:
    outcomes: list[Published | PublishFailed] = []
    for event, future in pending:
        if isinstance(future, BaseException):
            outcomes.append(PublishFailed(event, future))
            continue
        try:
            metadata = await future  # type: ignore[misc]
        except KafkaError as exc:
            outcomes.append(PublishFailed(event, exc))
            continue
        outcomes.append(
            Published(
                event_id=event.event_id,
                event_type=event.EVENT_TYPE,
                topic=metadata.topic,
                partition=metadata.partition,
                offset=metadata.offset,
            )
        )
    return outcomes
