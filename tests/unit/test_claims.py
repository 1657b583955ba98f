"""The claim decider (topology_store.core.claims): decide, evolve, needs, routed_namespaces.

Pure functions, no I/O. Example-based tests of every rule first, then properties
over random interleavings of commands: invariants, atomicity, and replay of the
recorded decisions (live registry == evolve over the decision log).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.claims_support import (
    CLEAR_EMAIL,
    OWNER_A,
    OWNER_B,
    PROTECTED_EMAIL,
    SECRET,
    T0,
    Owner,
    all_text,
    begin,
    command_logs,
    commit,
    create,
    destroy,
    invariant_violations,
    is_expiry,
    key,
    ns,
    ref,
    release,
    replay,
    rollback,
    sequence,
    state,
    tick,
    transfer,
)
from topology_store.core.claims import (
    DECIDER_SOURCE,
    MAX_SEQUENCE_END,
    ClaimStatus,
    HeldClaim,
    Lease,
    LeaseStatus,
    Needs,
    Registry,
    Verdict,
    decide,
    decision_id,
    evolve,
    needs,
    routed_namespaces,
)
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.models import (
    CellState,
    CellStateChanged,
    ClaimBucket,
    ClaimRef,
    ClaimsCommitted,
    ClaimsDestroyed,
    ClaimsRequested,
    Conflict,
    Event,
    LeaseCommitted,
    LeaseExpiryTick,
    LeaseGranted,
    LeaseReleased,
    OwnerTransferred,
    OwnerType,
    RejectionReason,
    ReleaseCause,
    RequestRejected,
    SequenceRangeGranted,
    parse_event,
    protect_value,
)

OWNER_C: Owner = ("cell-3", OwnerType.USER, 3)
SEC = timedelta(seconds=1)
MS = timedelta(milliseconds=1)


def run(registry: Registry, command: Event, at: datetime = T0) -> Verdict:
    return decide(registry, command, at, SECRET)


def granted(registry: Registry, claims: str | tuple[ClaimRef, ...], *, owner: Owner = OWNER_A, at: datetime = T0,
            ttl_ms: int = 60_000, lease_id: uuid.UUID | None = None) -> ClaimsRequested:
    """Begin a lease that must be granted; return its request."""
    request = begin(claims, owner=owner, ttl_ms=ttl_ms, lease_id=lease_id)
    verdict = run(registry, request, at)
    assert verdict.outcome == "applied", verdict
    assert isinstance(verdict.decisions[-1], LeaseGranted)
    return request


def committed(registry: Registry, value: str, *, owner: Owner = OWNER_A, at: datetime = T0,
              bucket: ClaimBucket = ClaimBucket.NAMESPACE) -> None:
    verdict = run(registry, create(value, bucket=bucket, owner=owner), at)
    assert verdict.outcome == "applied", verdict


def held(owner: Owner, value: str, status: ClaimStatus, lease_id: uuid.UUID | None, at: datetime = T0,
         bucket: ClaimBucket = ClaimBucket.NAMESPACE) -> HeldClaim:
    b, v = key(value, bucket)
    return HeldClaim(b, v, owner[0], owner[1], owner[2], status, lease_id, at)


def only(verdict: Verdict) -> Event:
    assert len(verdict.decisions) == 1, verdict
    return verdict.decisions[0]


def rejection(verdict: Verdict) -> RequestRejected:
    assert verdict.outcome == "rejected", verdict
    last = verdict.decisions[-1]
    assert isinstance(last, RequestRejected)
    return last


# --- begin ---------------------------------------------------------------------------------


def test_begin_grants_a_lease_that_ends_at_log_time_plus_ttl() -> None:
    registry = Registry()
    at = T0 + timedelta(hours=1, milliseconds=250)  # the log's time, not the command's occurred_at (T0)
    request = begin(ns("a", "b"), ttl_ms=5_000).model_copy(update={"trace_id": "trace-1"})

    verdict = run(registry, request, at)

    assert verdict == Verdict(
        decisions=(
            LeaseGranted(
                event_id=decision_id(request.event_id, 0),
                occurred_at=at,
                source=DECIDER_SOURCE,
                trace_id="trace-1",
                request_id=request.event_id,
                lease_id=request.lease_id,
                cell_id="cell-1",
                owner_type=OwnerType.GROUP,
                owner_id=1,
                claims=ns("a", "b"),
                expires_at=at + timedelta(seconds=5),
            ),
        ),
        outcome="applied",
    )
    assert registry.claims == {
        key("a"): held(OWNER_A, "a", ClaimStatus.LEASED, request.lease_id, at),
        key("b"): held(OWNER_A, "b", ClaimStatus.LEASED, request.lease_id, at),
    }
    assert registry.leases == {
        request.lease_id: Lease(request.lease_id, request.event_id, "cell-1", OwnerType.GROUP, 1,
                                (key("a"), key("b")), at + 5 * SEC, LeaseStatus.OPEN, granted_at=at)
    }
    assert registry.changed_claims == {key("a"), key("b")}
    assert registry.changed_leases == {request.lease_id}


def test_a_lease_decided_after_lag_gets_its_full_ttl_from_the_decision() -> None:
    # adr/0017: never granted already expired. The request waited 90 s in the log, longer
    # than its TTL; its end counts from the decider's clock.
    registry = Registry()
    at, decided_at = T0, T0 + 90 * SEC + 250 * MS
    request = begin("a", ttl_ms=5_000)

    decision = only(decide(registry, request, at, SECRET, decided_at))

    assert isinstance(decision, LeaseGranted)
    assert decision.occurred_at == at  # the decision's time is still the request's log time
    assert decision.expires_at == decided_at + 5 * SEC
    assert registry.leases[request.lease_id].expires_at == decided_at + 5 * SEC
    # A tick at the end the log time alone would give leaves it open.
    assert run(registry, tick(request), at + 5 * SEC).outcome == "unchanged"
    assert run(registry, tick(request), decided_at + 5 * SEC).outcome == "applied"


def test_a_decider_clock_behind_the_log_does_not_shorten_a_lease() -> None:
    decision = only(decide(Registry(), begin("a", ttl_ms=5_000), T0, SECRET, T0 - 60 * SEC))
    assert isinstance(decision, LeaseGranted) and decision.expires_at == T0 + 5 * SEC


def test_begin_conflict_names_each_conflicting_value_and_its_holders_cell() -> None:
    registry = Registry()
    committed(registry, "a", owner=OWNER_B)
    granted(registry, "c", owner=OWNER_C)
    before = state(registry)
    request = begin(ns("a", "b", "c", "d"))

    verdict = run(registry, request)

    assert only(verdict) == RequestRejected(
        event_id=decision_id(request.event_id, 0),
        occurred_at=T0,
        source=DECIDER_SOURCE,
        request_id=request.event_id,
        request_type="ClaimsRequested",
        reason=RejectionReason.CONFLICT,
        message="2 of 4 claims are held by another owner: NAMESPACE in cell cell-2, NAMESPACE in cell cell-3",
        conflicts=(
            Conflict(bucket=ClaimBucket.NAMESPACE, value="a", cell_id="cell-2"),
            Conflict(bucket=ClaimBucket.NAMESPACE, value="c", cell_id="cell-3"),
        ),
    )
    assert verdict.outcome == "rejected"
    assert verdict.reason == rejection(verdict).message
    assert state(registry) == before


def test_one_conflict_rejects_the_whole_request_and_changes_nothing() -> None:
    registry = Registry()
    committed(registry, "taken", owner=OWNER_B)
    before = state(registry)
    changed = set(registry.changed_claims)
    request = begin(ns("free-1", "free-2", "taken", "free-3"))

    verdict = run(registry, request)

    assert rejection(verdict).reason is RejectionReason.CONFLICT
    assert state(registry) == before
    assert key("free-1") not in registry.claims
    assert request.lease_id not in registry.leases
    assert registry.changed_claims == changed  # nothing new to write


def test_single_claim_conflict_message_names_the_cell() -> None:
    registry = Registry()
    committed(registry, "a", owner=OWNER_B)
    assert rejection(run(registry, begin("a"))).message == "already claimed in cell cell-2"


def test_claims_already_committed_by_the_same_owner_are_skipped() -> None:
    registry = Registry()
    committed(registry, "a")
    request = begin(ns("a", "b"))

    decision = only(run(registry, request))

    assert isinstance(decision, LeaseGranted)
    assert decision.claims == ns("b")
    assert registry.claims[key("a")] == held(OWNER_A, "a", ClaimStatus.COMMITTED, None)
    assert registry.leases[request.lease_id].claims == (key("b"),)


def test_begin_of_only_own_committed_claims_grants_an_empty_lease() -> None:
    registry = Registry()
    committed(registry, "a")
    request = begin("a")
    decision = only(run(registry, request))
    assert isinstance(decision, LeaseGranted) and decision.claims == ()
    done = only(run(registry, commit(request)))
    assert isinstance(done, LeaseCommitted) and done.claims == ()
    assert registry.claims[key("a")].status is ClaimStatus.COMMITTED
    assert registry.leases[request.lease_id].status is LeaseStatus.COMMITTED


@pytest.mark.parametrize(
    "other",
    [("cell-2", OwnerType.GROUP, 1), ("cell-1", OwnerType.PROJECT, 1), ("cell-1", OwnerType.GROUP, 2)],
    ids=["other-cell", "other-owner-type", "other-owner-id"],
)
def test_a_claim_committed_by_anyone_else_conflicts(other: Owner) -> None:
    registry = Registry()
    committed(registry, "a", owner=other)
    assert rejection(run(registry, begin("a"))).conflicts == (
        Conflict(bucket=ClaimBucket.NAMESPACE, value="a", cell_id=other[0]),
    )


@pytest.mark.parametrize("owner", [OWNER_A, OWNER_B], ids=["same-owner", "other-owner"])
def test_a_claim_leased_by_another_lease_conflicts(owner: Owner) -> None:
    registry = Registry()
    first = granted(registry, "a", owner=owner)
    before = state(registry)
    verdict = run(registry, begin("a"))
    assert rejection(verdict).reason is RejectionReason.CONFLICT
    assert rejection(verdict).conflicts == (Conflict(bucket=ClaimBucket.NAMESPACE, value="a", cell_id=owner[0]),)
    assert state(registry) == before
    assert registry.claims[key("a")].lease_id == first.lease_id


@pytest.mark.parametrize("first_outcome", ["open", "committed", "rolled-back"])
def test_reusing_a_lease_id_is_invalid(first_outcome: str) -> None:
    registry = Registry()
    first = granted(registry, "a")
    if first_outcome == "committed":
        run(registry, commit(first))
    elif first_outcome == "rolled-back":
        run(registry, rollback(first))
    before = state(registry)
    again = begin("b", lease_id=first.lease_id)

    verdict = run(registry, again)

    assert rejection(verdict).reason is RejectionReason.INVALID
    assert rejection(verdict).message == "lease id already used by another request"
    assert state(registry) == before
    assert key("b") not in registry.claims


# --- commit --------------------------------------------------------------------------------


def test_commit_makes_the_lease_claims_permanent() -> None:
    registry = Registry()
    request = granted(registry, ns("a", "b"), at=T0)
    command = commit(request)

    verdict = run(registry, command, T0 + 10 * SEC)

    assert verdict == Verdict(
        decisions=(
            LeaseCommitted(
                event_id=decision_id(command.event_id, 0),
                occurred_at=T0 + 10 * SEC,
                source=DECIDER_SOURCE,
                request_id=command.event_id,
                lease_id=request.lease_id,
                cell_id="cell-1",
                owner_type=OwnerType.GROUP,
                owner_id=1,
                claims=ns("a", "b"),
            ),
        ),
        outcome="applied",
    )
    # claimed_at stays the grant's time.
    assert registry.claims == {
        key("a"): held(OWNER_A, "a", ClaimStatus.COMMITTED, None, T0),
        key("b"): held(OWNER_A, "b", ClaimStatus.COMMITTED, None, T0),
    }
    lease = registry.leases[request.lease_id]
    assert (lease.status, lease.cause) == (LeaseStatus.COMMITTED, None)


@pytest.mark.parametrize("build", [commit, rollback], ids=["commit", "rollback"])
def test_unknown_lease_is_rejected(build: Callable[..., Event]) -> None:
    registry = Registry()
    granted(registry, "a")
    before = state(registry)
    command = build(uuid.UUID(int=404))
    verdict = run(registry, command)
    decision = rejection(verdict)
    assert (decision.reason, decision.message) == (RejectionReason.UNKNOWN_LEASE, "no such lease")
    assert decision.request_type == command.EVENT_TYPE
    assert state(registry) == before


@pytest.mark.parametrize("build", [commit, rollback], ids=["commit", "rollback"])
@pytest.mark.parametrize("when", [T0, T0 + 3600 * SEC], ids=["open", "past-expiry"])
def test_another_cell_cannot_end_the_lease(build: Callable[..., Event], when: datetime) -> None:
    registry = Registry()
    request = granted(registry, "a")
    before = state(registry)
    verdict = run(registry, build(request, cell_id="cell-2"), when)
    decision = rejection(verdict)
    assert (decision.reason, decision.message) == (RejectionReason.WRONG_CELL, "the lease belongs to cell cell-1")
    assert state(registry) == before


@pytest.mark.parametrize("offset", [-MS, timedelta(0), MS, SEC * 3600],
                         ids=["1ms-before", "at-its-end", "1ms-after", "an-hour-after"])
def test_a_commit_is_never_expired_by_its_own_log_time(offset: timedelta) -> None:
    # adr/0017: only a tick on the lease's own partition expires it. A commit decided
    # before that tick reached the log before it, so it commits, whatever its own time.
    registry = Registry()
    request = granted(registry, ns("a", "b"), ttl_ms=5_000)
    at = T0 + 5 * SEC + offset

    verdict = run(registry, commit(request), at)

    assert isinstance(only(verdict), LeaseCommitted)
    assert registry.claims[key("a")].status is ClaimStatus.COMMITTED
    assert registry.leases[request.lease_id].status is LeaseStatus.COMMITTED
    # The tick that comes after it on the partition finds nothing to expire.
    assert run(registry, tick(request), at + SEC) == Verdict((), "unchanged", "no named lease due")


def test_a_commit_behind_the_tick_that_expired_its_lease_is_rejected() -> None:
    registry = Registry()
    request = granted(registry, ns("a", "b"), ttl_ms=5_000)
    expiry = tick(request)
    at = T0 + 5 * SEC

    assert run(registry, expiry, at).decisions == (
        LeaseReleased(
            event_id=decision_id(expiry.event_id, 0),
            occurred_at=at,
            source=DECIDER_SOURCE,
            request_id=None,
            lease_id=request.lease_id,
            cell_id="cell-1",
            owner_type=OwnerType.GROUP,
            owner_id=1,
            claims=ns("a", "b"),
            cause=ReleaseCause.EXPIRED,
        ),
    )
    command = commit(request)
    # Stamped no later than the tick, but behind it on the partition: too late.
    verdict = run(registry, command, at)

    assert verdict == Verdict(
        decisions=(
            RequestRejected(
                event_id=decision_id(command.event_id, 0),
                occurred_at=at,
                source=DECIDER_SOURCE,
                request_id=command.event_id,
                request_type="LeaseCommitRequested",
                reason=RejectionReason.LEASE_EXPIRED,
                message="the lease expired before the commit",
            ),
        ),
        outcome="rejected",
        reason="the lease expired before the commit",
    )
    assert registry.claims == {}
    lease = registry.leases[request.lease_id]
    assert (lease.status, lease.cause) == (LeaseStatus.RELEASED, ReleaseCause.EXPIRED)


def test_commit_of_a_lease_expired_earlier_only_rejects() -> None:
    registry = Registry()
    request = granted(registry, "a", ttl_ms=1_000)
    run(registry, tick(request), T0 + 2 * SEC)
    before = state(registry)
    verdict = run(registry, commit(request), T0 + 3 * SEC)
    assert rejection(verdict).reason is RejectionReason.LEASE_EXPIRED
    assert len(verdict.decisions) == 1
    assert state(registry) == before


def test_commit_twice_is_unchanged() -> None:
    registry = Registry()
    request = granted(registry, "a")
    run(registry, commit(request))
    before = state(registry)
    verdict = run(registry, commit(request), T0 + 3600 * SEC)  # even past the old expiry
    assert verdict == Verdict((), "unchanged", "already committed")
    assert state(registry) == before


def test_commit_after_rollback_is_an_unknown_lease() -> None:
    registry = Registry()
    request = granted(registry, "a")
    run(registry, rollback(request))
    decision = rejection(run(registry, commit(request)))
    assert (decision.reason, decision.message) == (RejectionReason.UNKNOWN_LEASE, "the lease was rolled back")


# --- rollback ------------------------------------------------------------------------------


def test_rollback_frees_the_lease_claims() -> None:
    registry = Registry()
    request = granted(registry, ns("a", "b"))
    command = rollback(request)

    verdict = run(registry, command, T0 + SEC)

    assert verdict == Verdict(
        decisions=(
            LeaseReleased(
                event_id=decision_id(command.event_id, 0),
                occurred_at=T0 + SEC,
                source=DECIDER_SOURCE,
                request_id=command.event_id,
                lease_id=request.lease_id,
                cell_id="cell-1",
                owner_type=OwnerType.GROUP,
                owner_id=1,
                claims=ns("a", "b"),
                cause=ReleaseCause.ROLLBACK,
            ),
        ),
        outcome="applied",
    )
    assert registry.claims == {}
    assert registry.changed_claims == {key("a"), key("b")}
    lease = registry.leases[request.lease_id]
    assert (lease.status, lease.cause) == (LeaseStatus.RELEASED, ReleaseCause.ROLLBACK)
    # Free again for anyone.
    assert isinstance(only(run(registry, create("a", owner=OWNER_B))), ClaimsCommitted)


def test_rollback_after_expiry_is_unchanged() -> None:
    registry = Registry()
    request = granted(registry, "a", ttl_ms=1_000)
    run(registry, tick(request), T0 + 2 * SEC)
    before = state(registry)
    assert run(registry, rollback(request), T0 + 3 * SEC) == Verdict((), "unchanged", "the lease had already expired")
    assert state(registry) == before


def test_a_rollback_of_a_lease_past_its_end_before_its_tick_is_a_rollback() -> None:
    registry = Registry()
    request = granted(registry, "a", ttl_ms=1_000)
    decision = only(run(registry, rollback(request), T0 + 60 * SEC))
    assert isinstance(decision, LeaseReleased) and decision.cause is ReleaseCause.ROLLBACK
    assert decision.request_id is not None
    assert registry.leases[request.lease_id].cause is ReleaseCause.ROLLBACK
    assert registry.claims == {}


def test_rollback_twice_is_unchanged() -> None:
    registry = Registry()
    request = granted(registry, "a")
    run(registry, rollback(request))
    before = state(registry)
    assert run(registry, rollback(request)) == Verdict((), "unchanged", "already rolled back")
    assert state(registry) == before


def test_rollback_after_commit_is_invalid_and_keeps_the_claims() -> None:
    registry = Registry()
    request = granted(registry, "a")
    run(registry, commit(request))
    before = state(registry)
    decision = rejection(run(registry, rollback(request)))
    assert decision.reason is RejectionReason.INVALID
    assert state(registry) == before
    assert registry.claims[key("a")].status is ClaimStatus.COMMITTED


# --- no expiry across leases (adr/0017) ------------------------------------------------------


def test_a_request_running_into_a_lease_past_its_end_conflicts_until_that_lease_tick() -> None:
    # Only the lease's own partition may decide that it expired: a request on another
    # partition cannot know whether a commit of that lease is still ahead of it there.
    registry = Registry()
    old = granted(registry, ns("a", "b", "c"), owner=OWNER_B, ttl_ms=5_000)
    before = state(registry)
    late = T0 + 3600 * SEC

    verdict = run(registry, begin("b"), late)

    assert rejection(verdict).conflicts == (Conflict(bucket=ClaimBucket.NAMESPACE, value="b", cell_id="cell-2"),)
    assert len(verdict.decisions) == 1
    assert state(registry) == before  # the lease is still open
    expired = run(registry, tick(old), late)
    assert [(type(d), d.lease_id) for d in expired.decisions] == [(LeaseReleased, old.lease_id)]  # type: ignore[union-attr]
    assert is_expiry(expired.decisions[0])
    assert set(registry.claims) == set()  # a, b and c are free
    request = begin("b")
    decision = only(run(registry, request, late))
    assert isinstance(decision, LeaseGranted) and decision.claims == ns("b")
    assert registry.claims[key("b")].lease_id == request.lease_id


def test_a_claim_created_on_a_value_of_a_lease_past_its_end_conflicts_too() -> None:
    registry = Registry()
    old = granted(registry, "a", owner=OWNER_B, ttl_ms=1_000)
    verdict = run(registry, create("a"), T0 + 2 * SEC)
    assert [type(d) for d in verdict.decisions] == [RequestRejected]
    assert registry.leases[old.lease_id].status is LeaseStatus.OPEN
    assert registry.claims[key("a")].lease_id == old.lease_id


# --- LeaseExpiryTick ------------------------------------------------------------------------


def test_a_tick_expires_the_named_leases_that_are_due_in_its_order_and_nothing_else() -> None:
    registry = Registry()
    due_1 = granted(registry, "d1", ttl_ms=3_000, owner=OWNER_B)
    due_2 = granted(registry, "d2", ttl_ms=3_000)
    due_0 = granted(registry, "d0", ttl_ms=2_000, at=T0 + SEC - MS * 500)  # ends first
    unnamed = granted(registry, "u", ttl_ms=1_000)  # due, but its tick is another one
    not_due = granted(registry, "n", ttl_ms=60_000)
    done = granted(registry, "c", ttl_ms=1_000)
    run(registry, commit(done))
    gone = granted(registry, "r", ttl_ms=1_000)
    run(registry, rollback(gone))
    command = tick(due_1, not_due, due_2, done, gone, uuid.UUID(int=0xDEAD), due_0, due_1)
    at = T0 + 3 * SEC

    verdict = run(registry, command, at)

    assert verdict.outcome == "applied"
    assert all(isinstance(d, LeaseReleased) and is_expiry(d) for d in verdict.decisions)
    assert [d.lease_id for d in verdict.decisions if isinstance(d, LeaseReleased)] == [
        due_1.lease_id, due_2.lease_id, due_0.lease_id
    ]
    assert [d.event_id for d in verdict.decisions] == [decision_id(command.event_id, i) for i in range(3)]
    assert set(registry.claims) == {key("n"), key("c"), key("u")}
    assert registry.leases[not_due.lease_id].status is LeaseStatus.OPEN
    assert registry.leases[unnamed.lease_id].status is LeaseStatus.OPEN
    assert registry.leases[done.lease_id].status is LeaseStatus.COMMITTED
    assert registry.leases[gone.lease_id].cause is ReleaseCause.ROLLBACK
    for lease in (due_0, due_1, due_2):
        assert registry.leases[lease.lease_id].cause is ReleaseCause.EXPIRED


def test_a_tick_before_the_lease_end_leaves_it_and_one_at_its_end_expires_it() -> None:
    registry = Registry()
    request = granted(registry, "a", ttl_ms=5_000)
    before = state(registry)
    assert run(registry, tick(request), T0 + 5 * SEC - MS) == Verdict((), "unchanged", "no named lease due")
    assert state(registry) == before
    assert is_expiry(only(run(registry, tick(request), T0 + 5 * SEC)))


def test_a_tick_naming_no_lease_expires_nothing() -> None:
    # Version 1 of the tick named none and expired every due lease, across partitions.
    registry = Registry()
    granted(registry, "a", ttl_ms=1_000)
    before = state(registry)
    assert run(registry, tick(), T0 + 3600 * SEC) == Verdict((), "unchanged", "the tick names no lease")
    assert state(registry) == before


def test_tick_releases_every_claim_of_a_lease() -> None:
    registry = Registry()
    request = granted(registry, ns("a", "b", "c"), ttl_ms=1_000)
    (decision,) = run(registry, tick(request), T0 + SEC).decisions
    assert isinstance(decision, LeaseReleased) and decision.claims == ns("a", "b", "c")
    assert registry.claims == {}


# --- destroy and ClaimReleased --------------------------------------------------------------


def test_destroy_frees_committed_claims_of_the_owner() -> None:
    registry = Registry()
    for value in ("a", "b", "c"):
        committed(registry, value)
    command = destroy(ns("c", "a"))

    verdict = run(registry, command, T0 + SEC)

    assert verdict == Verdict(
        decisions=(
            ClaimsDestroyed(
                event_id=decision_id(command.event_id, 0),
                occurred_at=T0 + SEC,
                source=DECIDER_SOURCE,
                request_id=command.event_id,
                cell_id="cell-1",
                owner_type=OwnerType.GROUP,
                owner_id=1,
                claims=ns("c", "a"),
            ),
        ),
        outcome="applied",
    )
    assert set(registry.claims) == {key("b")}


def test_destroy_is_all_or_none() -> None:
    registry = Registry()
    committed(registry, "mine")
    committed(registry, "theirs", owner=OWNER_B)
    before = state(registry)

    verdict = run(registry, destroy(ns("mine", "theirs", "nobodys")))

    decision = rejection(verdict)
    assert decision.reason is RejectionReason.NOT_HELD
    assert decision.message == "2 of 3 claims are not held by this owner"
    assert decision.conflicts == (Conflict(bucket=ClaimBucket.NAMESPACE, value="theirs", cell_id="cell-2"),)
    assert state(registry) == before


def test_destroy_of_an_own_leased_claim_is_not_held() -> None:
    registry = Registry()
    granted(registry, "a")
    before = state(registry)
    assert rejection(run(registry, destroy("a"))).reason is RejectionReason.NOT_HELD
    assert state(registry) == before


# --- transfer ------------------------------------------------------------------------------


def test_transfer_moves_every_committed_claim_of_the_owner_and_nothing_else() -> None:
    registry = Registry()
    committed(registry, "b")
    committed(registry, "a")
    committed(registry, "alice", bucket=ClaimBucket.USERNAME)
    lease = granted(registry, "leased")  # the owner's, but not committed
    committed(registry, "other-owner", owner=("cell-1", OwnerType.GROUP, 2))
    committed(registry, "other-type", owner=("cell-1", OwnerType.USER, 1))
    committed(registry, "other-cell", owner=("cell-2", OwnerType.GROUP, 1))
    untouched = {k: v for k, v in registry.claims.items() if k not in {key("a"), key("b"), key("alice", ClaimBucket.USERNAME)}}
    command = transfer(to_cell_id="cell-3")

    verdict = run(registry, command, T0 + SEC)

    assert verdict == Verdict(
        decisions=(
            OwnerTransferred(
                event_id=decision_id(command.event_id, 0),
                occurred_at=T0 + SEC,
                source=DECIDER_SOURCE,
                request_id=command.event_id,
                owner_type=OwnerType.GROUP,
                owner_id=1,
                from_cell_id="cell-1",
                to_cell_id="cell-3",
                to_owner_id=1,  # defaults to the same owner id
                claims=(ref("a"), ref("b"), ref("alice", ClaimBucket.USERNAME)),  # in key order
            ),
        ),
        outcome="applied",
    )
    moved_owner: Owner = ("cell-3", OwnerType.GROUP, 1)
    assert registry.claims[key("a")] == held(moved_owner, "a", ClaimStatus.COMMITTED, None)
    assert registry.claims[key("alice", ClaimBucket.USERNAME)] == held(
        moved_owner, "alice", ClaimStatus.COMMITTED, None, bucket=ClaimBucket.USERNAME
    )
    assert {k: v for k, v in registry.claims.items() if k in untouched} == untouched
    assert registry.claims[key("leased")].lease_id == lease.lease_id


def test_transfer_to_another_owner_id() -> None:
    registry = Registry()
    committed(registry, "a")
    decision = only(run(registry, transfer(to_cell_id="cell-2", to_owner_id=77)))
    assert isinstance(decision, OwnerTransferred) and decision.to_owner_id == 77
    assert registry.claims[key("a")].owner == ("cell-2", "GROUP", 77)
    # The claim is the new owner's now: only they can destroy it.
    assert rejection(run(registry, destroy("a"))).reason is RejectionReason.NOT_HELD
    assert isinstance(only(run(registry, destroy("a", owner=("cell-2", OwnerType.GROUP, 77)))), ClaimsDestroyed)


def test_transfer_with_nothing_to_move_is_unchanged() -> None:
    registry = Registry()
    granted(registry, "leased")
    committed(registry, "b", owner=OWNER_B)
    before = state(registry)
    verdict = run(registry, transfer())
    assert verdict == Verdict((), "unchanged", "the owner holds no committed claims in the source cell")
    assert state(registry) == before


# --- sequences -----------------------------------------------------------------------------


def test_sequence_ranges_are_consecutive_from_one() -> None:
    registry = Registry()
    ranges = []
    for size, name in [(10, "s"), (5, "s"), (1, "t"), (1, "s")]:
        command = sequence(name, size)
        decision = only(run(registry, command))
        assert isinstance(decision, SequenceRangeGranted)
        assert decision.request_id == command.event_id and decision.cell_id == "cell-1"
        ranges.append((decision.sequence_name, decision.start, decision.end))
    assert ranges == [("s", 1, 11), ("s", 11, 16), ("t", 1, 2), ("s", 16, 17)]
    assert registry.sequences == {"s": 17, "t": 2}
    assert [(r.start, r.end) for r in registry.granted_ranges] == [(1, 11), (11, 16), (1, 2), (16, 17)]


def test_sequence_is_exhausted_near_two_to_the_63() -> None:
    registry = Registry(sequences={"s": MAX_SEQUENCE_END - 9})
    assert MAX_SEQUENCE_END == 2**63 - 1
    too_big = run(registry, sequence("s", 10))
    assert rejection(too_big).reason is RejectionReason.EXHAUSTED
    assert registry.sequences == {"s": MAX_SEQUENCE_END - 9}
    assert registry.granted_ranges == []
    last = only(run(registry, sequence("s", 9)))
    assert isinstance(last, SequenceRangeGranted)
    assert (last.start, last.end) == (MAX_SEQUENCE_END - 9, MAX_SEQUENCE_END)  # end exclusive: fits a long
    assert rejection(run(registry, sequence("s", 1))).reason is RejectionReason.EXHAUSTED


# --- sensitive values ----------------------------------------------------------------------


def _assert_no_clear_email(registry: Registry, decisions: list[Event], email: str) -> None:
    clear = email.lower()
    assert clear not in repr(registry.claims) and clear not in repr(registry.leases)
    assert clear not in all_text(decisions).lower()
    assert clear.split("@")[0] not in all_text(decisions).lower()


def test_emails_are_stored_and_decided_protected() -> None:
    registry = Registry()
    email = "Alice.Smith@Example.com"
    decisions: list[Event] = []
    lease = begin((ref(email, ClaimBucket.EMAIL), ref("alice")), ttl_ms=1_000)
    decisions += run(registry, lease).decisions
    protected = protect_value(ClaimBucket.EMAIL, email.lower(), SECRET)
    assert registry.claims[("EMAIL", protected)].status is ClaimStatus.LEASED
    decisions += run(registry, begin((ref(email.upper(), ClaimBucket.EMAIL),), owner=OWNER_B)).decisions
    decisions += run(registry, tick(lease), T0 + 2 * SEC).decisions
    decisions += run(registry, create(email, bucket=ClaimBucket.EMAIL, owner=OWNER_B), T0 + 2 * SEC).decisions
    decisions += run(registry, release(email, bucket=ClaimBucket.EMAIL)).decisions
    decisions += run(registry, transfer(owner=OWNER_B, to_cell_id="cell-3")).decisions
    decisions += run(registry, destroy((ref(email, ClaimBucket.EMAIL),), owner=("cell-3", OwnerType.GROUP, 2))).decisions
    kinds = [type(d).__name__ for d in decisions]
    assert kinds == ["LeaseGranted", "RequestRejected", "LeaseReleased", "ClaimsCommitted", "RequestRejected",
                     "OwnerTransferred", "ClaimsDestroyed"]
    _assert_no_clear_email(registry, decisions, email)
    assert all(ref_.value == protected for d in decisions for ref_ in getattr(d, "claims", ())
               if ref_.bucket is ClaimBucket.EMAIL)


def test_clear_and_prehashed_forms_of_one_email_collide() -> None:
    registry = Registry()
    committed(registry, CLEAR_EMAIL, bucket=ClaimBucket.EMAIL, owner=OWNER_B)
    verdict = run(registry, begin((ref(PROTECTED_EMAIL, ClaimBucket.EMAIL),)))
    assert rejection(verdict).conflicts == (
        Conflict(bucket=ClaimBucket.EMAIL, value=PROTECTED_EMAIL, cell_id="cell-2"),
    )
    # The holder may name it either way.
    assert run(registry, create(PROTECTED_EMAIL, bucket=ClaimBucket.EMAIL, owner=OWNER_B)) == Verdict(
        (), "unchanged", "already held by this owner"
    )
    assert isinstance(only(run(registry, release(PROTECTED_EMAIL, bucket=ClaimBucket.EMAIL, owner=OWNER_B))),
                      ClaimsDestroyed)
    assert registry.claims == {}


def test_protection_depends_on_the_deployment_secret() -> None:
    registry = Registry()
    decide(registry, create(CLEAR_EMAIL, bucket=ClaimBucket.EMAIL), T0, b"another-secret")
    assert ("EMAIL", PROTECTED_EMAIL) not in registry.claims
    assert len(registry.claims) == 1


def test_a_request_naming_one_email_in_both_forms_counts_it_once() -> None:
    # The model's duplicate check runs before protection, so both spellings of one
    # e-mail pass it; the decider must still reserve the e-mail once.
    registry = Registry()
    request = begin((ref(CLEAR_EMAIL, ClaimBucket.EMAIL), ref(PROTECTED_EMAIL, ClaimBucket.EMAIL)))
    decision = only(run(registry, request))
    if isinstance(decision, RequestRejected):
        assert decision.reason is RejectionReason.INVALID
        assert registry.claims == {}
        return
    assert isinstance(decision, LeaseGranted)
    assert [r.key for r in decision.claims] == [("EMAIL", PROTECTED_EMAIL)]
    assert registry.leases[request.lease_id].claims == (("EMAIL", PROTECTED_EMAIL),)


# --- deterministic decision ids --------------------------------------------------------------


BUSY_LEASES = (uuid.UUID(int=0xB1), uuid.UUID(int=0xE1))


def _busy_registry() -> Registry:
    registry = Registry()
    granted(registry, ns("a", "b"), owner=OWNER_B, ttl_ms=1_000, lease_id=BUSY_LEASES[0])
    committed(registry, "c", owner=OWNER_C)
    committed(registry, "d")
    granted(registry, "e", ttl_ms=1_000, lease_id=BUSY_LEASES[1])
    return registry


@pytest.mark.parametrize(
    "command",
    [begin(ns("x", "y")), begin(ns("a", "c")), create("b"), destroy("d"), transfer(), tick(*BUSY_LEASES), sequence(),
     release("c"), commit(BUSY_LEASES[1])],
    ids=["begin", "begin-conflict", "create-into-a-lease", "destroy", "transfer", "tick", "sequence",
         "release-not-held", "commit"],
)
def test_deciding_the_same_command_again_gives_identical_decisions(command: Event) -> None:
    registry = _busy_registry()
    twin = registry.copy()
    at = T0 + 2 * SEC
    first = run(registry, command, at)
    second = run(twin, command, at)
    assert first.decisions  # something was decided
    assert first == second
    assert state(registry) == state(twin)
    # Derived from the command's id and the decision's place, not drawn at random.
    assert [d.event_id for d in first.decisions] == [decision_id(command.event_id, i)
                                                      for i in range(len(first.decisions))]
    assert len({d.event_id for d in first.decisions}) == len(first.decisions)
    other = run(_busy_registry(), command.model_copy(update={"event_id": uuid.uuid4()}), at)
    assert {d.event_id for d in other.decisions}.isdisjoint(d.event_id for d in first.decisions)


# --- routed_namespaces ---------------------------------------------------------------------


def test_only_committed_namespace_claims_route() -> None:
    registry = Registry()
    before = dict(registry.claims)
    lease = granted(registry, ns("a"))
    committed(registry, "alice", bucket=ClaimBucket.USERNAME)
    committed(registry, "b", owner=OWNER_B)
    touched = {key("a"), key("b"), key("alice", ClaimBucket.USERNAME)}
    assert routed_namespaces(before, registry.claims, touched) == {"b": "cell-2"}

    leased = dict(registry.claims)
    run(registry, commit(lease))
    assert routed_namespaces(leased, registry.claims, touched) == {"a": "cell-1"}

    both = dict(registry.claims)
    run(registry, transfer(to_cell_id="cell-3"))
    run(registry, destroy("b", owner=OWNER_B))
    assert routed_namespaces(both, registry.claims, touched) == {"a": "cell-3", "b": None}
    # Keys not named are not looked at; unchanged routes are not reported.
    assert routed_namespaces(both, registry.claims, {key("alice", ClaimBucket.USERNAME)}) == {}
    assert routed_namespaces(registry.claims, registry.claims, touched) == {}


def test_a_rolled_back_lease_never_routed() -> None:
    registry = Registry()
    lease = granted(registry, "a")
    leased = dict(registry.claims)
    run(registry, rollback(lease))
    assert routed_namespaces({}, leased, {key("a")}) == {}
    assert routed_namespaces(leased, registry.claims, {key("a")}) == {}


# --- needs ---------------------------------------------------------------------------------


def test_needs_names_what_a_batch_touches() -> None:
    request = begin((ref("A"), ref(CLEAR_EMAIL, ClaimBucket.EMAIL)))
    lease = uuid.UUID(int=9)
    wanted = needs(
        [
            (request, T0),
            (commit(lease), T0 + SEC),
            (rollback(uuid.UUID(int=10)), T0),
            (create("B", owner=OWNER_B), T0),
            (destroy("c"), T0),
            (transfer(owner=OWNER_C, to_cell_id="cell-1"), T0 + 3 * SEC),
            (sequence("s"), T0),
            (tick(uuid.UUID(int=11), lease), T0 + 2 * SEC),
            (tick(), T0 + 2 * SEC),
        ],
        SECRET,
    )
    # No lease is loaded for being due: only the leases commands name (adr/0017).
    assert wanted == Needs(
        keys=frozenset({key("a"), ("EMAIL", PROTECTED_EMAIL), key("b"), key("c")}),
        lease_ids=frozenset({request.lease_id, lease, uuid.UUID(int=10), uuid.UUID(int=11)}),
        owners=frozenset({("cell-3", "USER", 3)}),
        sequences=frozenset({"s"}),
    )


def test_needs_of_nothing() -> None:
    assert needs([], SECRET) == Needs(frozenset(), frozenset(), frozenset(), frozenset())


# --- not claim events ----------------------------------------------------------------------


def test_decide_refuses_a_non_claim_command() -> None:
    with pytest.raises(TypeError):
        run(Registry(), CellStateChanged(source="s", cell_id="c1", state=CellState.ACTIVE))


def test_evolve_refuses_a_command() -> None:
    with pytest.raises(TypeError):
        evolve(Registry(), begin("a"))


def test_evolve_of_a_rejection_changes_nothing() -> None:
    registry = _busy_registry()
    before = state(registry)
    evolve(registry, RequestRejected(source="d", request_id=uuid.uuid4(), request_type="X",
                                     reason=RejectionReason.CONFLICT, message="m"))
    assert state(registry) == before


# --- properties over random interleavings ---------------------------------------------------

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_step(before: Registry, verdict: Verdict, after: Registry, command: Event, at: datetime) -> None:
    """Atomicity, uniqueness and the outcome's meaning, for one decided command."""
    decisions = list(verdict.decisions)
    rejected = [d for d in decisions if isinstance(d, RequestRejected)]
    # A rejection is the only word; nothing unchanged decides anything.
    if rejected:
        assert verdict.outcome == "rejected" and decisions == rejected
        assert rejected[0].request_id == command.event_id
    elif verdict.outcome == "unchanged":
        assert decisions == []
    else:
        assert verdict.outcome == "applied" and decisions
    # Only a tick expires, only leases it names, and only those it found open and ended.
    expired = [d.lease_id for d in decisions if is_expiry(d)]  # type: ignore[attr-defined]
    if expired:
        assert isinstance(command, LeaseExpiryTick) and set(expired) <= set(command.lease_ids)
        assert all(before.leases[l].status is LeaseStatus.OPEN and before.leases[l].expires_at <= at
                   for l in expired)
    # Step by step: the registry is exactly its previous state evolved by the decisions,
    # a rejection changes nothing, and nothing is granted that someone holds.
    stepping = before.copy()
    for decision in decisions:
        previous = state(stepping)
        if isinstance(decision, LeaseGranted | ClaimsCommitted):
            for r in decision.claims:
                assert r.key not in stepping.claims, (decision, stepping.claims[r.key])
        if isinstance(decision, ClaimsDestroyed | OwnerTransferred):
            for r in decision.claims:
                assert stepping.claims[r.key].status is ClaimStatus.COMMITTED
        evolve(stepping, decision)
        if isinstance(decision, RequestRejected):
            assert state(stepping) == previous
    assert state(stepping) == state(after)
    # A granted begin reserves every claim it names that the owner did not hold already.
    if isinstance(command, ClaimsRequested):
        grants = [d for d in decisions if isinstance(d, LeaseGranted)]
        if grants:
            (grant,) = grants
            for r in command.claims:
                # A GitLab record's owner is its subject; else the request's (adr/0022).
                md = r.metadata
                owner = (command.cell_id, *((md.owner_type.value, md.owner_id) if md else
                                            (command.owner_type.value, command.owner_id)))
                holder = after.claims[key(r.value, r.bucket)]
                assert holder.owner == owner
                assert holder.lease_id == command.lease_id or holder.status is ClaimStatus.COMMITTED
                if holder.lease_id == command.lease_id and md is not None:
                    assert (holder.source_type, holder.source_id) == (md.source_type, md.source_id)
            assert after.leases[command.lease_id].claims == tuple(r.key for r in grant.claims)
            # Every claim it destroys was a committed one of its cell, and now waits for it.
            for r in command.destroy_claims:
                k = key(r.value, r.bucket)
                assert before.claims[k].status is ClaimStatus.COMMITTED and before.claims[k].lease_id is None
                assert after.claims[k].lease_id == command.lease_id and after.claims[k].cell_id == command.cell_id
            assert after.leases[command.lease_id].destroys == tuple(r.key for r in grant.destroy_claims)
        else:
            assert command.lease_id not in after.leases or command.lease_id in before.leases


