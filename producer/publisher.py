"""Publishes events to Kafka and answers with their partition and offset once acknowledged.

Kafka key: the event's partition key (cell id, or ``bucket:value``), so every
event about one resource is totally ordered in one partition. Header
``event_type``: the event type, for tools that route without decoding; headers
``traceparent``/``tracestate``: the W3C trace context (adr/0011).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from uuid import UUID

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import RecordMetadata
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
        compress: bool = True,
    ) -> None:
        """``compress``: gzip the record batches (False: a caller that publishes one small
        record at a time and waits for it, where gzip costs CPU here and in the broker, which
        decompresses to validate, and saves nothing)."""
        self._settings = settings
        self._compression = "gzip" if compress else None
        self._codec = codec or EventCodec()
        self._window = window
        self._max_batch_bytes = max_batch_bytes
        self._partitioner = DefaultPartitioner()
        self._producer: AIOKafkaProducer | None = None
        # Set by start(): whether the broker granted an idempotent producer, and the
        # producer id it assigned then (InitProducerId); adr/0002, adr/0016.
        self.idempotent = False
        self.producer_id: int | None = None
        # An acknowledgement wait of the idempotent producer ran out: replace the producer
        # before the next publish (see _acknowledged).
        self._stuck = False

    def _new_producer(self, idempotent: bool) -> AIOKafkaProducer:
        sizing = {} if self._max_batch_bytes is None else {"max_batch_size": self._max_batch_bytes}
        return AIOKafkaProducer(
            bootstrap_servers=self._settings.kafka_bootstrap,
            acks="all",
            enable_idempotence=idempotent,
            linger_ms=self._settings.producer_linger_ms,
            request_timeout_ms=self._settings.producer_request_timeout_ms,
            compression_type=self._compression,
            **sizing,
        )

    @property
    def patience_s(self) -> float:
        """How long an acknowledgement may take: what aiokafka grants a plain producer's
        batch (``request_timeout_ms`` in the accumulator, then as much for the request)."""
        return (2 * self._settings.producer_request_timeout_ms + self._settings.producer_linger_ms) / 1000

    async def start(self) -> None:
        mode = self._settings.producer_idempotence
        self.idempotent, self.producer_id = False, None
        if mode == "off":
            producer = self._new_producer(idempotent=False)
            await producer.start()
            self._producer, self._stuck = producer, False
            return
        producer = self._new_producer(idempotent=True)
        try:
            # aiokafka asks for a producer id until it gets one: a broker that takes
            # connections but does not answer (frozen, overloaded) would hold start() for ever.
            await asyncio.wait_for(producer.start(), max(10.0, self.patience_s))
        except TimeoutError:
            await _abandon(producer, KafkaTimeoutError("no producer id"))
            raise KafkaTimeoutError(f"the broker assigned no producer id within {max(10.0, self.patience_s):g}s") from None
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
        self._producer, self._stuck = producer, False

    async def stop(self) -> None:
        """Flush and close; records still unacknowledged after ``patience_s`` fail."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        if self._stuck:
            await _abandon(producer, KafkaTimeoutError("publisher stopped"))
            return
        try:
            # A plain producer's flush ends by itself; an idempotent one's waits for the broker.
            await asyncio.wait_for(producer.stop(), self.patience_s + 1)
        except TimeoutError:
            log.warning("records still unacknowledged after %.1fs at stop; abandoning them", self.patience_s)
            await _abandon(producer, KafkaTimeoutError("publisher stopped"))

    async def _ready(self) -> AIOKafkaProducer:
        """The producer to publish with: a new one after an idempotent producer got stuck
        (until a replacement starts, every publish fails with the reason it did not)."""
        if self._stuck:
            if self._producer is not None:
                stuck, self._producer = self._producer, None
                await _abandon(stuck, KafkaTimeoutError("producer replaced"))
                log.warning("replacing the idempotent producer: a batch went unacknowledged for %.1fs",
                            self.patience_s)
            await self.start()
        return self._require_started()

    async def _acknowledged(self, future: asyncio.Future[RecordMetadata], deadline: float) -> RecordMetadata:
        """The acknowledgement of one send, or a KafkaError. A plain producer gives a batch
        up after ``request_timeout_ms`` by itself. aiokafka's idempotent producer never
        does (no delivery timeout: it retries until the broker answers, adr/0016), so its
        wait is bounded here alike, and a producer that ran out is replaced before the
        next publish: its stuck batches would hold every later one of their partition."""
        if not self.idempotent:
            return await future
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self._stuck = True
            future.add_done_callback(_retrieve)  # it fails once the producer is abandoned
            raise KafkaTimeoutError(f"not acknowledged within {self.patience_s:g}s") from None

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
        # Not made current: this is an async generator, and the caller's context must not change.
        span = tracer().start_span("topology publish", kind=SpanKind.PRODUCER,
                                   attributes={"messaging.system": "kafka", "messaging.operation.type": "send"})
        trace_headers, trace_id = inject_headers(span), trace_id_of(span)
        sent = failed = 0
        try:
            try:
                producer: AIOKafkaProducer | KafkaError = await self._ready()
            except KafkaError as exc:  # a replacement producer could not start: every event fails
                producer = exc
            pending: list[tuple[Event, object, float]] = []
            for event in events:
                topic, key, value, headers = self._record(event, trace_headers, trace_id)
                try:
                    if isinstance(producer, KafkaError):
                        raise producer
                    future = await producer.send(topic, value=value, key=key, headers=headers)
                except KafkaError as exc:
                    future = exc
                pending.append((event, future, time.monotonic() + self.patience_s))
                sent += 1
                if len(pending) >= self._window:
                    for outcome in await self._settle(pending):
                        failed += isinstance(outcome, PublishFailed)
                        yield outcome
                    pending = []
            for outcome in await self._settle(pending):
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
        try:
            producer = await self._ready()
        except KafkaError as exc:  # a replacement producer could not start: every record fails
            return [exc] * len(records)
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
                    await self._acknowledged(delivery, time.monotonic() + self.patience_s)
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

    async def _settle(self, pending: list[tuple[Event, object, float]]) -> list[Published | PublishFailed]:
        outcomes: list[Published | PublishFailed] = []
        for event, future, deadline in pending:
            if isinstance(future, BaseException):
                outcomes.append(PublishFailed(event, future))
                continue
            try:
                metadata = await self._acknowledged(future, deadline)  # type: ignore[arg-type]
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


def _retrieve(future: asyncio.Future[RecordMetadata]) -> None:
    """Take a given-up future's outcome, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


async def _abandon(producer: AIOKafkaProducer, reason: KafkaError) -> None:
    """Close ``producer`` without waiting for its unacknowledged batches, which fail with
    ``reason``. Reaches into aiokafka (0.14): its stop() waits for every batch, and an
    idempotent producer retries a batch for as long as the broker does not answer."""
    producer._closed = True  # a later stop() is then a no-op
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait([task])
    accumulator = getattr(producer, "_message_accumulator", None)
    if accumulator is not None:
        accumulator.fail_all(reason)
    await producer.client.close()
