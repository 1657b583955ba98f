"""The claim decider: pure functions that decide claim requests and evolve the claim registry.

Two functions, in the decider pattern:

- :func:`decide` — given the registry rows a request touches and the request's log
  time, return the decision events (granted, committed, released, rejected ...).
  This is where uniqueness is enforced: a (bucket, value) has at most one holder.
- :func:`evolve` — apply one decision event to the registry. The live projector
  applies exactly the decisions it just made; a replay of the decisions topic
  applies the recorded ones. Both use this one function, so the live tables and a
  replay of the decision log cannot disagree (adr/0010).

Time is log time: a request's time is the timestamp of its record in the log. One
order decides a lease's fate (adr/0017): every command about a lease is keyed by its
lease id, so its begin, commit, rollback and the ``LeaseExpiryTick`` that names it
share one partition and are decided in that partition's order. Only such a tick
expires a lease, and only once its log time reached the lease's end; nothing decided
on another partition (a request running into the lease's values, a tick for other
leases) ends it. A grant's end counts from the later of the request's log time and
the decider's clock (``decided_at``), so a lease decided after lag is never born
expired; that end is recorded in the decision, which replays follow.

No I/O here; the shell loads what :func:`needs` asks for and writes what changed.
"""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TypeAlias

from topology_store.schemas.models import (
    ClaimBucket,
    ClaimCreated,
    ClaimRef,
    ClaimReleased,
    ClaimsCommitted,
    ClaimsDestroyed,
    ClaimsDestroyRequested,
    ClaimsRequested,
    Conflict,
    Event,
    LeaseCommitRequested,
    LeaseCommitted,
    LeaseExpiryTick,
    LeaseGranted,
    LeaseReleased,
    LeaseRollbackRequested,
    OwnerTransferred,
    OwnerTransferRequested,
    NO_EXPIRY,
    OwnerType,
    RecordMetadata,
    RejectionReason,
    ReleaseCause,
    RequestRejected,
    SequenceRangeGranted,
    SequenceRangeRequested,
    protect_value,
)

ClaimKey: TypeAlias = tuple[str, str]  # (bucket, stored value)
Owner: TypeAlias = tuple[str, str, int]  # (cell_id, owner_type, owner_id)

ClaimCommand: TypeAlias = (
    ClaimCreated
    | ClaimReleased
    | ClaimsRequested
    | LeaseCommitRequested
    | LeaseRollbackRequested
    | ClaimsDestroyRequested
    | OwnerTransferRequested
    | SequenceRangeRequested
    | LeaseExpiryTick
)
ClaimDecision: TypeAlias = (
    LeaseGranted
    | LeaseCommitted
    | LeaseReleased
    | ClaimsCommitted
    | ClaimsDestroyed
    | OwnerTransferred
    | SequenceRangeGranted
    | RequestRejected
)
CLAIM_COMMANDS = (
    ClaimCreated,
    ClaimReleased,
    ClaimsRequested,
    LeaseCommitRequested,
    LeaseRollbackRequested,
    ClaimsDestroyRequested,
    OwnerTransferRequested,
    SequenceRangeRequested,
    LeaseExpiryTick,
)

DECIDER_SOURCE = "decider"
FIRST_SEQUENCE_ID = 1
MAX_SEQUENCE_END = 2**63 - 1


class ClaimStatus(StrEnum):
    LEASED = "LEASED"  # reserved under an open lease; does not route
    COMMITTED = "COMMITTED"


class LeaseStatus(StrEnum):
    OPEN = "OPEN"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"


