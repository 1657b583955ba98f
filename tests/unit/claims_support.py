"""Builders, registry views and hypothesis strategies shared by the claim tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

from hypothesis import strategies as st

from topology_store.core.claims import ClaimKey, ClaimStatus, HeldClaim, Lease, LeaseStatus, Registry, evolve
from topology_store.schemas.models import (
    MAX_SEQUENCE_RANGE,
    ClaimBucket,
    ClaimCreated,
    ClaimRef,
    ClaimReleased,
    ClaimsDestroyRequested,
    ClaimsRequested,
    Event,
    LeaseCommitRequested,
    LeaseExpiryTick,
    LeaseReleased,
    LeaseRollbackRequested,
    OwnerTransferRequested,
    OwnerType,
    RecordMetadata,
    ReleaseCause,
    SequenceRangeRequested,
    protect_value,
)

SECRET = b"unit-test-secret"
T0 = datetime(2024, 5, 17, 9, 0, 0, tzinfo=UTC)

Owner: TypeAlias = tuple[str, OwnerType, int]
OWNER_A: Owner = ("cell-1", OwnerType.GROUP, 1)
OWNER_B: Owner = ("cell-2", OwnerType.GROUP, 2)


def ref(value: str, bucket: ClaimBucket = ClaimBucket.NAMESPACE) -> ClaimRef:
    return ClaimRef(bucket=bucket, value=value)


def ns(*values: str) -> tuple[ClaimRef, ...]:
    return tuple(ref(v) for v in values)


def key(value: str, bucket: ClaimBucket = ClaimBucket.NAMESPACE) -> ClaimKey:
    """The stored key of a value: canonical, and protected for sensitive buckets."""
    canonical = ClaimRef(bucket=bucket, value=value)
    return (bucket.value, protect_value(bucket, canonical.value, SECRET))


def _id(event_id: uuid.UUID | None) -> uuid.UUID:
    return event_id if event_id is not None else uuid.uuid4()


def begin(
    claims: Sequence[ClaimRef] | str,
    *,
    owner: Owner = OWNER_A,
    lease_id: uuid.UUID | None = None,
    ttl_ms: int = 60_000,
    event_id: uuid.UUID | None = None,
    destroys: Sequence[ClaimRef] = (),
) -> ClaimsRequested:
    cell_id, owner_type, owner_id = owner
    return ClaimsRequested(
        event_id=_id(event_id),
        occurred_at=T0,
        source=cell_id,
        lease_id=lease_id or uuid.uuid4(),
        cell_id=cell_id,
        owner_type=owner_type,
        owner_id=owner_id,
        claims=ns(claims) if isinstance(claims, str) else tuple(claims),
        destroy_claims=tuple(destroys),
        lease_ttl_ms=ttl_ms,
    )


def commit(lease: uuid.UUID | ClaimsRequested, *, cell_id: str | None = None,
           event_id: uuid.UUID | None = None) -> LeaseCommitRequested:
    lease_id = lease.lease_id if isinstance(lease, ClaimsRequested) else lease
    cell = cell_id or (lease.cell_id if isinstance(lease, ClaimsRequested) else "cell-1")
    return LeaseCommitRequested(event_id=_id(event_id), occurred_at=T0, source=cell, lease_id=lease_id, cell_id=cell)


def rollback(lease: uuid.UUID | ClaimsRequested, *, cell_id: str | None = None,
             event_id: uuid.UUID | None = None) -> LeaseRollbackRequested:
    lease_id = lease.lease_id if isinstance(lease, ClaimsRequested) else lease
    cell = cell_id or (lease.cell_id if isinstance(lease, ClaimsRequested) else "cell-1")
    return LeaseRollbackRequested(event_id=_id(event_id), occurred_at=T0, source=cell, lease_id=lease_id,
                                  cell_id=cell)


def destroy(claims: Sequence[ClaimRef] | str, *, owner: Owner = OWNER_A,
            event_id: uuid.UUID | None = None) -> ClaimsDestroyRequested:
    cell_id, owner_type, owner_id = owner
    return ClaimsDestroyRequested(
        event_id=_id(event_id),
        occurred_at=T0,
        source=cell_id,
        cell_id=cell_id,
        owner_type=owner_type,
        owner_id=owner_id,
        claims=ns(claims) if isinstance(claims, str) else tuple(claims),
    )


def transfer(*, owner: Owner = OWNER_A, to_cell_id: str = "cell-3", to_owner_id: int | None = None,
             event_id: uuid.UUID | None = None) -> OwnerTransferRequested:
    cell_id, owner_type, owner_id = owner
    return OwnerTransferRequested(
        event_id=_id(event_id),
        occurred_at=T0,
        source="operator",
        owner_type=owner_type,
        owner_id=owner_id,
        from_cell_id=cell_id,
        to_cell_id=to_cell_id,
        to_owner_id=to_owner_id,
    )


def create(value: str = "gitlab-org", *, bucket: ClaimBucket = ClaimBucket.NAMESPACE, owner: Owner = OWNER_A,
           event_id: uuid.UUID | None = None, occurred_at: datetime = T0) -> ClaimCreated:
    cell_id, owner_type, owner_id = owner
    return ClaimCreated(event_id=_id(event_id), occurred_at=occurred_at, source=cell_id, bucket=bucket, value=value,
                        cell_id=cell_id, owner_type=owner_type, owner_id=owner_id)


def release(value: str = "gitlab-org", *, bucket: ClaimBucket = ClaimBucket.NAMESPACE, owner: Owner = OWNER_A,
            event_id: uuid.UUID | None = None) -> ClaimReleased:
    cell_id, owner_type, owner_id = owner
    return ClaimReleased(event_id=_id(event_id), occurred_at=T0, source=cell_id, bucket=bucket, value=value,
                         cell_id=cell_id, owner_type=owner_type, owner_id=owner_id)


def sequence(name: str = "projects.id", size: int = 100, *, cell_id: str = "cell-1",
             event_id: uuid.UUID | None = None) -> SequenceRangeRequested:
    return SequenceRangeRequested(event_id=_id(event_id), occurred_at=T0, source=cell_id, cell_id=cell_id,
                                  sequence_name=name, size=size)


def tick(*leases: uuid.UUID | ClaimsRequested, event_id: uuid.UUID | None = None) -> LeaseExpiryTick:
    """A tick naming ``leases`` (lease ids or their begins); none: a version-1 tick."""
    lease_ids = tuple(l.lease_id if isinstance(l, ClaimsRequested) else l for l in leases)
    return LeaseExpiryTick(event_id=_id(event_id), occurred_at=T0, source="decider", lease_ids=lease_ids)


# --- views of a registry ---------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """What a registry holds, without the working-copy bookkeeping (changed_*)."""

    claims: dict[ClaimKey, HeldClaim]
    leases: dict[uuid.UUID, Lease]
    sequences: dict[str, int]


def state(registry: Registry) -> State:
    return State(dict(registry.claims), dict(registry.leases), dict(registry.sequences))


def replay(decisions: Iterable[Event], start: Registry | None = None) -> Registry:
    registry = start.copy() if start is not None else Registry()
    for decision in decisions:
        evolve(registry, decision)
    return registry


def invariant_violations(registry: Registry) -> list[str]:
    """Everything wrong with a registry's shape; empty when it is consistent."""
    problems: list[str] = []
    for k, held in registry.claims.items():
        if held.key != k:
            problems.append(f"{k} stored under another key {held.key}")
        if held.status is ClaimStatus.LEASED and held.lease_id is None:
            problems.append(f"{k} is {held.status} without a lease")
        if held.status is ClaimStatus.COMMITTED and held.lease_id is not None:  # LEASE_DESTROYING (adr/0022)
            lease = registry.leases.get(held.lease_id)
            if lease is None or lease.status is not LeaseStatus.OPEN or k not in lease.destroys:
                problems.append(f"{k} is being destroyed by {held.lease_id}, which is {lease}")
            elif lease.cell_id != held.cell_id:
                problems.append(f"{k} of {held.cell_id} is being destroyed by a lease of {lease.cell_id}")
        if held.status is ClaimStatus.LEASED:
            lease = registry.leases.get(held.lease_id)  # type: ignore[arg-type]
            if lease is None:
                problems.append(f"{k} leased by unknown lease {held.lease_id}")
            elif lease.status is not LeaseStatus.OPEN:
                problems.append(f"{k} leased by {lease.status} lease {lease.lease_id}")
            elif k not in lease.claims:
                problems.append(f"{k} leased by {lease.lease_id}, which does not list it")
            elif lease.cell_id != held.cell_id:  # the owner may be the record's own subject (adr/0022)
                problems.append(f"{k} held in another cell than its lease's")
    for lease_id, lease in registry.leases.items():
        if lease.lease_id != lease_id:
            problems.append(f"lease {lease_id} stored under another id")
        if (lease.status is LeaseStatus.RELEASED) != (lease.cause is not None):
            problems.append(f"lease {lease_id} is {lease.status} with cause {lease.cause}")
        if lease.status is LeaseStatus.OPEN:
            for k in lease.claims:
                row = registry.claims.get(k)
                if row is None or row.status is not ClaimStatus.LEASED or row.lease_id != lease_id:
                    problems.append(f"open lease {lease_id} lists {k}, held as {row}")
            for k in lease.destroys:
                row = registry.claims.get(k)
                if row is None or row.status is not ClaimStatus.COMMITTED or row.lease_id != lease_id:
                    problems.append(f"open lease {lease_id} destroys {k}, held as {row}")
            if set(lease.claims) & set(lease.destroys):
                problems.append(f"lease {lease_id} creates and destroys the same claim")
    return problems


