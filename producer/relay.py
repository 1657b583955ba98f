"""``topology relay``: publish a transactional outbox to Kafka (adr/0008).

One round: read the oldest unpublished rows (``ORDER BY id LIMIT batch``),
publish them, wait for every acknowledgement, then mark the acknowledged rows
published (or delete them), all while holding a session-level advisory lock on
the outbox database. Consequences, each relied on:

- At least once: a row is marked only after the broker acknowledged it, so a
  crash between publish and mark republishes it; the projector's event_id
  record absorbs the duplicate.
- No high-water mark: the relay never remembers "done up to id N", it asks for
  unpublished rows every round, so a row whose transaction commits late with a
  small id is picked up by the next round instead of being skipped.
- Per-key order: the writer's trigger makes per-key id order equal commit order
  (``outbox.sql``); ``EventPublisher.publish_encoded`` never lets a record of a
  partition reach the broker unless the earlier ones were acknowledged; and a
  relay that takes over republishes every unmarked row in id order first. Of the
  copies in the log, the first occurrences are therefore always in id order.
- One active relay: ``pg_try_advisory_lock`` on the outbox database. Reads,
  marks and the lock share one session, so a relay whose session died (and so
  lost the lock) cannot mark anything any more.
- JSON rows (``payload_json``): validated and encoded here exactly as ``topology
  emit`` would (``emit.event_from_json``). A row that is no valid event, or whose
  event's key is not the row's ``partition_key`` (the key its writer locked), is
  marked ``failed_at``/``error`` before the round publishes, counted, and never
  read again until an operator clears it; the rows behind it, of its key too, go
  on (producer/README.md: "JSON rows").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from aiokafka.errors import KafkaError
from prometheus_client import start_http_server
from psycopg.rows import TupleRow

from topology_store.producer.emit import event_from_json
from topology_store.producer.outbox import OUTBOX_CHANNEL
from topology_store.producer.publisher import EncodedRecord, EventPublisher
from topology_store.producer.relay_metrics import RelayMetrics
from topology_store.runtime.retry import backoff, sleep_unless
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics
from topology_store.schemas.codec import EVENT_TYPE_HEADER, EventCodec
from topology_store.schemas.models import EventInputError

log = logging.getLogger(__name__)

# Two-int advisory key space: never collides with an application's bigint keys.
# (1953460335, *) are the writers' per-key locks, (1953460336, 1) the DDL's.
RELAY_LOCK = (1953460336, 0)

# One record batch per partition and round in the common case; well under the
# broker's default 1 MiB message.max.bytes even before compression.
RELAY_BATCH_BYTES = 512 * 1024

# The lock is released only when the server notices the session is gone; for a
# relay host that vanished without closing its socket that is the TCP keepalive
# (2 hours by default). These bound a failover to roughly half a minute.
_SESSION_SETTINGS = (
    "SET tcp_keepalives_idle = 10",
    "SET tcp_keepalives_interval = 5",
    "SET tcp_keepalives_count = 3",
    "SET tcp_user_timeout = 30000",
)

# Failed rows are skipped, never retried by a round: only an operator clears failed_at.
_FETCH = (
    "SELECT id, event_type, partition_key, payload, headers, payload_json, event_id, created_at "
    "FROM topology_outbox WHERE published_at IS NULL AND failed_at IS NULL ORDER BY id LIMIT %s"
)
# An outbox table of the layout before payload_json (outbox.sql not yet re-applied): bytes only.
_FETCH_BYTES_ONLY = (
    "SELECT id, event_type, partition_key, payload, headers, NULL::jsonb, event_id, created_at "
    "FROM topology_outbox WHERE published_at IS NULL ORDER BY id LIMIT %s"
)
_HAS_JSON_COLUMNS = (
    "SELECT count(*) = 3 FROM pg_attribute WHERE attrelid = 'topology_outbox'::regclass "
    "AND attname IN ('payload_json', 'failed_at', 'error') AND NOT attisdropped"
)
_MARK = "UPDATE topology_outbox SET published_at = now() WHERE id = ANY(%s)"
_DELETE = "DELETE FROM topology_outbox WHERE id = ANY(%s)"
_MARK_FAILED = (
    "UPDATE topology_outbox o SET failed_at = now(), error = f.error "
    "FROM unnest(%s::bigint[], %s::text[]) AS f(id, error) WHERE o.id = f.id AND o.published_at IS NULL"
)
_BACKLOG = (
    "SELECT count(*) FILTER (WHERE failed_at IS NULL), "
    "coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE failed_at IS NULL)), 0), "
    "count(*) FILTER (WHERE failed_at IS NOT NULL) "
    "FROM topology_outbox WHERE published_at IS NULL"
)
_BACKLOG_BYTES_ONLY = (
    "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0), 0 "
    "FROM topology_outbox WHERE published_at IS NULL"
)
# A validation message names every bad field; bounded so a huge payload cannot bloat the row.
MAX_ERROR_CHARS = 2000
_GAUGE_INTERVAL_S = 1.0


class OutboxMissing(RuntimeError):
    """The source database has no outbox table."""


class InvalidJsonRow(ValueError):
    """A row's ``payload_json`` is not an event the relay may publish under the row's key."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One unpublished row; ``payload`` is None for a JSON row until ``encode_json_row``."""

    id: int
    event_type: str
    partition_key: str
    payload: bytes | None
    headers: dict[str, Any]
    payload_json: Any = None
    event_id: UUID | None = None
    created_at: datetime | None = None

    @classmethod
    def from_row(cls, row: TupleRow) -> OutboxRow:
        return cls(id=row[0], event_type=row[1], partition_key=row[2],
                   payload=None if row[3] is None else bytes(row[3]), headers=row[4] or {},
                   payload_json=row[5], event_id=row[6], created_at=row[7])

    def record(self, settings: Settings) -> EncodedRecord:
        headers = [(EVENT_TYPE_HEADER, self.event_type.encode("utf-8"))]
        headers += [
            (str(name), str(value).encode("utf-8"))
            for name, value in self.headers.items()
            if name != EVENT_TYPE_HEADER  # the column is authoritative
        ]
        if self.payload is None:
            raise ValueError(f"outbox row {self.id}: a JSON row is published only once encoded (encode_json_row)")
        return EncodedRecord(
            topic=settings.topic_for(self.event_type),
            key=self.partition_key.encode("utf-8"),
            value=self.payload,
            headers=tuple(headers),
        )