@dataclass(frozen=True, slots=True)
class HeldClaim:
    bucket: str
    value: str
    cell_id: str
    owner_type: OwnerType
    owner_id: int
    status: ClaimStatus
    lease_id: uuid.UUID | None  # LEASED: the lease creating it; COMMITTED: the lease destroying it, if any
    claimed_at: datetime
    # A GitLab record's Rails row and user data (adr/0022); None for our own claims.
    source_type: str | None = None
    source_id: bytes | None = None
    user_data: bytes | None = None

    @property
    def key(self) -> ClaimKey:
        return (self.bucket, self.value)

    @property
    def owner(self) -> Owner:
        return (self.cell_id, self.owner_type.value, self.owner_id)


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: uuid.UUID
    request_id: uuid.UUID
    cell_id: str
    owner_type: OwnerType
    owner_id: int
    claims: tuple[ClaimKey, ...]
    expires_at: datetime  # NO_EXPIRY: no server-side end (adr/0022)
    status: LeaseStatus
    cause: ReleaseCause | None = None
    destroys: tuple[ClaimKey, ...] = ()  # committed claims it destroys on commit (adr/0022)
    granted_at: datetime | None = None  # None: granted before 0010 recorded it


@dataclass(slots=True)
class Registry:
    """The part of the claim registry a batch touches. ``claims`` absent: free.
    Decisions in a batch evolve this working copy; ``changed_*`` name what to write."""

    claims: dict[ClaimKey, HeldClaim] = field(default_factory=dict)
    leases: dict[uuid.UUID, Lease] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=dict)  # next free id per sequence
    changed_claims: set[ClaimKey] = field(default_factory=set)
    changed_leases: set[uuid.UUID] = field(default_factory=set)
    granted_ranges: list[SequenceRangeGranted] = field(default_factory=list)

    def copy(self) -> Registry:
        return Registry(
            claims=dict(self.claims),
            leases=dict(self.leases),
            sequences=dict(self.sequences),
        )


@dataclass(frozen=True, slots=True)
class Needs:
    """What the shell must load before deciding a batch of claim commands."""

    keys: frozenset[ClaimKey]
    lease_ids: frozenset[uuid.UUID]
    owners: frozenset[Owner]
    sequences: frozenset[str]


def stored_claims(claims: Iterable[ClaimRef], secret: bytes) -> tuple[ClaimKey, ...]:
    # Distinct after protection: a clear and a pre-hashed spelling of one e-mail are one claim.
    return tuple(dict.fromkeys((c.bucket.value, protect_value(c.bucket, c.value, secret)) for c in claims))


def command_keys(command: Event, secret: bytes) -> tuple[ClaimKey, ...]:
    if isinstance(command, ClaimCreated | ClaimReleased):
        # The model holds the canonical value already (its validator made it so):
        # only protection is left to do. This runs for every claim event of a batch.
        return ((command.bucket.value, protect_value(command.bucket, command.value, secret)),)
    if isinstance(command, ClaimsRequested):
        return stored_claims((*command.claims, *command.destroy_claims), secret)
    if isinstance(command, ClaimsDestroyRequested):
        return stored_claims(command.claims, secret)
    return ()


def needs(commands: Iterable[tuple[Event, datetime]], secret: bytes) -> Needs:
    keys: set[ClaimKey] = set()
    lease_ids: set[uuid.UUID] = set()
    owners: set[Owner] = set()
    sequences: set[str] = set()
    for command, _ in commands:
        keys.update(command_keys(command, secret))
        if isinstance(command, ClaimsRequested | LeaseCommitRequested | LeaseRollbackRequested):
            lease_ids.add(command.lease_id)
        elif isinstance(command, LeaseExpiryTick):
            lease_ids.update(command.lease_ids)  # a tick ends only the leases it names
        elif isinstance(command, OwnerTransferRequested):
            owners.add((command.from_cell_id, command.owner_type.value, command.owner_id))
        elif isinstance(command, SequenceRangeRequested):
            sequences.add(command.sequence_name)
    return Needs(frozenset(keys), frozenset(lease_ids), frozenset(owners), frozenset(sequences))


#: The requests the doors submit and answer (service/claims.py): their digests are recorded.
DOOR_REQUESTS = (
    ClaimsRequested,
    LeaseCommitRequested,
    LeaseRollbackRequested,
    ClaimsDestroyRequested,
    OwnerTransferRequested,
    SequenceRangeRequested,
)

#: The envelope: where and when a command was sent, not what it asks.
_ENVELOPE = frozenset({"event_id", "occurred_at", "source", "trace_id"})


