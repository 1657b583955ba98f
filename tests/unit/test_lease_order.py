"""One order for every lease decision (adr/0017), proven over the pure decider.

Every command about a lease (its begin, commits, rollbacks, and the expiry ticks that
name it) is keyed by its lease id, so all of them sit on one partition of the
claim-requests topic, in that partition's order. Partitions are consumed by different
members at different speeds, so the decider sees the partitions interleaved in any
way. Hypothesis draws the per-partition logs (log times non-decreasing per partition,
each command with its own decision lag) and arbitrary interleavings of them, then
checks:

- a lease's fate is what its own partition says, read alone, in order: the decider's
  outcome for every command about a granted lease equals a sequential model of that
  one partition, whatever the other partitions did and however they interleaved;
- so a commit stamped before its lease's end is never rejected as expired;
- a lease is never granted already expired: its end is a full TTL after the later of
  the request's log time and the decider's clock;
- a value never has two holders, after every step.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.claims_support import (
    OWNER_A,
    OWNER_B,
    SECRET,
    T0,
    Owner,
    begin,
    commit,
    create,
    invariant_violations,
    ref,
    rollback,
    tick,
)
from topology_store.core.claims import LeaseStatus, Registry, Verdict, decide, evolve
from topology_store.schemas.models import (
    ClaimsRequested,
    Event,
    LeaseCommitRequested,
    LeaseCommitted,
    LeaseExpiryTick,
    LeaseGranted,
    LeaseReleased,
    LeaseRollbackRequested,
    OwnerType,
    RejectionReason,
    ReleaseCause,
    RequestRejected,
)

OWNER_C: Owner = ("cell-3", OwnerType.USER, 3)
OWNER_D: Owner = ("cell-2", OwnerType.USER, 4)
# Three leases on three partitions, racing for a few values; a fourth partition carries
# one-claim commits (ClaimCreated) of the same values.
LEASES: dict[str, tuple[uuid.UUID, Owner]] = {
    "pA": (uuid.UUID(int=0xA), OWNER_A),
    "pB": (uuid.UUID(int=0xB), OWNER_B),
    "pC": (uuid.UUID(int=0xC), OWNER_C),
}
VALUES = [ref("x"), ref("y"), ref("z")]
STEPS_MS = [0, 0, 1, 250, 999, 1000, 1001, 3000, 6000, 100_000]
LAGS_MS = [0, 0, 5, 500, 2000, 90_000]  # how long a command waited before it was decided
TTLS_MS = [1000, 5000]
SEC = timedelta(seconds=1)


@dataclass(frozen=True)
class Step:
    partition: str
    command: Event
    at: datetime  # its log time
    decided_at: datetime  # the decider's clock when it was decided


Deciding = Callable[[Registry, Event, datetime, bytes, datetime], Verdict]


@st.composite
def lease_partition(draw: st.DrawFn, partition: str) -> list[Step]:
    """A lease's begin, then commits, rollbacks and ticks naming it, in log order."""
    lease_id, owner = LEASES[partition]
    ids = (uuid.uuid5(lease_id, str(n)) for n in range(100))
    at = T0 + timedelta(milliseconds=draw(st.sampled_from(STEPS_MS)))

    def step(command: Event) -> Step:
        return Step(partition, command, at, at + timedelta(milliseconds=draw(st.sampled_from(LAGS_MS))))

    claims = draw(st.lists(st.sampled_from(VALUES), min_size=1, max_size=3, unique_by=lambda r: r.key))
    steps = [step(begin(tuple(claims), owner=owner, lease_id=lease_id, ttl_ms=draw(st.sampled_from(TTLS_MS)),
                        event_id=next(ids)))]
    for _ in range(draw(st.integers(0, 6))):
        at += timedelta(milliseconds=draw(st.sampled_from(STEPS_MS)))
        kind = draw(st.sampled_from(["commit", "commit", "rollback", "tick", "tick", "tick"]))
        if kind == "commit":
            steps.append(step(commit(lease_id, cell_id=owner[0], event_id=next(ids))))
        elif kind == "rollback":
            steps.append(step(rollback(lease_id, cell_id=owner[0], event_id=next(ids))))
        else:
            steps.append(step(tick(lease_id, event_id=next(ids))))
    return steps


@st.composite
def value_partition(draw: st.DrawFn) -> list[Step]:
    """One-claim commits of the racing values by another owner."""
    at = T0
    steps = []
    for n in range(draw(st.integers(0, 3))):
        at += timedelta(milliseconds=draw(st.sampled_from(STEPS_MS)))
        value = draw(st.sampled_from(VALUES))
        steps.append(Step("pV", create(value.value, owner=OWNER_D, event_id=uuid.UUID(int=0xF00 + n)), at,
                          at + timedelta(milliseconds=draw(st.sampled_from(LAGS_MS)))))
    return steps


@st.composite
def partition_logs(draw: st.DrawFn) -> list[list[Step]]:
    return [draw(lease_partition(p)) for p in LEASES] + [draw(value_partition())]


