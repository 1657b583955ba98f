"""Loads and writes the claim registry (claims, leases, sequence ranges) for the decider
(adr/0010).

Called inside the batch transaction of :mod:`projector.store`, while the registry
lock is held, so what is loaded cannot change before it is written back. Leases are
loaded only when a command names them (its own begin, commit, rollback, or a tick
naming it): no lease ends because another request ran into its values (adr/0017).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from topology_store.core.claims import ClaimStatus, HeldClaim, Lease, LeaseStatus, Needs, Registry
from topology_store.projector.bulk import execute_binary
from topology_store.schemas.models import OwnerType, ReleaseCause

_CLAIM_COLUMNS = "bucket, value, cell_id, owner_type, owner_id, status, lease_id, claimed_at, source_type, source_id, user_data"
_LEASE_COLUMNS = ("lease_id, request_id, cell_id, owner_type, owner_id, claims, expires_at, status, cause, "
                  "destroy_claims, granted_at")


def _held(
    bucket: str, value: str, cell_id: str, owner_type: str, owner_id: int, status: str, lease_id: UUID | None,
    claimed_at: datetime, source_type: str | None, source_id: bytes | None, user_data: bytes | None,
) -> HeldClaim:
    """One row of ``SELECT {_CLAIM_COLUMNS}``."""
    return HeldClaim(
        bucket=bucket,
        value=value,
        cell_id=cell_id,
        owner_type=OwnerType(owner_type),
        owner_id=owner_id,
        status=ClaimStatus(status),
        lease_id=lease_id,
        claimed_at=claimed_at,
        source_type=source_type,
        source_id=None if source_id is None else bytes(source_id),
        user_data=None if user_data is None else bytes(user_data),
    )


def _lease(row: Row) -> Lease:  # type: ignore[type-arg]
    return Lease(
        lease_id=row.lease_id,
        request_id=row.request_id,
        cell_id=row.cell_id,
        owner_type=OwnerType(row.owner_type),
        owner_id=row.owner_id,
        claims=tuple((bucket, value) for bucket, value in row.claims),
        expires_at=row.expires_at,
        status=LeaseStatus(row.status),
        cause=ReleaseCause(row.cause) if row.cause else None,
        destroys=tuple((bucket, value) for bucket, value in row.destroy_claims),
        granted_at=row.granted_at,
    )


async def _claims_by_keys(conn: AsyncConnection, keys: Iterable[tuple[str, str]]) -> list[HeldClaim]:
    keys = list(keys)
    if not keys:
        return []
    rows = await execute_binary(
        conn,
        f"SELECT {_CLAIM_COLUMNS} FROM claims c "
        "JOIN unnest(%(buckets)b::text[], %(values)b::text[]) AS k(b, v) ON c.bucket = k.b AND c.value = k.v",
        {"buckets": [b for b, _ in keys], "values": [v for _, v in keys]},
    )
    return [_held(*row) for row in rows]


async def load_registry(conn: AsyncConnection, wanted: Needs) -> Registry:
    registry = Registry()
    for held in await _claims_by_keys(conn, wanted.keys):
        registry.claims[held.key] = held
    if wanted.owners:
        rows = await conn.execute(
            text(
                f"SELECT {_CLAIM_COLUMNS} FROM claims c "
                "JOIN unnest(CAST(:cells AS text[]), CAST(:types AS text[]), CAST(:ids AS bigint[])) AS o(c, t, i) "
                "  ON c.cell_id = o.c AND c.owner_type = o.t AND c.owner_id = o.i"
            ),
            {
                "cells": [o[0] for o in wanted.owners],
                "types": [o[1] for o in wanted.owners],
                "ids": [o[2] for o in wanted.owners],
            },
        )
        for row in rows:
            registry.claims[(row.bucket, row.value)] = _held(*row)
    # Only the leases commands name: a lease ends by its own commands and ticks, never
    # because another request ran into its values (adr/0017).
    if wanted.lease_ids:
        rows = await conn.execute(
            text(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE lease_id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": list(wanted.lease_ids)},
        )
        for row in rows:
            registry.leases[row.lease_id] = _lease(row)
    # Ending a lease touches all its claims (those it creates and those it destroys), so
    # all of them must be in view.
    open_keys = {key for lease in registry.leases.values() if lease.status is LeaseStatus.OPEN
                 for key in (*lease.claims, *lease.destroys)}
    for held in await _claims_by_keys(conn, open_keys - registry.claims.keys()):
        registry.claims[held.key] = held
    if wanted.sequences:
        rows = await conn.execute(
            text(
                'SELECT sequence_name, max("end") AS next_start FROM sequence_ranges '
                "WHERE sequence_name = ANY(CAST(:names AS text[])) GROUP BY sequence_name"
            ),
            {"names": list(wanted.sequences)},
        )
        registry.sequences.update({row.sequence_name: row.next_start for row in rows})
    return registry


async def write_registry(conn: AsyncConnection, registry: Registry, version: int) -> None:
    held = [registry.claims[k] for k in sorted(registry.changed_claims) if k in registry.claims]
    freed = [k for k in sorted(registry.changed_claims) if k not in registry.claims]
    if freed:
        await execute_binary(
            conn,
            "DELETE FROM claims c USING unnest(%(buckets)b::text[], %(values)b::text[]) AS k(b, v) "
            "WHERE c.bucket = k.b AND c.value = k.v",
            {"buckets": [b for b, _ in freed], "values": [v for _, v in freed]},
        )
    if held:
        await execute_binary(
            conn,
            f"INSERT INTO claims ({_CLAIM_COLUMNS}, version) "
            "SELECT u.*, %(version)b::bigint FROM unnest(%(buckets)b::text[], %(values)b::text[], "
            "  %(cells)b::text[], %(owner_types)b::text[], %(owner_ids)b::bigint[], "
            "  %(statuses)b::text[], %(lease_ids)b::uuid[], %(claimed_at)b::timestamptz[], "
            "  %(source_types)b::text[], %(source_ids)b::bytea[], %(user_data)b::bytea[]) AS u "
            "ON CONFLICT (bucket, value) DO UPDATE SET cell_id = excluded.cell_id, "
            "  owner_type = excluded.owner_type, owner_id = excluded.owner_id, status = excluded.status, "
            "  lease_id = excluded.lease_id, claimed_at = excluded.claimed_at, source_type = excluded.source_type, "
            "  source_id = excluded.source_id, user_data = excluded.user_data, version = excluded.version",
            {
                "version": version,
                "buckets": [c.bucket for c in held],
                "values": [c.value for c in held],
                "cells": [c.cell_id for c in held],
                "owner_types": [c.owner_type.value for c in held],
                "owner_ids": [c.owner_id for c in held],
                "statuses": [c.status.value for c in held],
                "lease_ids": [c.lease_id for c in held],
                "claimed_at": [c.claimed_at for c in held],
                "source_types": [c.source_type for c in held],
                "source_ids": [c.source_id for c in held],
                "user_data": [c.user_data for c in held],
            },
        )
    leases = [registry.leases[i] for i in sorted(registry.changed_leases, key=str)]
    if leases:
        await conn.execute(
            text(
                f"INSERT INTO leases ({_LEASE_COLUMNS}, version) "
                "SELECT u.*, CAST(:version AS bigint) FROM unnest(CAST(:ids AS uuid[]), CAST(:requests AS uuid[]), "
                "  CAST(:cells AS text[]), CAST(:owner_types AS text[]), CAST(:owner_ids AS bigint[]), "
                "  CAST(:claims AS jsonb[]), CAST(:expires AS timestamptz[]), CAST(:statuses AS text[]), "
                "  CAST(:causes AS text[]), CAST(:destroys AS jsonb[]), CAST(:granted AS timestamptz[])) AS u "
                "ON CONFLICT (lease_id) DO UPDATE SET status = excluded.status, cause = excluded.cause, "
                "  version = excluded.version"
            ),
            {
                "version": version,
                "ids": [l.lease_id for l in leases],
                "requests": [l.request_id for l in leases],
                "cells": [l.cell_id for l in leases],
                "owner_types": [l.owner_type.value for l in leases],
                "owner_ids": [l.owner_id for l in leases],
                "claims": [json.dumps([list(k) for k in l.claims]) for l in leases],
                "expires": [l.expires_at for l in leases],
                "statuses": [l.status.value for l in leases],
                "causes": [l.cause.value if l.cause else None for l in leases],
                "destroys": [json.dumps([list(k) for k in l.destroys]) for l in leases],
                "granted": [l.granted_at for l in leases],
            },
        )
    ranges = registry.granted_ranges
    if ranges:
        await conn.execute(
            text(
                'INSERT INTO sequence_ranges (sequence_name, start, "end", cell_id, request_id, version) '
                "SELECT u.*, CAST(:version AS bigint) FROM unnest(CAST(:names AS text[]), CAST(:starts AS bigint[]), "
                "  CAST(:ends AS bigint[]), CAST(:cells AS text[]), CAST(:requests AS uuid[])) AS u"
            ),
            {
                "version": version,
                "names": [r.sequence_name for r in ranges],
                "starts": [r.start for r in ranges],
                "ends": [r.end for r in ranges],
                "cells": [r.cell_id for r in ranges],
                "requests": [r.request_id for r in ranges],
            },
        )