def request_digest(command: Event, secret: bytes) -> bytes:
    """What a request asks, as a keyed hash: its type and every field but the envelope,
    claims as stored (canonical, sensitive values protected) and in a fixed order.

    Two commands under one request id are the same request exactly when their digests
    are equal, so a retry (new ``occurred_at``, same content) matches and a request id
    reused for another command does not (adr/0017). Keyed by the claim secret, so the
    stored digest of a request naming a clear e-mail cannot be guessed from the e-mail."""
    # The fields named one by one: pydantic's model_dump cost several times the hash.
    content: list[object]
    if isinstance(command, ClaimsRequested):
        content = [str(command.lease_id), command.cell_id, command.owner_type.value, command.owner_id,
                   command.lease_ttl_ms, sorted(stored_claims(command.claims, secret))]
        # GitLab's parts (adr/0022) only when present, so the digest of a request recorded
        # before them is unchanged and its retry still matches.
        if command.destroy_claims:
            content.append(["destroy", sorted(stored_claims(command.destroy_claims, secret))])
        records = sorted([*stored_claims((c,), secret)[0], _metadata_text(c.metadata)]
                         for c in command.claims if c.metadata is not None)
        if records:
            content.append(["records", records])
    elif isinstance(command, LeaseCommitRequested | LeaseRollbackRequested):
        content = [str(command.lease_id), command.cell_id]
    elif isinstance(command, ClaimsDestroyRequested):
        content = [command.cell_id, command.owner_type.value, command.owner_id,
                   sorted(stored_claims(command.claims, secret))]
    elif isinstance(command, ClaimCreated | ClaimReleased):
        content = [command.cell_id, command.owner_type.value, command.owner_id, *command_keys(command, secret)[0]]
    else:
        content = [command.model_dump(mode="json", exclude=set(_ENVELOPE))]
    text = json.dumps([command.EVENT_TYPE, *content], sort_keys=True, separators=(",", ":"))
    return hmac.digest(secret, text.encode("utf-8"), "sha256")


def _metadata_text(metadata: RecordMetadata) -> list[object]:
    return [metadata.owner_type.value, metadata.owner_id, metadata.source_type, metadata.source_id.hex(),
            None if metadata.user_data is None else metadata.user_data.hex()]


# --- decide ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decisions for one command, and how the command itself fared."""

    decisions: tuple[ClaimDecision, ...]
    outcome: str  # applied | unchanged | rejected
    reason: str | None = None


def decision_id(command_id: uuid.UUID, index: int) -> uuid.UUID:
    """Decision ids derive from the request, so deciding the same request again
    (after a crash rolled the first attempt back) yields the same events."""
    return uuid.uuid5(command_id, f"decision-{index}")


class _Decisions:
    def __init__(self, command: Event, at: datetime) -> None:
        self.command = command
        self.at = at
        self.items: list[ClaimDecision] = []

    def envelope(self) -> dict[str, object]:
        return {
            "event_id": decision_id(self.command.event_id, len(self.items)),
            "occurred_at": self.at,
            "source": DECIDER_SOURCE,
            "trace_id": self.command.trace_id,
        }


def _refs(keys: Iterable[ClaimKey], metadata: Mapping[ClaimKey, RecordMetadata | None] | None = None
          ) -> tuple[ClaimRef, ...]:
    # Stored values are already canonical (or protected), which ClaimRef would accept
    # unchanged: validating them again is pure cost on the hot path.
    # tests/unit/test_claims.py proves the constructed refs equal validated ones.
    found = metadata or {}
    return tuple(ClaimRef.model_construct(bucket=ClaimBucket(b), value=v, metadata=found.get((b, v))) for b, v in keys)


def _record_metadata(claims: Iterable[ClaimRef], secret: bytes) -> dict[ClaimKey, RecordMetadata | None]:
    """Each stored key of ``claims`` and the metadata its ref carried."""
    return {(c.bucket.value, protect_value(c.bucket, c.value, secret)): c.metadata for c in claims}