@st.composite
def interleavings(draw: st.DrawFn, logs: Sequence[Sequence[Step]]) -> list[Step]:
    """Any merge of the partitions that keeps each partition's own order."""
    labels = draw(st.permutations([n for n, log in enumerate(logs) for _ in log]))
    heads = [0] * len(logs)
    merged = []
    for n in labels:
        merged.append(logs[n][heads[n]])
        heads[n] += 1
    return merged


def run(merged: Sequence[Step], deciding: Deciding = decide) -> tuple[dict[uuid.UUID, Verdict], list[str]]:
    """Decide the merged log; each command's verdict, and every invariant broken on the way."""
    registry = Registry()
    verdicts: dict[uuid.UUID, Verdict] = {}
    problems: list[str] = []
    for step in merged:
        verdict = deciding(registry, step.command, step.at, SECRET, step.decided_at)
        verdicts[step.command.event_id] = verdict
        problems += [f"after {type(step.command).__name__} in {step.partition}: {p}"
                     for p in invariant_violations(registry)]
        # Never two holders: no value is listed by two open leases, or by an open lease
        # while someone holds it committed.
        listed = [k for lease in registry.leases.values() if lease.status is LeaseStatus.OPEN for k in lease.claims]
        if len(listed) != len(set(listed)):
            problems.append(f"a value listed by two open leases: {sorted(listed)}")
    return verdicts, problems


def _fate(verdict: Verdict) -> tuple[str, ...]:
    """What a verdict did to the lease, comparable across runs."""
    out: list[str] = []
    for d in verdict.decisions:
        if isinstance(d, RequestRejected):
            out.append(f"rejected:{d.reason.value}")
        elif isinstance(d, LeaseReleased):
            out.append(f"released:{d.cause.value}")
        else:
            out.append(type(d).__name__)
    return (verdict.outcome, *out)


def model_of_one_partition(steps: Sequence[Step], expires_at: datetime) -> list[tuple[str, ...]]:
    """What each command after a granted begin must come to, from its partition alone."""
    status = "OPEN"
    fates: list[tuple[str, ...]] = []
    for step in steps[1:]:
        command = step.command
        if isinstance(command, LeaseExpiryTick):
            if status == "OPEN" and step.at >= expires_at:
                status = "EXPIRED"
                fates.append(("applied", "released:EXPIRED"))
            else:
                fates.append(("unchanged",))
        elif isinstance(command, LeaseCommitRequested):
            fates.append({"OPEN": ("applied", "LeaseCommitted"), "COMMITTED": ("unchanged",),
                          "EXPIRED": ("rejected", "rejected:LEASE_EXPIRED"),
                          "ROLLED_BACK": ("rejected", "rejected:UNKNOWN_LEASE")}[status])
            status = "COMMITTED" if status == "OPEN" else status
        elif isinstance(command, LeaseRollbackRequested):
            fates.append({"OPEN": ("applied", "released:ROLLBACK"), "COMMITTED": ("rejected", "rejected:INVALID"),
                          "EXPIRED": ("unchanged",), "ROLLED_BACK": ("unchanged",)}[status])
            status = "ROLLED_BACK" if status == "OPEN" else status
    return fates


def order_violations(logs: Sequence[Sequence[Step]], verdicts: dict[uuid.UUID, Verdict]) -> list[str]:
    """Everything the decisions of one run got wrong about the leases' order."""
    problems: list[str] = []
    for steps in logs:
        if not steps or not isinstance(steps[0].command, ClaimsRequested):
            continue  # the partition of one-claim commits
        first = steps[0].command
        grants = [d for d in verdicts[first.event_id].decisions if isinstance(d, LeaseGranted)]
        if not grants:
            continue  # lost the race for a value: nothing of this lease to check
        (grant,) = grants
        lag_free_end = steps[0].at + timedelta(milliseconds=first.lease_ttl_ms)
        decided_end = steps[0].decided_at + timedelta(milliseconds=first.lease_ttl_ms)
        # Never granted already expired: a full TTL after the later of log and decider clock.
        if grant.expires_at != max(lag_free_end, decided_end) or grant.expires_at <= steps[0].decided_at:
            problems.append(f"{steps[0].partition}: granted until {grant.expires_at}, decided at "
                            f"{steps[0].decided_at}")
        expected = model_of_one_partition(steps, grant.expires_at)
        actual = [_fate(verdicts[s.command.event_id]) for s in steps[1:]]
        if actual != expected:
            problems.append(f"{steps[0].partition}: {actual} where its own partition says {expected}")
        for s in steps[1:]:
            rejection = [d for d in verdicts[s.command.event_id].decisions if isinstance(d, RequestRejected)]
            if rejection and rejection[0].reason is RejectionReason.LEASE_EXPIRED and s.at < grant.expires_at:
                problems.append(f"{steps[0].partition}: a commit stamped {s.at}, before the end "
                                f"{grant.expires_at}, was rejected as expired")
    return problems


