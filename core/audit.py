"""The audit index's keys (adr/0012): which keys an event and its decisions touched, and
the key a person's question names. Pure; the projector writes the rows
(``projector.archive``), the read side looks them up (``query_api.audit_api``).
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

from topology_store.core.cells import Outcome
from topology_store.core.claims import command_keys
from topology_store.core.fold import BatchResult
from topology_store.schemas.models import (
    SENSITIVE_BUCKETS,
    CellRegistered,
    CellStateChanged,
    CellUpdated,
    ClaimBucket,
    ClaimsDestroyRequested,
    ClaimsRequested,
    Event,
    LeaseCommitRequested,
    LeaseRollbackRequested,
    OwnerTransferRequested,
    protect_value,
    stored_claim_value,
)


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


ROUTE_KINDS = ("ROUTE", "CELL", "LEASE", "OWNER")


def audit_key(kind: str, value: str, secret: bytes) -> tuple[str, str]:
    """The (kind, key) of the audit index for what a person asks about:
    ROUTE a path (its top-level namespace), CELL an id, LEASE an id, OWNER
    cell/TYPE/id, or a claim bucket and its value (e-mails are looked up hashed)."""
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
    if isinstance(document, list):
        return [mask_pii(item, secret) for item in document]
    if isinstance(document, dict):
        masked = {k: mask_pii(v, secret) for k, v in document.items()}
        bucket = masked.get("bucket")
        if bucket in SENSITIVE_BUCKETS and isinstance(masked.get("value"), str):
            masked["value"] = protect_value(str(bucket), str(masked["value"]).lower(), secret)
        return masked
    return document