def _expire(registry: Registry, out: _Decisions, lease: Lease) -> None:
    released = LeaseReleased(
        **out.envelope(),
        request_id=None,
        lease_id=lease.lease_id,
        cell_id=lease.cell_id,
        owner_type=lease.owner_type,
        owner_id=lease.owner_id,
        claims=_refs(lease.claims),
        destroy_claims=_refs(lease.destroys),
        cause=ReleaseCause.EXPIRED,
    )
    out.items.append(released)
    evolve(registry, released)


def _reject(out: _Decisions, reason: RejectionReason, message: str, conflicts: Iterable[Conflict] = ()) -> Verdict:
    out.items.append(
        RequestRejected(
            **out.envelope(),
            request_id=out.command.event_id,
            request_type=out.command.EVENT_TYPE,
            reason=reason,
            message=message,
            conflicts=tuple(conflicts),
        )
    )
    return Verdict(tuple(out.items), "rejected", message)


def _granted(registry: Registry, out: _Decisions, decision: ClaimDecision) -> Verdict:
    out.items.append(decision)
    evolve(registry, decision)
    return Verdict(tuple(out.items), "applied")


def _unchanged(out: _Decisions, reason: str) -> Verdict:
    return Verdict(tuple(out.items), "unchanged", reason)


def _refuse_destroys(registry: Registry, out: _Decisions, cell_id: str, destroys: tuple[ClaimKey, ...]
                     ) -> Verdict | None:
    """A lease may destroy only committed claims of its own cell that no other lease is
    destroying (GitLab's rule: only the cell that created a record destroys it, adr/0022)."""
    others = [(key, held) for key in destroys if (held := registry.claims.get(key)) is not None
              and held.cell_id != cell_id]
    if others:
        return _reject(out, RejectionReason.WRONG_CELL,
                       f"{len(others)} of the claims to destroy belong to another cell",
                       [Conflict(bucket=k[0], value=k[1], cell_id=h.cell_id) for k, h in others])  # type: ignore[arg-type]
    missing = [key for key in destroys if (held := registry.claims.get(key)) is None
               or held.status is not ClaimStatus.COMMITTED or held.lease_id is not None]
    if missing:
        unclaimed = sum(1 for key in missing if key not in registry.claims)
        return _reject(out, RejectionReason.NOT_HELD,
                       f"{len(missing)} of the claims to destroy are not committed ({unclaimed} not claimed at all, "
                       f"{len(missing) - unclaimed} under an open lease)",
                       [Conflict(bucket=k[0], value=k[1], cell_id=registry.claims[k].cell_id)  # type: ignore[arg-type]
                        for k in missing if k in registry.claims])
    return None


def _conflict_message(conflicts: list[Conflict], total: int) -> str:
    if total == 1 and len(conflicts) == 1:
        return f"already claimed in cell {conflicts[0].cell_id}"
    held = ", ".join(f"{c.bucket.value} in cell {c.cell_id}" for c in conflicts)
    return f"{len(conflicts)} of {total} claims are held by another owner: {held}"


