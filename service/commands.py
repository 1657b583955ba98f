"""Claim commands, built in one place for every door (adr/0010, adr/0015).

A door turns its input (JSON, command-line flags, a protobuf message) into these
keyword arguments; the event models validate them (a ``pydantic.ValidationError``
names what is wrong). A request id the caller leaves out is drawn here: it is the
command's ``event_id``, the idempotency key a client reuses to retry safely. A begin's
lease id the caller leaves out derives from the request id, so a retry of the begin
has the same lease id, hence the same Kafka key and partition, and its copies are
decided once in one order (adr/0017).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping

from topology_store.schemas.models import (
    ClaimsDestroyRequested,
    ClaimsRequested,
    LeaseCommitRequested,
    LeaseRollbackRequested,
    OwnerTransferRequested,
    SequenceRangeRequested,
)

#: The namespace of lease ids derived from request ids (uuid5).
LEASE_ID_NAMESPACE = uuid.UUID("7d4f6c1e-2b1a-5c8e-9f3d-6a0b1c2d3e4f")


def _request(request_id: uuid.UUID | None, source: str) -> dict[str, object]:
    return {"event_id": request_id or uuid.uuid4(), "source": source}


def lease_id_for(request_id: uuid.UUID) -> uuid.UUID:
    """The lease id of a begin that names none: a function of its request id."""
    return uuid.uuid5(LEASE_ID_NAMESPACE, str(request_id))


def begin(
    *,
    source: str,
    cell_id: str,
    owner_type: str,
    owner_id: int,
    claims: Iterable[Mapping[str, object]],
    lease_ttl_ms: int,
    request_id: uuid.UUID | None = None,
    lease_id: uuid.UUID | None = None,
    destroy_claims: Iterable[Mapping[str, object]] = (),
) -> ClaimsRequested:
    """Reserve all ``claims`` ({"bucket", "value"}, and a GitLab record's "metadata") for one
    owner under a lease, and mark committed ``destroy_claims`` of the cell for destruction on
    commit; or nothing (adr/0022)."""
    event_id = request_id or uuid.uuid4()
    return ClaimsRequested(
        event_id=event_id, source=source, lease_id=lease_id or lease_id_for(event_id), cell_id=cell_id,
        owner_type=owner_type, owner_id=owner_id, claims=[dict(c) for c in claims],
        destroy_claims=[dict(c) for c in destroy_claims], lease_ttl_ms=lease_ttl_ms,
    )


def commit(*, source: str, lease_id: uuid.UUID, cell_id: str, request_id: uuid.UUID | None = None
           ) -> LeaseCommitRequested:
    """Make a lease's claims permanent."""
    return LeaseCommitRequested(**_request(request_id, source), lease_id=lease_id, cell_id=cell_id)


def rollback(*, source: str, lease_id: uuid.UUID, cell_id: str, request_id: uuid.UUID | None = None
             ) -> LeaseRollbackRequested:
    """Free a lease's claims."""
    return LeaseRollbackRequested(**_request(request_id, source), lease_id=lease_id, cell_id=cell_id)


def destroy(
    *,
    source: str,
    cell_id: str,
    owner_type: str,
    owner_id: int,
    claims: Iterable[Mapping[str, str]],
    request_id: uuid.UUID | None = None,
) -> ClaimsDestroyRequested:
    """Free committed claims of their owner."""
    return ClaimsDestroyRequested(
        **_request(request_id, source), cell_id=cell_id, owner_type=owner_type, owner_id=owner_id,
        claims=[dict(c) for c in claims],
    )


def transfer(
    *,
    source: str,
    owner_type: str,
    owner_id: int,
    from_cell_id: str,
    to_cell_id: str,
    to_owner_id: int | None = None,
    request_id: uuid.UUID | None = None,
) -> OwnerTransferRequested:
    """Move an owner's claims to another cell."""
    return OwnerTransferRequested(
        **_request(request_id, source), owner_type=owner_type, owner_id=owner_id, from_cell_id=from_cell_id,
        to_cell_id=to_cell_id, to_owner_id=to_owner_id,
    )


def sequence(*, source: str, cell_id: str, sequence_name: str, size: int, request_id: uuid.UUID | None = None
             ) -> SequenceRangeRequested:
    """Grant a cell the next range of a 64-bit id sequence."""
    return SequenceRangeRequested(**_request(request_id, source), cell_id=cell_id, sequence_name=sequence_name,
                                  size=size)