def encode_json_row(row: OutboxRow, codec: EventCodec) -> bytes:
    """The Avro bytes of a JSON row's event, as ``topology emit`` would publish them.

    ``event_id`` and ``occurred_at`` default to the row's ``event_id`` and
    ``created_at``, so a row republished after a crash is the same bytes. Raises
    ``InvalidJsonRow`` when the fields are no valid event of ``event_type``, when
    they name another event id than the row, or when the event's partition key is
    not the row's: the writer's trigger locked the row's key, and per-key order
    holds only for the key that was locked (adr/0008)."""
    fields = row.payload_json
    if isinstance(fields, dict):
        fields = dict(fields)
        if row.event_id is not None:
            fields.setdefault("event_id", str(row.event_id))
        if row.created_at is not None:
            fields.setdefault("occurred_at", row.created_at.isoformat())
    try:
        event = event_from_json(fields, row.event_type)
    except EventInputError as exc:
        raise InvalidJsonRow(str(exc)) from None
    if row.event_id is not None and event.event_id != row.event_id:
        raise InvalidJsonRow(f"event_id: {event.event_id} is not the row's event_id {row.event_id}")
    if event.partition_key != row.partition_key:
        raise InvalidJsonRow(
            f"partition_key: the row's {row.partition_key!r} is not the event's {event.partition_key!r} "
            "(write the key the event is published under: the writer's lock on it keeps per-key order)"
        )
    try:
        return codec.encode(event.EVENT_TYPE, event.to_avro())
    except (ValueError, TypeError, OverflowError) as exc:  # fastavro's refusals; the models should catch all
        raise InvalidJsonRow(f"{event.EVENT_TYPE}: not encodable: {exc}") from None


def encode_json_rows(rows: list[OutboxRow], codec: EventCodec) -> tuple[list[OutboxRow], list[tuple[OutboxRow, str]]]:
    """Split a batch: the rows to publish (JSON rows encoded, in id order) and the failed
    JSON rows with their errors. Encoded rows pass through untouched."""
    ready: list[OutboxRow] = []
    failed: list[tuple[OutboxRow, str]] = []
    for row in rows:
        if row.payload is not None:
            ready.append(row)
            continue
        try:
            payload = encode_json_row(row, codec)
        except InvalidJsonRow as exc:
            failed.append((row, str(exc)[:MAX_ERROR_CHARS]))
            continue
        ready.append(OutboxRow(row.id, row.event_type, row.partition_key, payload, row.headers))
    return ready, failed


def libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)



def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else repr(exc)