def decide(
    registry: Registry, command: Event, at: datetime, secret: bytes, decided_at: datetime | None = None
) -> Verdict:
    """Decide one command at log time ``at`` and evolve ``registry`` by the result.

    ``registry`` must hold what :func:`needs` named for this command. ``decided_at`` is
    the decider's clock (None: ``at``); only a grant's end depends on it. Returns every
    decision made, in order.
    """
    out = _Decisions(command, at)

    if isinstance(command, LeaseExpiryTick):
        # Only the leases the tick names, and only once the tick's log time reached their
        # end: the tick sits on their partition, behind every command about them that
        # reached the log first (adr/0017). A tick naming none (written before lease_ids
        # existed) expires nothing; the next tick names the leases that are due.
        for lease_id in dict.fromkeys(command.lease_ids):
            lease = registry.leases.get(lease_id)
            if lease is not None and lease.status is LeaseStatus.OPEN and lease.expires_at <= at:
                _expire(registry, out, lease)
        if out.items:
            return Verdict(tuple(out.items), "applied")
        return _unchanged(out, "no named lease due" if command.lease_ids else "the tick names no lease")

    if isinstance(command, ClaimCreated | ClaimsRequested):
        # A value held under a lease conflicts until that lease's own tick ends it, even
        # past its end: only the lease's partition may decide that it expired (adr/0017).
        if isinstance(command, ClaimsRequested):
            metadata = _record_metadata(command.claims, secret)
            keys = tuple(metadata)
            destroys = stored_claims(command.destroy_claims, secret)
        else:
            metadata, keys, destroys = {}, command_keys(command, secret), ()
        if set(keys) & set(destroys):  # equal only once protected: a clear and a hashed e-mail
            return _reject(out, RejectionReason.INVALID, "a lease cannot create and destroy the same claim")
        conflicts: list[Conflict] = []
        new: list[ClaimKey] = []
        for key in keys:
            held = registry.claims.get(key)
            found = metadata.get(key)
            owner = ((command.cell_id, found.owner_type.value, found.owner_id) if found is not None
                     else (command.cell_id, command.owner_type.value, command.owner_id))
            if held is None:
                new.append(key)
            elif held.owner == owner and held.status is ClaimStatus.COMMITTED and held.lease_id is None:
                continue  # already this owner's: nothing to reserve
            else:
                conflicts.append(Conflict(bucket=key[0], value=key[1], cell_id=held.cell_id))  # type: ignore[arg-type]
        if conflicts:
            return _reject(out, RejectionReason.CONFLICT, _conflict_message(conflicts, len(keys)), conflicts)
        refused = _refuse_destroys(registry, out, command.cell_id, destroys)
        if refused is not None:
            return refused
        if isinstance(command, ClaimCreated):
            if not new:
                return _unchanged(out, "already held by this owner")
            return _granted(
                registry,
                out,
                ClaimsCommitted(
                    **out.envelope(),
                    request_id=command.event_id,
                    cell_id=command.cell_id,
                    owner_type=command.owner_type,
                    owner_id=command.owner_id,
                    claims=_refs(new),
                ),
            )
        if command.lease_id in registry.leases:
            return _reject(out, RejectionReason.INVALID, "lease id already used by another request")
        if command.lease_ttl_ms == 0:
            expires_at = NO_EXPIRY  # GitLab's lease: the monolith commits or rolls it back (adr/0022)
        else:  # a full TTL from the grant, however long the request waited (adr/0017)
            expires_at = (at if decided_at is None else max(at, decided_at)) + timedelta(milliseconds=command.lease_ttl_ms)
        return _granted(
            registry,
            out,
            LeaseGranted(
                **out.envelope(),
                request_id=command.event_id,
                lease_id=command.lease_id,
                cell_id=command.cell_id,
                owner_type=command.owner_type,
                owner_id=command.owner_id,
                claims=_refs(new, metadata),
                destroy_claims=_refs(destroys),
                expires_at=expires_at,
            ),
        )

    if isinstance(command, LeaseCommitRequested | LeaseRollbackRequested):
        lease = registry.leases.get(command.lease_id)
        if lease is None:
            return _reject(out, RejectionReason.UNKNOWN_LEASE, "no such lease")
        if lease.cell_id != command.cell_id:
            return _reject(out, RejectionReason.WRONG_CELL, f"the lease belongs to cell {lease.cell_id}")
        # No expiry by the command's own time: a lease is expired only by a tick decided
        # before this command on the same partition, so a commit that reached the log
        # before the tick (and so before the lease's end) commits (adr/0017).
        committing = isinstance(command, LeaseCommitRequested)
        if lease.status is LeaseStatus.RELEASED:
            if lease.cause is ReleaseCause.EXPIRED:
                if committing:
                    return _reject(out, RejectionReason.LEASE_EXPIRED, "the lease expired before the commit")
                return _unchanged(out, "the lease had already expired")
            if committing:
                return _reject(out, RejectionReason.UNKNOWN_LEASE, "the lease was rolled back")
            return _unchanged(out, "already rolled back")
        if lease.status is LeaseStatus.COMMITTED:
            if committing:
                return _unchanged(out, "already committed")
            return _reject(out, RejectionReason.INVALID, "the lease is committed; destroy the claims instead")
        common = {
            "request_id": command.event_id,
            "lease_id": lease.lease_id,
            "cell_id": lease.cell_id,
            "owner_type": lease.owner_type,
            "owner_id": lease.owner_id,
            "claims": _refs(lease.claims),
            "destroy_claims": _refs(lease.destroys),
        }
        if committing:
            return _granted(registry, out, LeaseCommitted(**out.envelope(), **common))
        return _granted(registry, out, LeaseReleased(**out.envelope(), **common, cause=ReleaseCause.ROLLBACK))

    if isinstance(command, ClaimReleased | ClaimsDestroyRequested):
        keys = command_keys(command, secret)
        owner = (command.cell_id, command.owner_type.value, command.owner_id)
        # A claim a lease is destroying (lease_id set) waits for that lease (adr/0022).
        not_held = [key for key in keys if (h := registry.claims.get(key)) is None or h.status is not ClaimStatus.COMMITTED
                    or h.owner != owner or h.lease_id is not None]
        if not_held:
            others = [
                Conflict(bucket=k[0], value=k[1], cell_id=registry.claims[k].cell_id)  # type: ignore[arg-type]
                for k in not_held
                if k in registry.claims
            ]
            if len(keys) == 1:
                held = registry.claims.get(keys[0])
                if held is None:
                    message = "not claimed"
                elif held.owner == owner:
                    message = "held under an open lease; commit or roll the lease back"
                else:
                    message = f"held by another owner in cell {held.cell_id}"
            else:
                message = f"{len(not_held)} of {len(keys)} claims are not held by this owner"
            return _reject(out, RejectionReason.NOT_HELD, message, others)
        return _granted(
            registry,
            out,
            ClaimsDestroyed(
                **out.envelope(),
                request_id=command.event_id,
                cell_id=command.cell_id,
                owner_type=command.owner_type,
                owner_id=command.owner_id,
                claims=_refs(keys),
            ),
        )

    if isinstance(command, OwnerTransferRequested):
        owner = (command.from_cell_id, command.owner_type.value, command.owner_id)
        moving = sorted(  # not those a lease is destroying: that lease's commit frees them (adr/0022)
            key for key, held in registry.claims.items()
            if held.owner == owner and held.status is ClaimStatus.COMMITTED and held.lease_id is None
        )
        if not moving:
            return _unchanged(out, "the owner holds no committed claims in the source cell")
        return _granted(
            registry,
            out,
            OwnerTransferred(
                **out.envelope(),
                request_id=command.event_id,
                owner_type=command.owner_type,
                owner_id=command.owner_id,
                from_cell_id=command.from_cell_id,
                to_cell_id=command.to_cell_id,
                to_owner_id=command.to_owner_id if command.to_owner_id is not None else command.owner_id,
                claims=_refs(moving),
            ),
        )

    if isinstance(command, SequenceRangeRequested):
        start = registry.sequences.get(command.sequence_name, FIRST_SEQUENCE_ID)
        end = start + command.size
        if end > MAX_SEQUENCE_END:
            return _reject(out, RejectionReason.EXHAUSTED, f"sequence {command.sequence_name} has no range of that size left")
        return _granted(
            registry,
            out,
            SequenceRangeGranted(
                **out.envelope(),
                request_id=command.event_id,
                cell_id=command.cell_id,
                sequence_name=command.sequence_name,
                start=start,
                end=end,
            ),
        )

    raise TypeError(f"no claim rule for {type(command).__name__}")