def is_expiry(decision: Event) -> bool:
    return (isinstance(decision, LeaseReleased) and decision.cause is ReleaseCause.EXPIRED
            and decision.request_id is None)


def all_text(events: Iterable[Event]) -> str:
    return "\n".join(e.model_dump_json() for e in events)


# --- hypothesis: random interleavings of claim commands ----------------------------------------

CELLS = ["cell-1", "cell-2", "cell-3"]
OWNERS: list[Owner] = [("cell-1", OwnerType.GROUP, 1), ("cell-1", OwnerType.GROUP, 2), ("cell-2", OwnerType.USER, 1)]
CLEAR_EMAIL = "X@Example.com"
PROTECTED_EMAIL = protect_value(ClaimBucket.EMAIL, CLEAR_EMAIL.lower(), SECRET)
# A small value space, so requests collide; one e-mail in clear and pre-hashed form.
VALUES: list[ClaimRef] = [
    ref("a"),
    ref("b"),
    ref("a", ClaimBucket.USERNAME),
    ref("K", ClaimBucket.KEY),
    ref(CLEAR_EMAIL, ClaimBucket.EMAIL),
    ref(PROTECTED_EMAIL, ClaimBucket.EMAIL),
]
LEASE_POOL = [uuid.UUID(int=0xA000 + n) for n in range(6)]
SEQUENCES = ["s.one", "s.two"]
# Log-time steps (ms): often 0 (equal times), past the shortest ttl, past the longest.
TIME_STEPS_MS = [0, 0, 0, 0, 1, 10, 100, 100, 999, 1000, 4_999, 5_000, 61_000]
TTLS_MS = [1000, 5000, 60_000, 0]  # 0: no server-side expiry (GitLab's leases, adr/0022)
# A GitLab record's subject, another owner than the request's (adr/0022).
RECORD = RecordMetadata(owner_type=OwnerType.NAMESPACE, owner_id=9, source_type="RAILS_TABLE_ROUTES",
                        source_id=(9).to_bytes(8, "big"))