@PROPERTY_SETTINGS
@given(log=command_logs())
def test_invariants_and_atomicity_hold_after_every_command(log: list[tuple[Event, datetime]]) -> None:
    # One sequence starts near its end, so EXHAUSTED is reached too.
    registry = Registry(sequences={"s.two": MAX_SEQUENCE_END - 2**40 - 5})
    ranges: dict[str, int] = dict(registry.sequences)
    for command, at in log:
        before = registry.copy()
        verdict = run(registry, command, at)
        assert invariant_violations(registry) == []
        _check_step(before, verdict, registry, command, at)
        for decision in verdict.decisions:
            assert decision.occurred_at == at and decision.source == DECIDER_SOURCE
            if isinstance(decision, SequenceRangeGranted):
                # Ranges of one sequence follow each other without gap or overlap.
                assert decision.start == ranges.get(decision.sequence_name, 1) < decision.end
                ranges[decision.sequence_name] = decision.end
    assert registry.sequences == ranges


def _decide_all(log: list[tuple[Event, datetime]]) -> tuple[Registry, list[Event]]:
    registry = Registry()
    decisions: list[Event] = []
    for command, at in log:
        decisions.extend(run(registry, command, at).decisions)
    return registry, decisions


@PROPERTY_SETTINGS
@given(log=command_logs())
def test_replaying_the_recorded_decisions_rebuilds_the_live_registry(log: list[tuple[Event, datetime]]) -> None:
    live, decisions = _decide_all(log)
    ids = [d.event_id for d in decisions]
    assert len(ids) == len(set(ids))  # every decision has its own id

    rebuilt = replay(decisions)
    assert state(rebuilt) == state(live)
    assert rebuilt.granted_ranges == live.granted_ranges

    # The same through the wire format, as the decisions topic records them.
    codec = EventCodec()
    recorded: list[Event] = []
    for decision in decisions:
        decoded = codec.decode(codec.encode(decision.EVENT_TYPE, decision.to_avro()))
        recorded.append(parse_event(decoded.payload, decoded.event_type))
    assert recorded == decisions
    assert state(replay(recorded)) == state(live)