# --- evolve ---------------------------------------------------------------------------------


def evolve(registry: Registry, decision: Event) -> None:
    """Apply one decision to the registry (in place: ``registry`` is a working copy)."""
    if isinstance(decision, RequestRejected):
        return
    if isinstance(decision, LeaseGranted):
        for ref in decision.claims:
            md = ref.metadata  # a GitLab record's subject is its owner (adr/0022)
            _put(registry, HeldClaim(
                ref.bucket.value, ref.value, decision.cell_id, decision.owner_type if md is None else md.owner_type,
                decision.owner_id if md is None else md.owner_id, ClaimStatus.LEASED, decision.lease_id,
                decision.occurred_at, None if md is None else md.source_type, None if md is None else md.source_id,
                None if md is None else md.user_data))
        for ref in decision.destroy_claims:  # LEASE_DESTROYING: still routes until the commit
            held = registry.claims.get(ref.key)
            if held is not None:
                _put(registry, replace(held, lease_id=decision.lease_id))
        _put_lease(registry, Lease(decision.lease_id, decision.request_id, decision.cell_id, decision.owner_type,
                                   decision.owner_id, tuple(c.key for c in decision.claims), decision.expires_at,
                                   LeaseStatus.OPEN, None, tuple(c.key for c in decision.destroy_claims),
                                   decision.occurred_at))
    elif isinstance(decision, LeaseCommitted):
        for ref in decision.claims:
            held = registry.claims.get(ref.key)
            if held is not None and held.lease_id == decision.lease_id:
                _put(registry, replace(held, status=ClaimStatus.COMMITTED, lease_id=None))
        for ref in decision.destroy_claims:
            held = registry.claims.get(ref.key)
            if held is not None and held.lease_id == decision.lease_id:
                _drop(registry, ref.key)
        _end_lease(registry, decision.lease_id, LeaseStatus.COMMITTED, None)
    elif isinstance(decision, LeaseReleased):
        for ref in decision.claims:
            held = registry.claims.get(ref.key)
            if held is not None and held.lease_id == decision.lease_id:
                _drop(registry, ref.key)
        for ref in decision.destroy_claims:  # kept, as they were before the lease
            held = registry.claims.get(ref.key)
            if held is not None and held.lease_id == decision.lease_id:
                _put(registry, replace(held, lease_id=None))
        _end_lease(registry, decision.lease_id, LeaseStatus.RELEASED, decision.cause)
    elif isinstance(decision, ClaimsCommitted):
        for ref in decision.claims:
            _put(registry, HeldClaim(ref.key[0], ref.key[1], decision.cell_id, decision.owner_type, decision.owner_id,
                                     ClaimStatus.COMMITTED, None, decision.occurred_at))
    elif isinstance(decision, ClaimsDestroyed):
        for ref in decision.claims:
            _drop(registry, ref.key)
    elif isinstance(decision, OwnerTransferred):
        for ref in decision.claims:
            held = registry.claims.get(ref.key)
            if held is not None:
                _put(registry, replace(held, cell_id=decision.to_cell_id, owner_id=decision.to_owner_id))
    elif isinstance(decision, SequenceRangeGranted):
        registry.sequences[decision.sequence_name] = decision.end
        registry.granted_ranges.append(decision)
    else:
        raise TypeError(f"{type(decision).__name__} is not a claim decision")