ORDER_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@ORDER_SETTINGS
@given(data=st.data(), logs=partition_logs())
def test_every_interleaving_decides_each_lease_as_its_own_partition_says(
    data: st.DataObject, logs: list[list[Step]]
) -> None:
    merged = data.draw(interleavings(logs))
    verdicts, problems = run(merged)
    assert problems == []
    assert order_violations(logs, verdicts) == []


@ORDER_SETTINGS
@given(data=st.data(), logs=partition_logs())
def test_a_lease_fate_does_not_depend_on_how_other_partitions_interleave(
    data: st.DataObject, logs: list[list[Step]]
) -> None:
    first, _ = run(data.draw(interleavings(logs), label="first"))
    second, _ = run(data.draw(interleavings(logs), label="second"))
    for steps in logs[:-1]:
        begun = steps[0].command.event_id
        if _fate(first[begun]) != _fate(second[begun]):
            continue  # the race for a value went the other way: a different lease, not a different fate
        assert [_fate(first[s.command.event_id]) for s in steps] == [_fate(second[s.command.event_id]) for s in steps]


def test_a_tick_of_another_lease_or_a_request_elsewhere_never_ends_a_lease() -> None:
    # The reading of issue 13: lease A's commit (stamped before A's end) waits on a lagging
    # partition while B's tick and C's begin for A's value, both stamped after A's end,
    # are decided first. A still commits; C conflicts until A's own tick.
    a, b, c = (LEASES[p][0] for p in ("pA", "pB", "pC"))
    logs = [
        [Step("pA", begin((ref("x"),), owner=OWNER_A, lease_id=a, ttl_ms=1000), T0, T0),
         Step("pA", commit(a, cell_id=OWNER_A[0]), T0 + timedelta(milliseconds=900), T0 + 3 * SEC)],
        [Step("pB", begin((ref("y"),), owner=OWNER_B, lease_id=b, ttl_ms=1000), T0, T0),
         Step("pB", tick(b), T0 + 2 * SEC, T0 + 2 * SEC)],
        [Step("pC", begin((ref("x"),), owner=OWNER_C, lease_id=c, ttl_ms=1000), T0 + 2 * SEC,
              T0 + 2 * SEC)],
    ]
    merged = [logs[0][0], logs[1][0], logs[1][1], logs[2][0], logs[0][1]]
    verdicts, problems = run(merged)
    assert problems == [] and order_violations(logs, verdicts) == []
    assert isinstance(verdicts[logs[0][1].command.event_id].decisions[0], LeaseCommitted)
    assert verdicts[logs[2][0].command.event_id].outcome == "rejected"


def _legacy_decide(registry: Registry, command: Event, at: datetime, secret: bytes, decided_at: datetime) -> Verdict:
    """The rule before adr/0017, for the checkers to catch: any request past a lease's end
    (on any partition) expires it first, and a grant's end counts from log time only."""
    for lease in list(registry.leases.values()):
        if lease.status is LeaseStatus.OPEN and lease.expires_at <= at:
            expiry = LeaseReleased(source="decider", lease_id=lease.lease_id, cell_id=lease.cell_id,
                                   owner_type=lease.owner_type, owner_id=lease.owner_id, claims=(),
                                   cause=ReleaseCause.EXPIRED)
            for k in lease.claims:
                registry.claims.pop(k, None)
            evolve(registry, expiry)
            if isinstance(command, LeaseCommitRequested) and command.lease_id == lease.lease_id:
                return Verdict((RequestRejected(source="decider", request_id=command.event_id,
                                                request_type=command.EVENT_TYPE,
                                                reason=RejectionReason.LEASE_EXPIRED, message="expired"),),
                               "rejected")
    return decide(registry, command, at, secret, None)


def test_the_order_checks_catch_the_old_cross_partition_expiry() -> None:
    # Not vacuous: the same scenario under the old rule breaks both promises.
    a, c = LEASES["pA"][0], LEASES["pC"][0]
    logs = [
        [Step("pA", begin((ref("x"),), owner=OWNER_A, lease_id=a, ttl_ms=1000), T0, T0 + 90 * SEC),
         Step("pA", commit(a, cell_id=OWNER_A[0]), T0 + timedelta(milliseconds=900), T0 + 95 * SEC)],
        [Step("pC", begin((ref("x"),), owner=OWNER_C, lease_id=c, ttl_ms=1000), T0 + 100 * SEC,
              T0 + 100 * SEC)],
    ]
    merged = [logs[0][0], logs[1][0], logs[0][1]]
    verdicts, _ = run(merged, _legacy_decide)
    problems = order_violations(logs, verdicts)
    assert any("granted until" in p for p in problems)  # born expired after 90 s of lag
    assert any("rejected as expired" in p for p in problems)
    assert any("where its own partition says" in p for p in problems)
    new, new_problems = run(merged)  # the rule of adr/0017 on the same log
    assert new_problems == [] and order_violations(logs, new) == []
