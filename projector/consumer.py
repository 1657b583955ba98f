"""The Kafka adapter of the projector: a consumer-group member feeding batches to the store.

Offsets live in PostgreSQL, never in Kafka's commit log (adr/0002): on every
assignment the member seeks to the stored offsets, and each batch advances them
in the same transaction as the rows it produced. Auto-commit is off and nothing
is ever committed to Kafka, so a crash at any instant replays from the last
committed batch and the event_id record absorbs the redelivery.

Stored offsets and the log can disagree (adr/0019). Offsets moved backwards (an
operator reset) make the member read records again: the archive holds every record
ever applied, so those identical to their archived copy are skipped, and those that
differ (a topic recreated, another cluster) are never applied. A partition whose log
does not continue where its stored offset says (records deleted, a different record
at an archived offset) is *refused*: paused, named on ``/readyz`` with what fixes it,
and tried again with backoff, while the member's other partitions go on.

Rebalances run while the member awaits the database: a seek only ever touches a
partition still assigned in the same generation it was read for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import BrokerResponseError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord

from topology_store.core.fold import PositionedEvent
from topology_store.projector.archive import RawRecord, archive_ends, archived_bytes, archived_records, record_log_time
from topology_store.projector.health import Health
from topology_store.projector.metrics import PartitionProgress, ProjectorMetrics
from topology_store.projector.observe import apply_span, batch_committed, batch_failed, bounded_event_type
from topology_store.projector.poison import CommitOutcome, Position, is_transient, on_failure
from topology_store.projector.store import DeadLetter, FencedError, PartitionAdvance, ProjectionStore
from topology_store.runtime.retry import backoff, sleep_unless
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EVENT_TYPE_HEADER, DecodeError, EventCodec
from topology_store.schemas.models import EventInputError, parse_event

log = logging.getLogger(__name__)


# A refused partition is looked at again after a jittered backoff of at most this long,
# so an operator's fix (offsets set, the right cluster) is picked up without a restart.
LOOK_AGAIN_CAP_S = 30.0


class KafkaStartRefused(RuntimeError):
    """The broker answered the group join with an error that retrying cannot fix."""


def read_record(codec: EventCodec, settings: Settings, record: ConsumerRecord) -> PositionedEvent | DeadLetter:
    """Decode and validate one record, or explain why it is a dead letter."""
    try:
        log_time = record_log_time(record)
        if log_time is None:
            raise DecodeError(f"record timestamp {record.timestamp} ms is outside the years 1 to 9999")
        if record.value is None:
            raise DecodeError("record has no value (tombstone)")
        decoded = codec.decode(record.value)
        event = parse_event(decoded.payload, decoded.event_type)
        expected_topic = settings.topic_for(event.EVENT_TYPE)
        if record.topic != expected_topic:
            raise DecodeError(f"{event.EVENT_TYPE} belongs on {expected_topic}, not {record.topic}")
        if record.key != event.partition_key.encode("utf-8"):
            # A wrong key could put two events of one resource on two partitions,
            # where their order is lost.
            raise DecodeError(f"record key {record.key!r} is not the partition key {event.partition_key!r}")
    except (DecodeError, EventInputError) as exc:
        return DeadLetter.of(record, error=str(exc))
    return PositionedEvent(
        event=event,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        log_time=log_time,
    )


def _event_type_of(record: ConsumerRecord) -> str:
    for key, value in record.headers:
        if key == EVENT_TYPE_HEADER:
            return bounded_event_type(bytes(value).decode("ascii", "replace")[:64])
    return "unknown"


class LogRefused(RuntimeError):
    """A partition's log does not continue as its stored offset and the archive say it
    must; the message names the partition, the offsets and what fixes it."""


class LogGapError(LogRefused):
    """The log no longer holds the records at the stored offset: deleted, or the topic
    was recreated shorter."""


class LogRewrittenError(LogRefused):
    """The log holds a different record than the archive kept at the same offset."""


@dataclass
class Refusal:
    error: LogRefused
    attempts: int
    retry_at: float  # time.monotonic() of the next look
    looking: bool = False  # resumed for a look: its next records are checked again


def _name(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"


class _SeekToStoredOffsets(ConsumerRebalanceListener):
    def __init__(self, projector: Projector) -> None:
        self._projector = projector

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._projector.rebalances += 1
        for tp in revoked:
            self._projector.forget(tp)
        self._projector.metrics.assigned_partitions.set(len(self._projector.positions))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._projector.rebalances += 1
        for tp in assigned:
            self._projector.generations[tp] = self._projector.rebalances
        await self._projector.seek_to_stored(assigned)


class Projector:
    """Consumes both topics and commits one PostgreSQL transaction per batch."""

    def __init__(
        self,
        settings: Settings,
        store: ProjectionStore,
        metrics: ProjectorMetrics | None = None,
        codec: EventCodec | None = None,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._engine = store.engine  # the archive is read outside a batch's transaction (adr/0019)
        self.metrics = metrics or ProjectorMetrics()
        self.codec = codec or EventCodec()
        self.health = health or Health(self.metrics)
        self.stop_event: asyncio.Event | None = None  # set by run(); backoffs wake on it
        self.failures = 0  # consecutive failed attempts, for the backoff
        self.rebalances = 0  # bumped by every revoke/assign, to spot one during a commit
        # Next offset to read per owned partition, as committed in PostgreSQL.
        self.positions: dict[TopicPartition, int] = {}
        # The rebalance that assigned each owned partition: a seek prepared before a
        # revoke must not land after it (the partition may be another member's now).
        self.generations: dict[TopicPartition, int] = {}
        # Partitions whose stored offset is below the archive's end: records before it
        # were applied already and are compared with the archive, not applied again.
        self.archived_until: dict[TopicPartition, int] = {}
        self.refused: dict[TopicPartition, Refusal] = {}
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.consumer_group,
            enable_auto_commit=False,
            # Only used while a new assignment's seek to the stored offset is still
            # on its way; gaps against the stored offsets are caught in _commit.
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
            session_timeout_ms=settings.consumer_session_timeout_ms,
            heartbeat_interval_ms=settings.consumer_heartbeat_interval_ms,
            # A fetch returns as soon as records arrive on a partition it asks for, but
            # aiokafka leaves out of the next fetch the partitions whose records are still
            # buffered, and sends none while one is parked: a claim on such a partition
            # waits for the parked fetch. This bounds that wait (adr/0018).
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
        )
        self.metrics.watch_partitions(self.partition_progress)

    def partition_progress(self) -> list[PartitionProgress]:
        """Per owned partition: the committed next offset and the log end offset, for
        the lag metric. Runs on the metrics server's thread, at scrape time."""
        progress = []
        for tp, next_offset in dict(self.positions).items():
            try:
                # The high watermark of the last fetch response; correct on Apache
                # Kafka and, as measured, on Tansu too (unlike ListOffsets, adr/0011).
                end = self._consumer.highwater(tp)
            except Exception:  # noqa: BLE001 - revoked meanwhile: no end offset to report
                end = None
            progress.append(PartitionProgress(tp.topic, tp.partition, next_offset, end))
        return progress

    def forget(self, tp: TopicPartition) -> None:
        """``tp`` is no longer this member's."""
        self.positions.pop(tp, None)
        self.generations.pop(tp, None)
        self.archived_until.pop(tp, None)
        if self.refused.pop(tp, None) is not None:
            self.health.partition_resumed(_name(tp))  # its new owner looks again

    def _seek(self, tp: TopicPartition, offset: int) -> bool:
        """Seek ``tp``, or forget it when a rebalance took it meanwhile (False)."""
        try:
            self._consumer.seek(tp, offset)
        except IllegalStateError:
            self.forget(tp)
            return False
        return True

    async def seek_to_stored(self, partitions: Sequence[TopicPartition]) -> None:
        """Seek ``partitions`` to their stored offsets. A rebalance may run while the
        database answers: a partition revoked meanwhile (or revoked and assigned again,
        whose listener seeks it itself) is left alone."""
        generations = {tp: self.generations.get(tp) for tp in partitions}
        keys = [(tp.topic, tp.partition) for tp in partitions]

        async def read() -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
            stored = await self.store.stored_offsets(keys)
            return stored, await archive_ends(self._engine, keys)

        stored, archived = await _retry_database(read, self.metrics, self.health, self.stop_event)
        sought = {}
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if generations[tp] is None or self.generations.get(tp) != generations[tp]:
                continue
            offset = stored[key]
            if not self._seek(tp, offset):
                continue
            self.positions[tp] = sought[_name(tp)] = offset
            if archived[key] > offset:
                self.archived_until[tp] = archived[key]
                log.warning("%s: the stored offset %d is behind the archive, which holds records up to %d: the "
                            "offsets moved backwards; records read again are compared with the archive and skipped "
                            "when identical", _name(tp), offset, archived[key] - 1)
            else:
                self.archived_until.pop(tp, None)
        self.metrics.assigned_partitions.set(len(self.positions))
        log.info("assigned %s", sought)

    def rewind(self) -> None:
        """Seek every owned partition back to its committed position: the batch is read again."""
        for tp, position in list(self.positions.items()):
            self._seek(tp, position)

    def refuse(self, tp: TopicPartition, error: LogRefused) -> None:
        """Stop projecting ``tp`` until a later look finds its log as expected."""
        previous = self.refused.get(tp)
        attempts = previous.attempts + 1 if previous else 1
        delay = max(1.0, backoff(attempts, base=1.0, cap=LOOK_AGAIN_CAP_S))
        self.refused[tp] = Refusal(error, attempts, time.monotonic() + delay)
        self.health.partition_refused(_name(tp), str(error))
        try:
            self._consumer.pause(tp)
        except IllegalStateError:
            self.forget(tp)  # revoked meanwhile: its new owner looks for itself
            return
        log.error("partition refused: %s (looking again in %.0fs)", error, delay,
                  extra={"topic": tp.topic, "partition": tp.partition})

    async def _look_again(self) -> None:
        """Refused partitions whose time came: seek to what is stored now and read again."""
        now = time.monotonic()
        # Not those being looked at: a second seek would drop what their fetch brings.
        due = [tp for tp, refusal in self.refused.items() if not refusal.looking and refusal.retry_at <= now]
        if not due:
            return
        await self.seek_to_stored(due)
        for tp in due:
            if tp in self.positions and tp in self.refused:
                try:
                    self._consumer.resume(tp)
                except IllegalStateError:
                    self.forget(tp)
                    continue
                self.refused[tp].looking = True

    def _resume_caught_up(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """A partition looked at again with nothing left to read (its stored offset was
        set to the log's end) is no longer refused: there is nothing to disagree with."""
        for tp, refusal in list(self.refused.items()):
            if refusal.looking and not batch.get(tp) and tp in self.positions:
                try:
                    end = self._consumer.highwater(tp)
                except IllegalStateError:
                    continue
                # Equal, not beyond: a stored offset past the log's end is a log that restarted.
                if end is not None and end == self.positions[tp]:
                    self._resumed(tp)

    def _resumed(self, tp: TopicPartition) -> None:
        if self.refused.pop(tp, None) is not None:
            self.health.partition_resumed(_name(tp))

    async def _start_consumer(self, stop: asyncio.Event) -> bool:
        """Join the group; an unreachable broker is retried with capped exponential
        backoff and jitter until it answers (True) or ``stop`` is set (False)."""
        attempt = 0
        while not stop.is_set():
            try:
                await self._consumer.start()
            except KafkaError as exc:
                if isinstance(exc, BrokerResponseError) and not exc.retriable:
                    # The broker answered, with an error retrying cannot fix (a session timeout
                    # out of its bounds, say): say so rather than retry for ever (a second
                    # start() on a half-started consumer hides the cause). Timeouts and lost
                    # connections are not answers: those are retried.
                    raise KafkaStartRefused(f"the broker refused the consumer group join: {exc!r}") from exc
                attempt += 1
                self.health.broker_failed(exc)
                delay = backoff(attempt)
                log.error("broker unreachable (%s); retrying in %.1fs", type(exc).__name__, delay)
                await sleep_unless(stop, delay)
            else:
                self.health.broker_ok()
                return True
        return False

    async def run(self, stop: asyncio.Event) -> None:
        self.stop_event = stop
        self._consumer.subscribe(list(self.settings.topics), listener=_SeekToStoredOffsets(self))
        try:
            started = await self._start_consumer(stop)
            while started and not stop.is_set():
                if self.refused:
                    await self._look_again()
                try:
                    batch = await self._consumer.getmany(
                        timeout_ms=self.settings.batch_wait_ms, max_records=self.settings.batch_max_events
                    )
                except KafkaError as exc:  # aiokafka retries connections itself; this is what it gave up on
                    self.health.broker_failed(exc)
                    self.failures += 1
                    await sleep_unless(stop, backoff(self.failures))
                    continue
                if self.refused:
                    self._resume_caught_up(batch)
                if batch:
                    with apply_span(self.settings, batch):  # W3C trace context from the headers (adr/0011)
                        await self._commit(batch)
        finally:
            # Leaves the group, so the partitions move at once rather than after the
            # session timeout; bounded, since a LeaveGroup to a dead broker never returns.
            try:
                await asyncio.wait_for(self._consumer.stop(), self.settings.shutdown_timeout_s)
            except TimeoutError:
                log.warning("consumer did not stop within %.0fs; leaving the group to the session timeout",
                            self.settings.shutdown_timeout_s)

    async def _commit(
        self,
        batch: dict[TopicPartition, list[ConsumerRecord]],
        isolating: bool = False,
        poisoned: dict[Position, str] | None = None,
    ) -> CommitOutcome:
        """Commit one batch. ``poisoned`` names records to dead-letter instead of
        applying, and ``isolating`` returns a deterministic failure to the caller
        (projector/poison.py) instead of handling it."""
        rebalances = self.rebalances
        events: list[PositionedEvent] = []
        dead: list[DeadLetter] = []
        archive: list[RawRecord] = []
        advances: dict[tuple[str, int], PartitionAdvance] = {}
        for tp, fetched in batch.items():
            position = self.positions.get(tp)
            refusal = self.refused.get(tp)
            if position is None or (refusal is not None and not refusal.looking) or not fetched:
                continue  # revoked while the fetch was in flight, or refused
            try:
                records = await self._unapplied(tp, position, fetched)
            except LogRefused as exc:
                self.refuse(tp, exc)
                continue
            for record in records:
                archive.append(RawRecord.of(record))  # every record, byte for byte, whatever it holds
                item = read_record(self.codec, self.settings, record)
                if poisoned and (record.topic, record.partition, record.offset) in poisoned:
                    item = DeadLetter.of(record, error=poisoned[(record.topic, record.partition, record.offset)])
                if isinstance(item, DeadLetter):
                    log.error(
                        "dead letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, item.error,
                        extra={"topic": record.topic, "partition": record.partition, "offset": record.offset,
                               "event_type": _event_type_of(record)},
                    )
                    self.metrics.events.labels(_event_type_of(record), "dead_lettered").inc()
                    dead.append(item)
                else:
                    events.append(item)
            advances[(tp.topic, tp.partition)] = PartitionAdvance(
                expected=position, next_offset=fetched[-1].offset + 1
            )
        if not advances:
            return "committed"
        started = time.perf_counter()
        try:
            committed = await self.store.commit_batch(events, dead, advances, archive)
        except FencedError as exc:
            # Another member committed these partitions meanwhile: what we read is
            # stale. Start again from what is stored.
            log.warning("%s; reloading stored offsets", exc)
            batch_failed(exc)
            self.metrics.fenced.inc()
            await self.seek_to_stored(list(self.positions))
            return "abandoned"
        except Exception as exc:  # noqa: BLE001 - sorted by projector/poison.py: transient, or a poisonous record
            batch_failed(exc)
            if isolating and not is_transient(exc):
                return exc
            await on_failure(self, batch, exc)
            return "abandoned"
        elapsed = time.perf_counter() - started
        self.failures = 0
        self.health.database_ok()
        # A rebalance during the commit re-read the positions from the database (maybe
        # before this commit landed): keep those; a stale one is fenced next batch.
        if self.rebalances == rebalances:
            for (topic, partition), advance in advances.items():
                tp = TopicPartition(topic, partition)
                self.positions[tp] = advance.next_offset
                if self.archived_until.get(tp, 0) <= advance.next_offset:
                    self.archived_until.pop(tp, None)
                self._resumed(tp)
        self.metrics.commit_seconds.observe(elapsed)
        self.metrics.batch_size.observe(len(events) + len(dead))
        self.metrics.version.set(committed.version)
        self.metrics.mark_commit()
        counts = Counter((p.event.EVENT_TYPE, d.outcome.value) for p, d in committed.result.decisions)
        for (event_type, outcome), count in counts.items():
            self.metrics.events.labels(event_type, outcome).inc(count)
        batch_committed(committed.version, committed.result.decisions, len(dead), advances)
        return "committed"


    async def _unapplied(self, tp: TopicPartition, position: int,
                         records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        """The records of a batch still to apply: all of them, unless the stored offset
        moved backwards, when those the archive already holds byte for byte are skipped.
        Raises :class:`LogRefused` when the log does not continue as it must."""
        first = records[0].offset
        archived_until = self.archived_until.get(tp, 0)
        # Our topics are neither compacted nor transactional, so the log is contiguous:
        # a different first offset means records were deleted (retention) or the topic
        # was recreated and the broker reset us. Projecting on would silently build a
        # different history. A gap the archive covers was applied already: no loss.
        if first < position:
            raise LogGapError(
                f"{_name(tp)}: the stored offset is {position} but the log restarts at {first}: the topic was "
                "recreated (or this is another cluster); the archive keeps the history this projection was built "
                "from. Point TOPOLOGY_KAFKA_BOOTSTRAP at the cluster that wrote it, or give the new topic a new "
                "name (TOPOLOGY_*_TOPIC) and restart (docs/reliability.md)"
            )
        if first > position and first > archived_until:
            raise LogGapError(
                f"{_name(tp)}: the stored offset is {position} but the log continues at {first}: the records "
                f"between were deleted (retention) before this projection read them. To skip them deliberately: "
                f"UPDATE partition_offsets SET next_offset = {first} WHERE topic = '{tp.topic}' AND partition = "
                f"{tp.partition}; then the projector goes on by itself (docs/reliability.md)"
            )
        if first >= archived_until:
            return records
        again = [r for r in records if r.offset < archived_until]
        archived = await _retry_database(
            lambda: archived_records(self._engine, tp.topic, tp.partition, first, again[-1].offset + 1),
            self.metrics, self.health, self.stop_event,
        )
        for record in again:
            if archived.get(record.offset) != archived_bytes(RawRecord.of(record)):
                raise LogRewrittenError(
                    f"{_name(tp)}: offset {record.offset} holds a different record than the archive kept there: "
                    "the topic was recreated (or this is another cluster) behind offsets moved backwards. Nothing "
                    "of it was applied and the archive keeps the first record. Point TOPOLOGY_KAFKA_BOOTSTRAP at "
                    "the cluster that wrote the archive, or give the new topic a new name (TOPOLOGY_*_TOPIC) and "
                    "restart (docs/reliability.md)"
                )
        self.metrics.reread.inc(len(again))
        log.warning("%s: %d records at offsets %d to %d read again are identical to the archive: skipped",
                    _name(tp), len(again), first, again[-1].offset)
        return records[len(again):]


async def _retry_database(  # type: ignore[no-untyped-def]
    operation, metrics: ProjectorMetrics, health: Health | None = None, stop: asyncio.Event | None = None
):
    """Run ``operation`` until the database answers; transient failures are retried
    with capped exponential backoff and jitter, others raised. Gives up when
    ``stop`` is set (shutting down), so a SIGTERM never waits for PostgreSQL."""
    attempt = 0
    while True:
        try:
            result = await operation()
        except Exception as exc:
            if not is_transient(exc) or (stop is not None and stop.is_set()):
                raise
            attempt += 1
            metrics.database_errors.inc()
            if health is not None:
                health.database_failed(exc)
            delay = backoff(attempt)
            log.error("database unavailable (%s); retrying in %.1fs", exc.__class__.__name__, delay)
            await sleep_unless(stop, delay)
        else:
            if health is not None:
                health.database_ok()
            return result
