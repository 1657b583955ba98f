"""The archive and the audit index, written in each batch's transaction.

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

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from topology_store.projector.bulk import copy_rows
from topology_store.core.claims import command_keys
from topology_store.core.cells import BatchResult, Outcome
from topology_store.schemas.models import (
    CellRegistered,
    CellStateChanged,
    CellUpdated,
    ClaimsDestroyRequested,
    ClaimsRequested,
    Event,
    LeaseCommitRequested,
    LeaseRollbackRequested,
    OwnerTransferRequested,
)


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


def claim_key_text(bucket: str, value: str) -> str:
    return f"{bucket}:{value}"


def event_audit_keys(event: Event, decisions: Iterable[Event], secret: bytes) -> set[tuple[str, str]]:
    """(kind, key) pairs an event and its decisions touched. Pure."""
    keys: set[tuple[str, str]] = set()
    if isinstance(event, CellRegistered | CellUpdated | CellStateChanged):
        keys.add(("cell", event.cell_id))
    for bucket, value in command_keys(event, secret):
        keys.add(("claim", claim_key_text(bucket, value)))
    if isinstance(event, ClaimsRequested | LeaseCommitRequested | LeaseRollbackRequested):
        keys.add(("lease", str(event.lease_id)))
    if isinstance(event, ClaimsRequested | ClaimsDestroyRequested):
        keys.add(("owner", f"{event.cell_id}/{event.owner_type.value}/{event.owner_id}"))
    if isinstance(event, OwnerTransferRequested):
        keys.add(("owner", f"{event.from_cell_id}/{event.owner_type.value}/{event.owner_id}"))
    for decision in decisions:
        # Field presence by the model's declaration: getattr with a default on a
        # pydantic model raises and catches an AttributeError inside, per event.
        fields = type(decision).model_fields
        if "claims" in fields:
            for ref in decision.claims:  # type: ignore[attr-defined]
                keys.add(("claim", claim_key_text(ref.bucket.value, ref.value)))
        if "lease_id" in fields and decision.lease_id is not None:  # type: ignore[attr-defined]
            keys.add(("lease", str(decision.lease_id)))  # type: ignore[attr-defined]
    return keys


def audit_rows(result: BatchResult, secret: bytes) -> list[tuple[str, str, UUID]]:
    rows: list[tuple[str, str, UUID]] = []
    for positioned, decision in result.decisions:
        if decision.outcome is Outcome.DUPLICATE:
            continue  # the first delivery was indexed
        for kind, key in sorted(event_audit_keys(positioned.event, decision.events, secret)):
            rows.append((kind, key, positioned.event.event_id))
    return rows


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


# --- reading history ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    topic: str
    partition: int
    offset: int
    log_time: datetime | None
    event_type: str
    source: str
    outcome: str
    reason: str | None
    payload: dict[str, object] | None  # decoded from the archived bytes
    decisions: list[dict[str, object]]


ROUTE_KINDS = ("ROUTE", "CELL", "LEASE", "OWNER")


def audit_key(kind: str, value: str, secret: bytes) -> tuple[str, str]:
    """The (kind, key) of the audit index for what a person asks about:
    ROUTE a path (its top-level namespace), CELL an id, LEASE an id, OWNER
    cell/TYPE/id, or a claim bucket and its value (e-mails are looked up hashed)."""
    from topology_store.schemas.models import ClaimBucket, stored_claim_value

    kind = kind.upper()
    if kind == "ROUTE":
        top = value.strip("/").split("/", 1)[0]
        return ("claim", claim_key_text("NAMESPACE", stored_claim_value(ClaimBucket.NAMESPACE, top, secret)))
    if kind == "CELL":
        return ("cell", value)
    if kind == "LEASE":
        return ("lease", str(UUID(value)))
    if kind == "OWNER":
        return ("owner", value)
    bucket = ClaimBucket(kind)
    return ("claim", claim_key_text(bucket.value, stored_claim_value(bucket, value, secret)))


def mask_pii(document: object, secret: bytes) -> object:
    """Replace clear sensitive values (e-mails) by their keyed hash, wherever they sit."""
    from topology_store.schemas.models import SENSITIVE_BUCKETS, protect_value

    if isinstance(document, list):
        return [mask_pii(item, secret) for item in document]
    if isinstance(document, dict):
        masked = {k: mask_pii(v, secret) for k, v in document.items()}
        bucket = masked.get("bucket")
        if bucket in SENSITIVE_BUCKETS and isinstance(masked.get("value"), str):
            masked["value"] = protect_value(str(bucket), str(masked["value"]).lower(), secret)
        return masked
    return document


async def key_history(
    conn: AsyncConnection, kind: str, key: str, secret: bytes, pii: bool = False, limit: int | None = None
) -> list[HistoryEntry]:
    """Every event that touched the key, in log order; the first ``limit`` only, if given
    (the database stops there: a busy key's whole history is never loaded for a page)."""
    from topology_store.schemas.codec import DecodeError, EventCodec

    rows = await conn.execute(
        text(
            'SELECT p.topic, p.partition, p."offset", a.log_time, a.value, p.event_type, p.source, p.outcome, '
            "  p.reason, p.detail "
            "FROM event_keys k JOIN processed_events p ON p.event_id = k.event_id "
            'LEFT JOIN event_archive a ON a.topic = p.topic AND a.partition = p.partition AND a."offset" = p."offset" '
            'WHERE k.kind = :kind AND k.key = :key ORDER BY a.log_time NULLS LAST, p.topic, p.partition, p."offset" '
            "LIMIT :limit"
        ),
        {"kind": kind, "key": key, "limit": limit},
    )
    codec = EventCodec()
    entries = []
    for row in rows:
        payload: dict[str, object] | None = None
        if row.value is not None:
            try:
                payload = json.loads(
                    json.dumps(codec.decode(bytes(row.value)).payload, default=str)
                )
            except DecodeError:
                payload = None
        decisions = row.detail or []
        if not pii:
            payload = mask_pii(payload, secret)  # type: ignore[assignment]
        entries.append(
            HistoryEntry(row.topic, row.partition, row.offset, row.log_time, row.event_type, row.source,
                         row.outcome, row.reason, payload, decisions)
        )
    return entries