def _distinct_refs(refs: Sequence[ClaimRef]) -> tuple[ClaimRef, ...]:
    # The model refuses a request naming a canonical value twice.
    seen: dict[tuple[str, str], ClaimRef] = {}
    for r in refs:
        seen.setdefault(r.key, r)
    return tuple(seen.values())


@st.composite
def commands(
    draw: st.DrawFn,
    event_id: uuid.UUID,
    begun: Sequence[tuple[uuid.UUID, str]] = (),
    asked: Sequence[tuple[Owner, ClaimRef]] = (),
) -> Event:
    """One random claim command. ``begun`` (lease id, cell) lets commits and rollbacks
    mostly aim at leases that were asked for, from the right cell; ``asked`` (owner,
    value) lets destroys and releases mostly name what an owner asked for before."""
    kind = draw(st.sampled_from(
        ["begin", "begin", "begin", "commit", "commit", "rollback", "destroy", "transfer", "create", "create",
         "release", "tick", "sequence"]
    ))
    owner = draw(st.sampled_from(OWNERS))
    if kind in ("destroy", "release") and asked and draw(st.integers(0, 9)) < 7:
        owner, first = draw(st.sampled_from(list(asked)))
        if kind == "release":
            return release(first.value, bucket=first.bucket, owner=owner, event_id=event_id)
        more = [r for o, r in asked if o == owner and r.key != first.key]
        refs = _distinct_refs([first, *draw(st.lists(st.sampled_from(more), max_size=1) if more else st.just([]))])
        return destroy(refs, owner=owner, event_id=event_id)
    if kind in ("begin", "destroy"):
        refs = _distinct_refs(draw(st.lists(st.sampled_from(VALUES), min_size=1, max_size=3)))
        if kind == "begin":
            # Some begins also destroy what their cell asked for (a rename, adr/0022), and some
            # create GitLab records, whose subject is another owner.
            mine = [r for o, r in asked if o[0] == owner[0] and r.key not in {c.key for c in refs}]
            destroys = _distinct_refs(draw(st.lists(st.sampled_from(mine), max_size=2))) if mine else ()
            if draw(st.integers(0, 3)) == 0:
                refs = tuple(r.model_copy(update={"metadata": RECORD}) for r in refs)
            created = {protect_value(r.bucket, r.value, SECRET) for r in refs}
            destroys = tuple(d for d in destroys if protect_value(d.bucket, d.value, SECRET) not in created)
            return begin(refs, owner=owner, lease_id=draw(st.sampled_from(LEASE_POOL)),
                         ttl_ms=draw(st.sampled_from(TTLS_MS)), event_id=event_id, destroys=destroys)
        return destroy(refs, owner=owner, event_id=event_id)
    if kind in ("commit", "rollback"):
        build = commit if kind == "commit" else rollback
        if begun and draw(st.integers(0, 9)) < 8:
            lease_id, cell_id = draw(st.sampled_from(list(begun)))
            if draw(st.integers(0, 9)) == 0:
                cell_id = "cell-3"  # the wrong cell
        else:
            lease_id, cell_id = draw(st.sampled_from(LEASE_POOL)), draw(st.sampled_from(CELLS[:2]))
        return build(lease_id, cell_id=cell_id, event_id=event_id)
    if kind == "transfer":
        to_cell = draw(st.sampled_from([c for c in CELLS if c != owner[0]]))
        return transfer(owner=owner, to_cell_id=to_cell, to_owner_id=draw(st.sampled_from([None, 1, 2])),
                        event_id=event_id)
    if kind in ("create", "release"):
        r = draw(st.sampled_from(VALUES))
        build_claim = create if kind == "create" else release
        return build_claim(r.value, bucket=r.bucket, owner=owner, event_id=event_id)
    if kind == "sequence":
        return sequence(draw(st.sampled_from(SEQUENCES)), draw(st.sampled_from([1, 10, MAX_SEQUENCE_RANGE])),
                        cell_id=owner[0], event_id=event_id)
    # A tick names some leases asked for (mostly), any of the pool, or none (version 1).
    named = draw(st.lists(st.sampled_from([l for l, _ in begun] or LEASE_POOL), max_size=3))
    return tick(*named, *draw(st.lists(st.sampled_from(LEASE_POOL), max_size=1)), event_id=event_id)