class OutboxRelay:
    """``await OutboxRelay(settings, source_url).run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        source_url: str | None = None,
        *,
        delete_published: bool | None = None,
        metrics: RelayMetrics | None = None,
    ) -> None:
        url = source_url or settings.relay_source_url
        if not url:
            raise ValueError("no outbox database: give --source or set TOPOLOGY_RELAY_SOURCE_URL")
        self.settings = settings
        self.source_url = libpq_url(url)
        self.delete_published = settings.relay_delete_published if delete_published is None else delete_published
        self.batch_size = settings.relay_batch_size
        self.poll_interval_s = settings.relay_poll_interval_s
        self.metrics = metrics or RelayMetrics()
        self.codec = EventCodec()
        self._gauges_at = 0.0
        self._fetch, self._backlog = _FETCH, _BACKLOG

    async def run(self, stop: asyncio.Event) -> None:
        publisher = await self._start_publisher(stop)
        if publisher is None:
            return
        attempt = 0
        try:
            while not stop.is_set():
                try:
                    conn = await self._connect()
                except psycopg.OperationalError as exc:
                    attempt += 1
                    self.metrics.database_errors.inc()
                    log.error("outbox database unreachable (%s); retrying", _one_line(exc))
                    await sleep_unless(stop, backoff(attempt))
                    continue
                attempt = 0
                try:
                    async with conn:
                        if await self._acquire_lock(conn, stop):
                            await self._pump(conn, publisher, stop)
                except psycopg.Error as exc:
                    # The session and with it the lock may be gone: start over from
                    # acquiring the lock; unmarked rows will be republished.
                    attempt += 1
                    self.metrics.database_errors.inc()
                    log.error("outbox database error (%s: %s); reconnecting", type(exc).__name__, _one_line(exc))
                    await sleep_unless(stop, backoff(attempt))
                finally:
                    self._stand_by()
        finally:
            await publisher.stop()
        log.info("relay stopped")

    async def _start_publisher(self, stop: asyncio.Event) -> EventPublisher | None:
        # Before competing for the lock: a relay that cannot reach the broker
        # leaves the lock to a standby that can.
        attempt = 0
        while not stop.is_set():
            publisher = EventPublisher(self.settings, max_batch_bytes=RELAY_BATCH_BYTES)
            try:
                await ensure_topics(self.settings)
                await publisher.start()
                return publisher
            except KafkaError as exc:
                await publisher.stop()
                attempt += 1
                log.error("broker unreachable (%r); retrying", exc)
                await sleep_unless(stop, backoff(attempt))
        return None

    async def _connect(self) -> psycopg.AsyncConnection[TupleRow]:
        conn = await psycopg.AsyncConnection.connect(
            self.source_url,
            autocommit=True,
            connect_timeout=10,
            application_name=f"topology-relay pid={os.getpid()}",
        )
        for statement in _SESSION_SETTINGS:
            try:
                await conn.execute(statement)
            except psycopg.errors.UndefinedObject:  # tcp_user_timeout is PostgreSQL 12+
                log.debug("%s: not supported by this server", statement)
        return conn

    async def _acquire_lock(self, conn: psycopg.AsyncConnection[TupleRow], stop: asyncio.Event) -> bool:
        found = await (await conn.execute("SELECT to_regclass('topology_outbox') IS NOT NULL")).fetchone()
        if not (found and found[0]):
            raise OutboxMissing("no topology_outbox table in the source database: run `topology relay --init-schema`")
        await self._choose_layout(conn)
        said = False
        while not stop.is_set():
            row = await (await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", RELAY_LOCK)).fetchone()
            if row and row[0]:
                self.metrics.active.set(1)
                self.metrics.takeovers.inc()
                log.info("holding the outbox lock: this relay is the active one")
                return True
            if not said:
                log.info("another relay holds the outbox lock; standing by")
                said = True
            await sleep_unless(stop, self.poll_interval_s)
        return False

    async def _choose_layout(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        # A relay upgraded before its outbox: keep publishing the bytes rows (there
        # can be no JSON rows yet) instead of failing on the missing columns.
        row = await (await conn.execute(_HAS_JSON_COLUMNS)).fetchone()
        if row and row[0]:
            self._fetch, self._backlog = _FETCH, _BACKLOG
        else:
            self._fetch, self._backlog = _FETCH_BYTES_ONLY, _BACKLOG_BYTES_ONLY
            log.warning("topology_outbox predates JSON payloads: relaying encoded rows only; apply outbox.sql "
                        "again (`topology relay --init-schema`) to accept payload_json")

    def _stand_by(self) -> None:
        self.metrics.active.set(0)
        self.metrics.outbox_depth.set(0)
        self.metrics.oldest_unpublished_age.set(0)
        self.metrics.failed_rows.set(0)

    async def _pump(self, conn: psycopg.AsyncConnection[TupleRow], publisher: EventPublisher, stop: asyncio.Event) -> None:
        # LISTEN before the first read: a row committed in between still wakes us.
        await conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
        failures = 0
        while not stop.is_set():
            cursor = await conn.execute(self._fetch, (self.batch_size,), binary=True)
            rows = [OutboxRow.from_row(row) for row in await cursor.fetchall()]
            if self._fetch is _FETCH_BYTES_ONLY and any(row.payload is None for row in rows):
                await self._choose_layout(conn)  # outbox.sql was applied under us: read payload_json too
                continue
            if not rows:
                await self._refresh_gauges(conn)  # the failed rows held, counted at most once a second
                self.metrics.outbox_depth.set(0)
                self.metrics.oldest_unpublished_age.set(0)
                await self._wait_for_rows(conn, stop)
                continue
            failed = await self._round(conn, publisher, rows)
            await self._refresh_gauges(conn)
            if failed:
                failures += 1
                await sleep_unless(stop, backoff(failures))
            else:
                failures = 0
                if len(rows) < self.batch_size:
                    await self._wait_for_rows(conn, stop)

    async def _round(self, conn: psycopg.AsyncConnection[TupleRow], publisher: EventPublisher, rows: list[OutboxRow]) -> int:
        """Publish ``rows``, mark the acknowledged ones; return how many were not acknowledged."""
        started = time.perf_counter()
        rows = await self._set_aside_invalid(conn, rows)
        if not rows:
            return 0
        outcomes = await publisher.publish_encoded([row.record(self.settings) for row in rows])
        acknowledged = [row for row, outcome in zip(rows, outcomes, strict=True) if outcome is None]
        for event_type, count in Counter(row.event_type for row in acknowledged).items():
            self.metrics.published.labels(event_type).inc(count)
        if acknowledged:
            await conn.execute(_DELETE if self.delete_published else _MARK, ([row.id for row in acknowledged],))
        failed = len(rows) - len(acknowledged)
        if failed:
            self.metrics.publish_errors.inc(failed)
            cause = next(outcome for outcome in outcomes if outcome is not None)
            log.warning("%d of %d outbox rows not acknowledged (%r); they stay unpublished and will be retried",
                        failed, len(rows), cause)
        self.metrics.round_seconds.observe(time.perf_counter() - started)
        log.debug("published %d rows (ids %d..%d)", len(acknowledged), rows[0].id, rows[-1].id)
        return failed

    async def _set_aside_invalid(self, conn: psycopg.AsyncConnection[TupleRow], rows: list[OutboxRow]) -> list[OutboxRow]:
        """Encode the JSON rows; mark the invalid ones failed (before publishing, so a crash
        after it keeps them failed) and return the rest, still in id order."""
        ready, failed = encode_json_rows(rows, self.codec)
        if failed:
            await conn.execute(_MARK_FAILED, ([row.id for row, _ in failed], [error for _, error in failed]))
            self.metrics.invalid_rows.inc(len(failed))
            self._gauges_at = 0.0  # show the held rows at once
            for row, error in failed:
                log.warning("outbox row %d (%s, key %r) is not a valid event and is held, not published: %s",
                            row.id, row.event_type, row.partition_key, error)
        return ready

    async def _refresh_gauges(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        # count(*) walks every unpublished row: at most once a second, not per round.
        now = time.monotonic()
        if now - self._gauges_at < _GAUGE_INTERVAL_S:
            return
        self._gauges_at = now
        row = await (await conn.execute(self._backlog)).fetchone()
        if row is not None:
            self.metrics.outbox_depth.set(row[0])
            self.metrics.oldest_unpublished_age.set(float(row[1]))
            self.metrics.failed_rows.set(row[2])

    async def _wait_for_rows(self, conn: psycopg.AsyncConnection[TupleRow], stop: asyncio.Event) -> None:
        """Until a NOTIFY, the poll interval, or ``stop``, whichever comes first."""
        deadline = time.monotonic() + self.poll_interval_s
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            woken = False
            # Short slices keep SIGTERM prompt; the generator is always run to its
            # end (never broken out of), so the connection's lock is released.
            async for _ in conn.notifies(timeout=min(remaining, 0.25), stop_after=1):
                woken = True
            if woken:
                return


async def run_relay(settings: Settings, source_url: str | None = None, delete_published: bool | None = None) -> None:
    """``topology relay``: run until SIGINT/SIGTERM."""
    relay = OutboxRelay(settings, source_url, delete_published=delete_published)
    if settings.relay_metrics_port:
        start_http_server(settings.relay_metrics_port, addr=settings.metrics_host, registry=relay.metrics.registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("relaying the outbox to %s, topics by event type (%s published rows)", settings.kafka_bootstrap,
             "deleting" if relay.delete_published else "marking")
    await relay.run(stop)