def _put(registry: Registry, held: HeldClaim) -> None:
    registry.claims[held.key] = held
    registry.changed_claims.add(held.key)


def _drop(registry: Registry, key: ClaimKey) -> None:
    registry.claims.pop(key, None)
    registry.changed_claims.add(key)


def _put_lease(registry: Registry, lease: Lease) -> None:
    registry.leases[lease.lease_id] = lease
    registry.changed_leases.add(lease.lease_id)


def _end_lease(registry: Registry, lease_id: uuid.UUID, status: LeaseStatus, cause: ReleaseCause | None) -> None:
    lease = registry.leases.get(lease_id)
    if lease is not None:
        _put_lease(registry, replace(lease, status=status, cause=cause))


def routed_namespaces(
    before: Mapping[ClaimKey, HeldClaim], after: Mapping[ClaimKey, HeldClaim], keys: Iterable[ClaimKey]
) -> dict[str, str | None]:
    """Which namespaces route somewhere else now: only committed NAMESPACE claims route."""

    def route(rows: Mapping[ClaimKey, HeldClaim], key: ClaimKey) -> str | None:
        held = rows.get(key)
        return held.cell_id if held is not None and held.status is ClaimStatus.COMMITTED else None

    changes: dict[str, str | None] = {}
    for key in keys:
        if key[0] == "NAMESPACE" and route(before, key) != route(after, key):
            changes[key[1]] = route(after, key)
    return changes