@st.composite
def command_logs(draw: st.DrawFn, max_size: int = 30) -> list[tuple[Event, datetime]]:
    """Commands with unique ids at monotone non-decreasing log times (millisecond precision)."""
    size = draw(st.integers(0, max_size))
    log: list[tuple[Event, datetime]] = []
    begun: list[tuple[uuid.UUID, str]] = []
    asked: list[tuple[Owner, ClaimRef]] = []
    at = T0
    for position in range(size):
        at = at + timedelta(milliseconds=draw(st.sampled_from(TIME_STEPS_MS)))
        command = draw(commands(uuid.UUID(int=position + 1), begun, asked))
        remember(command, begun, asked)
        log.append((command, at))
    return log


def remember(command: Event, begun: list[tuple[uuid.UUID, str]], asked: list[tuple[Owner, ClaimRef]]) -> None:
    """Note the leases and values a command asks for, for later commands to aim at."""
    if isinstance(command, ClaimsRequested):
        begun.append((command.lease_id, command.cell_id))
    if isinstance(command, ClaimsRequested | ClaimCreated):
        owner: Owner = (command.cell_id, command.owner_type, command.owner_id)
        refs = command.claims if isinstance(command, ClaimsRequested) else (
            ClaimRef(bucket=command.bucket, value=command.value),)
        asked.extend((owner, r) for r in refs)
