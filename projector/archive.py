"""The archive and the audit index, written in each batch's transaction (adr/0012).

``event_archive`` keeps every consumed record byte for byte, as a :class:`RawRecord`
(a replay can read it instead of Kafka, whose retention may end; a dead letter is the
same record with its error, ``projector.store.DeadLetter``). The archive is also the record of
which positions were applied: when stored offsets move backwards, the consumer compares what
it reads again with :func:`archived_records` and skips identical records (adr/0019).
``event_keys`` names the keys each
processed event touched — the cell, each stored claim key, the lease, the owner,
and the keys its decisions touched (an expiry, a transfer) — so an auditor can
list a key's whole history in log order without decoding the log.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Self
from uuid import UUID

from aiokafka.structs import ConsumerRecord
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from topology_store.projector.bulk import copy_rows

# The range of Python datetimes (years 1 to 9999); a Kafka timestamp is any 64-bit number.
_MIN_MS = int(datetime(1, 1, 1, tzinfo=UTC).timestamp() * 1000)
_MAX_MS = int(datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC).timestamp() * 1000)
CLAMPED_LOG_TIMES = (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))


def record_log_time(record: ConsumerRecord) -> datetime | None:  # type: ignore[type-arg]
    """The record's timestamp, or ``None`` when no datetime can hold it (a producer
    that wrote microseconds instead of milliseconds lands in the year 55,000)."""
    if not _MIN_MS <= record.timestamp <= _MAX_MS:
        return None
    return datetime.fromtimestamp(record.timestamp / 1000, UTC)


def archive_log_time(record: ConsumerRecord) -> datetime:  # type: ignore[type-arg]
    """The archive's log time: the timestamp, clamped into the datetime range. The
    archive keeps the bytes; such a record is dead-lettered with the exact number."""
    moment = record_log_time(record)
    if moment is not None:
        return moment
    return CLAMPED_LOG_TIMES[0] if record.timestamp < _MIN_MS else CLAMPED_LOG_TIMES[1]


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A record as consumed, byte for byte: where it sits, its key, value and headers."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    # The archive's log time (clamped); keyword-only, so a subclass can add fields.
    log_time: datetime | None = field(default=None, kw_only=True)

    @classmethod
    def of(cls, record: ConsumerRecord, **more: Any) -> Self:  # type: ignore[type-arg]
        """The consumed record; ``more`` fills a subclass's own fields (a dead letter's error)."""
        return cls(record.topic, record.partition, record.offset, record.key, record.value,
                   tuple((k, bytes(v)) for k, v in record.headers), log_time=archive_log_time(record), **more)


def headers_json(headers: Iterable[tuple[str, bytes]]) -> str:
    """Kafka headers as stored beside the raw record: [[name, hex of the value], ...]."""
    return _headers_json(tuple(headers))


@lru_cache(maxsize=1024)
def _headers_json(headers: tuple[tuple[str, bytes], ...]) -> str:
    # Most records of a batch carry the same few headers (the event type); the
    # archive writes one per record.
    return json.dumps([[name, value.hex()] for name, value in headers])


async def write_archive(conn: AsyncConnection, records: Sequence[RawRecord]) -> None:
    if not records:
        return
    # Plain COPY: fencing lets only the batch that advances a partition's stored
    # offset archive its records, so an offset is never archived twice.
    await copy_rows(
        conn,
        "event_archive",
        ("topic", "partition", "offset", "key", "value", "headers", "log_time"),
        (
            (r.topic, r.partition, r.offset, r.key, r.value, headers_json(r.headers), r.log_time)
            for r in records
        ),
    )


def archive_columns(records: Sequence[RawRecord]) -> dict[str, list[Any]]:
    """The archive's rows as columns, the array parameters of an INSERT from ``unnest``
    (``a_topics``, ``a_numbers``, ...): a small batch archives in a statement it sends anyway."""
    return {
        "a_topics": [r.topic for r in records],
        "a_numbers": [r.partition for r in records],
        "a_offsets": [r.offset for r in records],
        "a_keys": [r.key for r in records],
        "a_values": [r.value for r in records],
        "a_headers": [headers_json(r.headers) for r in records],
        "a_times": [r.log_time for r in records],
    }


async def write_audit_keys(conn: AsyncConnection, rows: Sequence[tuple[str, str, UUID]]) -> None:
    if not rows:
        return
    await copy_rows(conn, "event_keys", ("kind", "key", "event_id"), rows)


# A record as the archive holds it, for comparison with one read again: key, value, headers.
ArchivedBytes = tuple[bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]


def archived_bytes(record: RawRecord) -> ArchivedBytes:
    return record.key, record.value, record.headers


async def archive_ends(engine: AsyncEngine, partitions: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """One past the highest archived offset of each partition (0: nothing archived).
    A stored next offset below it means the offsets moved backwards (adr/0019)."""
    if not partitions:
        return {}
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                'SELECT u.t, u.p, (SELECT coalesce(max(a."offset"), -1) + 1 FROM event_archive a '
                "                  WHERE a.topic = u.t AND a.partition = u.p) "
                "FROM unnest(CAST(:topics AS text[]), CAST(:numbers AS int[])) AS u(t, p)"
            ),
            {"topics": [t for t, _ in partitions], "numbers": [p for _, p in partitions]},
        )
        return {(topic, partition): int(end) for topic, partition, end in rows}


async def archived_records(engine: AsyncEngine, topic: str, partition: int, start: int,
                           end: int) -> dict[int, ArchivedBytes]:
    """The archived records of one partition at offsets ``start`` to ``end - 1``, by offset."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text('SELECT "offset", key, value, headers FROM event_archive '
                 'WHERE topic = :topic AND partition = :partition AND "offset" >= :start AND "offset" < :end'),
            {"topic": topic, "partition": partition, "start": start, "end": end},
        )
        return {
            int(offset): (None if key is None else bytes(key), None if value is None else bytes(value),
                          tuple((name, bytes.fromhex(value_hex)) for name, value_hex in headers))
            for offset, key, value, headers in rows
        }