@PROPERTY_SETTINGS
@given(log=command_logs(max_size=20))
def test_deciding_a_log_again_gives_the_same_decisions(log: list[tuple[Event, datetime]]) -> None:
    # Decisions are a function of the log: no clock, no randomness (a crash that
    # rolls back a batch decides it again and must write the same events).
    first_registry, first = _decide_all(log)
    second_registry, second = _decide_all(log)
    assert first == second
    assert state(first_registry) == state(second_registry)


def test_the_property_checks_can_fail() -> None:
    # A registry that breaks the invariant is reported: the checker is not vacuous.
    registry = Registry()
    lease = granted(registry, ns("a", "b"))
    registry.claims.pop(key("b"))
    registry.claims[key("z")] = held(OWNER_A, "z", ClaimStatus.LEASED, uuid.UUID(int=1))
    problems = invariant_violations(registry)
    assert any("open lease" in p and str(lease.lease_id) in p for p in problems)
    assert any("unknown lease" in p for p in problems)


# --- the hot path's shortcuts equal the validated definitions -------------------------------

_CLAIM_TEXT = st.text(alphabet=st.sampled_from("abcXYZ019_.-@é+ "), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(bucket=st.sampled_from(list(ClaimBucket)), value=_CLAIM_TEXT)
def test_the_shortcut_keys_and_refs_equal_what_validation_gives(bucket: ClaimBucket, value: str) -> None:
    from topology_store.core.claims import _refs, command_keys, stored_claims
    from topology_store.schemas.models import ClaimCreated

    try:
        validated = ClaimRef(bucket=bucket, value=value)
    except ValueError:
        return  # not a value of this bucket: nothing to compare
    event = ClaimCreated(source="cell-1", bucket=bucket, value=value, cell_id="cell-1", owner_type=OwnerType.GROUP,
                         owner_id=1)
    # command_keys skips ClaimRef: the model already holds the canonical value.
    assert command_keys(event, SECRET) == stored_claims([validated], SECRET)
    # _refs builds refs of stored keys without validating them again.
    (stored_key,) = stored_claims([validated], SECRET)
    assert _refs([stored_key]) == (ClaimRef(bucket=stored_key[0], value=stored_key[1]),)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(log=command_logs())
def test_every_decision_survives_validation_unchanged(log: list[tuple[Event, datetime]]) -> None:
    # Decisions carry refs built without validation; each must still be a valid event.
    registry = Registry()
    for command, at in log:
        for decision in decide(registry, command, at, SECRET).decisions:
            assert type(decision).model_validate(decision.model_dump()) == decision
