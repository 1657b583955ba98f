"""The archive and the audit index, written in each batch's transaction (adr/0012).

``event_archive`` keeps every consumed record byte for byte (a replay can read it
instead of Kafka, whose retention may end). ``event_keys`` names the keys each
processed event touched — the cell, each stored claim key, the lease, the owner,
and the keys its decisions touched (an expiry, a transfer) — so an auditor can
list a key's whole history in log order without decoding the log.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncConnection

from topology_store.projector.bulk import copy_rows


@dataclass(frozen=True, slots=True)
class ArchivedRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    log_time: datetime


def headers_json(headers: Iterable[tuple[str, bytes]]) -> str:
    """Kafka headers as stored beside the raw record: [[name, hex of the value], ...]."""
    return _headers_json(tuple(headers))


@lru_cache(maxsize=1024)
def _headers_json(headers: tuple[tuple[str, bytes], ...]) -> str:
    # Most records of a batch carry the same few headers (the event type); the
    # archive writes one per record.
    return json.dumps([[name, value.hex()] for name, value in headers])


async def write_archive(conn: AsyncConnection, records: Sequence[ArchivedRecord]) -> None:
    if not records:
        return
    # Plain COPY: fencing lets only the batch that advances a partition's stored
    # offset archive its records, so an offset is never archived twice.
    await copy_rows(
        conn,
        "event_archive",
        ("topic", "partition", "offset", "key", "value", "headers", "log_time"),
        (
            (r.topic, r.partition, r.offset, r.key, r.value, headers_json(r.headers),
             r.log_time)
            for r in records
        ),
    )


async def write_audit_keys(conn: AsyncConnection, rows: Sequence[tuple[str, str, UUID]]) -> None:
    if not rows:
        return
    await copy_rows(conn, "event_keys", ("kind", "key", "event_id"), rows)
