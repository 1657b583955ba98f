"""What GitLab's ClaimService reads from the projection (adr/0022): earlier attempts of a
``BeginUpdate``, a cell's open leases, its records by Rails source, one record.

Plain SQL over the projector's tables (``claims``, ``leases``, ``processed_events``), read
with the HTTP API's engine; every write goes through the log, never through here.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.service.commands import lease_id_for
from topology_store.service.gitlab_claims import Attempt, RecordRow

_RECORD_COLUMNS = ("c.bucket, c.value, c.cell_id, c.owner_type, c.owner_id, c.status, c.lease_id, c.claimed_at, "
                   "c.source_type, c.source_id, c.user_data, l.granted_at AS lease_granted_at")


def _row(row: object) -> RecordRow:
    values = list(row)  # type: ignore[call-overload]
    for i in (9, 10):  # bytea comes back as memoryview or bytes
        if values[i] is not None:
            values[i] = bytes(values[i])
    return RecordRow(*values)


class Records:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def attempts(self, request_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Attempt]:
        """The recorded outcome of each id decided so far, and the status of the lease it got.
        A begin's lease id is a function of its request id (``commands.lease_id_for``): the lease
        is found by its primary key (``leases.request_id`` has no index: joining on it read the
        whole table, ended leases included, on every BeginUpdate)."""
        ids = list(request_ids)
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT a.request_id, p.outcome, l.status "
                     "FROM unnest(CAST(:ids AS uuid[]), CAST(:lease_ids AS uuid[])) AS a(request_id, lease_id) "
                     "JOIN processed_events p ON p.event_id = a.request_id "
                     "LEFT JOIN leases l ON l.lease_id = a.lease_id AND l.request_id = a.request_id"),
                {"ids": ids, "lease_ids": [lease_id_for(i) for i in ids]},
            )
            return {row.request_id: Attempt(row.outcome, row.status) for row in rows}

    async def open_leases(self, cell_id: str, created_after: datetime | None,
                          after: tuple[datetime, uuid.UUID] | None, limit: int) -> list[tuple[uuid.UUID, datetime]]:
        """Open leases of ``cell_id`` granted after ``created_after``, in (grant time, id) order
        from just past ``after``; a lease granted before 0010 recorded grant times counts from
        its end."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT lease_id, created_at FROM ("
                     "  SELECT lease_id, coalesce(granted_at, expires_at) AS created_at FROM leases"
                     "  WHERE cell_id = :cell AND status = 'OPEN') l "
                     "WHERE (CAST(:created_after AS timestamptz) IS NULL OR created_at > :created_after) "
                     "  AND (CAST(:after_at AS timestamptz) IS NULL OR (created_at, lease_id) > "
                     "       (CAST(:after_at AS timestamptz), CAST(:after_id AS uuid))) "
                     "ORDER BY created_at, lease_id LIMIT :limit"),
                {"cell": cell_id, "created_after": created_after, "after_at": after[0] if after else None,
                 "after_id": after[1] if after else None, "limit": limit},
            )
            return [(row.lease_id, row.created_at) for row in rows]

    async def records(self, cell_id: str, source_type: str | None, buckets: list[str] | None,
                      source_id_gt: bytes, source_id_lte: bytes | None, limit: int) -> list[RecordRow]:
        """Records of ``cell_id`` with a Rails source (of ``source_type``, in ``buckets``),
        whose source id is in (``source_id_gt``, ``source_id_lte``], in source id order."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                text(f"SELECT {_RECORD_COLUMNS} FROM claims c LEFT JOIN leases l "
                     "  ON c.status = 'COMMITTED' AND l.lease_id = c.lease_id "
                     "WHERE c.cell_id = :cell AND c.source_type IS NOT NULL "
                     "  AND (CAST(:source_type AS text) IS NULL OR c.source_type = :source_type) "
                     "  AND (CAST(:buckets AS text[]) IS NULL OR c.bucket = ANY(CAST(:buckets AS text[]))) "
                     "  AND c.source_id > :gt "
                     "  AND (CAST(:lte AS bytea) IS NULL OR c.source_id <= :lte) "
                     "ORDER BY c.source_id, c.bucket, c.value LIMIT :limit"),
                {"cell": cell_id, "source_type": source_type, "buckets": buckets, "gt": source_id_gt,
                 "lte": source_id_lte, "limit": limit},
            )
            return [_row(row) for row in rows]

    async def record(self, bucket: str, stored_value: str) -> RecordRow | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(
                text(f"SELECT {_RECORD_COLUMNS} FROM claims c LEFT JOIN leases l "
                     "  ON c.status = 'COMMITTED' AND l.lease_id = c.lease_id "
                     "WHERE c.bucket = :bucket AND c.value = :value"),
                {"bucket": bucket, "value": stored_value},
            )).first()
            return None if row is None else _row(row)
