"""The pure projection rules: cell life cycle, claims, and folding batches and replays."""

from __future__ import annotations

import copy
import itertools
import uuid
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.unit import claims_support
from tests.unit.claims_support import SECRET, T0
from topology_store.core.cells import ALLOWED_TRANSITIONS, Cell, Decision, Outcome, apply_cell_event
from topology_store.core.claims import (
    CLAIM_COMMANDS,
    ClaimKey,
    ClaimStatus,
    HeldClaim,
    Lease,
    LeaseStatus,
    Registry,
    Verdict,
    decide,
    needs,
)
from topology_store.core.fold import BatchResult, PositionedEvent, Projection, fold, project_batch, replayed
from topology_store.schemas.models import (
    CellRegistered,
    CellState,
    CellStateChanged,
    CellUpdated,
    ClaimBucket,
    ClaimCreated,
    ClaimRef,
    ClaimReleased,
    ClaimsCommitted,
    ClaimsDestroyed,
    Event,
    LeaseGranted,
    OwnerType,
    RequestRejected,
)

SEC = timedelta(seconds=1)


# --- builders ------------------------------------------------------------------------------


def a_cell(
    cell_id: str = "cell-1",
    *,
    state: CellState = CellState.ACTIVE,
    address: str | None = None,
    session_prefix: str | None = None,
    region: str = "eu-west-1",
    weight: int = 3,
    state_reason: str = "",
    number: int | None = None,
) -> Cell:
    return Cell(
        cell_id=cell_id,
        address=address or f"https://{cell_id}.example.com",
        session_prefix=session_prefix or f"{cell_id}_",
        region=region,
        weight=weight,
        state=state,
        state_reason=state_reason,
        number=number,
    )


def register(
    cell_id: str = "cell-1",
    *,
    address: str | None = None,
    session_prefix: str | None = None,
    region: str = "eu-west-1",
    event_id: uuid.UUID | None = None,
    number: int | None = None,
) -> CellRegistered:
    return CellRegistered(
        event_id=event_id or uuid.uuid4(),
        source="provisioner",
        occurred_at=T0,
        cell_id=cell_id,
        address=address or f"https://{cell_id}.example.com",
        session_prefix=session_prefix or f"{cell_id}_",
        region=region,
        number=number,
    )


def update(cell_id: str = "cell-1", *, event_id: uuid.UUID | None = None, **changes: Any) -> CellUpdated:
    return CellUpdated(
        event_id=event_id or uuid.uuid4(), source="provisioner", occurred_at=T0, cell_id=cell_id, **changes
    )


def change_state(
    state: CellState, cell_id: str = "cell-1", *, reason: str = "", event_id: uuid.UUID | None = None
) -> CellStateChanged:
    return CellStateChanged(
        event_id=event_id or uuid.uuid4(),
        source="operator",
        occurred_at=T0,
        cell_id=cell_id,
        state=state,
        reason=reason,
    )


def create(
    value: str = "gitlab-org",
    *,
    cell_id: str = "cell-1",
    owner_type: OwnerType = OwnerType.GROUP,
    owner_id: int = 1,
    bucket: ClaimBucket = ClaimBucket.NAMESPACE,
    occurred_at: datetime = T0,
    event_id: uuid.UUID | None = None,
) -> ClaimCreated:
    return ClaimCreated(
        event_id=event_id or uuid.uuid4(),
        source=cell_id,
        occurred_at=occurred_at,
        bucket=bucket,
        value=value,
        cell_id=cell_id,
        owner_type=owner_type,
        owner_id=owner_id,
    )


def release(
    value: str = "gitlab-org",
    *,
    cell_id: str = "cell-1",
    owner_type: OwnerType = OwnerType.GROUP,
    owner_id: int = 1,
    bucket: ClaimBucket = ClaimBucket.NAMESPACE,
    occurred_at: datetime = T0,
    event_id: uuid.UUID | None = None,
) -> ClaimReleased:
    return ClaimReleased(
        event_id=event_id or uuid.uuid4(),
        source=cell_id,
        occurred_at=occurred_at,
        bucket=bucket,
        value=value,
        cell_id=cell_id,
        owner_type=owner_type,
        owner_id=owner_id,
    )


def a_claim(
    value: str = "gitlab-org",
    *,
    cell_id: str = "cell-1",
    owner_type: OwnerType = OwnerType.GROUP,
    owner_id: int = 1,
    bucket: ClaimBucket = ClaimBucket.NAMESPACE,
    claimed_at: datetime = T0,
) -> HeldClaim:
    """A committed claim, as the registry holds it."""
    return HeldClaim(bucket.value, value, cell_id, owner_type, owner_id, ClaimStatus.COMMITTED, None, claimed_at)


def claim_key(event: ClaimCreated | ClaimReleased) -> ClaimKey:
    return (event.bucket.value, event.value)


def registry_of(*claims: HeldClaim) -> Registry:
    return Registry(claims={c.key: c for c in claims})


def decide_one(held: HeldClaim | None, event: Event, at: datetime = T0) -> tuple[Verdict, HeldClaim | None]:
    """Decide one ClaimCreated/ClaimReleased against one key's row; the verdict and the row after."""
    assert isinstance(event, ClaimCreated | ClaimReleased)
    registry = registry_of(held) if held is not None else Registry()
    verdict = decide(registry, event, at, SECRET)
    return verdict, registry.claims.get(claim_key(event))


def positioned(events: Iterable[Event], start: int = 0) -> list[PositionedEvent]:
    result = []
    for offset, event in enumerate(events, start):
        topic = "claims" if isinstance(event, CLAIM_COMMANDS) else "cells"
        result.append(PositionedEvent(event=event, topic=topic, partition=0, offset=offset))
    return result


def outcomes(decisions: Sequence[tuple[PositionedEvent, Decision]]) -> list[Outcome]:
    return [decision.outcome for _, decision in decisions]


# --- cell state machine --------------------------------------------------------------------


def test_allowed_transitions_cover_every_state() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(CellState)
    assert ALLOWED_TRANSITIONS[CellState.DECOMMISSIONED] == frozenset()
    for source, targets in ALLOWED_TRANSITIONS.items():
        assert source not in targets  # staying put is UNCHANGED, not a transition


@pytest.mark.parametrize(
    ("from_state", "to_state"),
    list(itertools.product(CellState, CellState)),
    ids=[f"{a.value}->{b.value}" for a, b in itertools.product(CellState, CellState)],
)
def test_every_state_transition(from_state: CellState, to_state: CellState) -> None:
    current = a_cell(state=from_state, state_reason="before")
    decision, row = apply_cell_event({"cell-1": current}, change_state(to_state, reason="after"))

    if from_state is CellState.DECOMMISSIONED:
        assert decision.outcome is Outcome.REJECTED
        assert row == current
    elif to_state is from_state:
        assert decision.outcome is Outcome.UNCHANGED
        assert row == current  # the reason of a no-op is not recorded
    elif to_state in ALLOWED_TRANSITIONS[from_state]:
        assert decision == Decision(Outcome.APPLIED)
        assert row == a_cell(state=to_state, state_reason="after")
    else:
        assert decision.outcome is Outcome.REJECTED
        assert decision.reason == f"transition {from_state.value} -> {to_state.value} not allowed"
        assert row == current


def test_transition_table_is_the_documented_life_cycle() -> None:
    s = CellState
    assert ALLOWED_TRANSITIONS == {
        s.PROVISIONING: {s.ACTIVE, s.DECOMMISSIONED},
        s.ACTIVE: {s.DRAINING, s.READ_ONLY},
        s.DRAINING: {s.ACTIVE, s.READ_ONLY, s.DECOMMISSIONED},
        s.READ_ONLY: {s.ACTIVE, s.DRAINING, s.DECOMMISSIONED},
        s.DECOMMISSIONED: set(),
    }


def test_active_cell_must_drain_before_decommission() -> None:
    cells = {"cell-1": a_cell(state=CellState.ACTIVE)}
    decision, _ = apply_cell_event(cells, change_state(CellState.DECOMMISSIONED))
    assert decision.outcome is Outcome.REJECTED


@pytest.mark.parametrize(
    "event",
    [
        update(weight=9),
        update(address="https://elsewhere.example.com"),
        update(region="us-east-1"),
        change_state(CellState.ACTIVE),
        change_state(CellState.DECOMMISSIONED),
        register(region="elsewhere"),
    ],
    ids=["weight", "address", "region", "to-active", "to-decommissioned", "re-register-different"],
)
def test_decommissioned_cell_rejects_changes(event: CellUpdated | CellStateChanged | CellRegistered) -> None:
    current = a_cell(state=CellState.DECOMMISSIONED)
    decision, row = apply_cell_event({"cell-1": current}, event)
    assert decision.outcome is Outcome.REJECTED
    assert row == current


def test_decommissioned_cell_rejects_identical_re_registration() -> None:
    # Answering UNCHANGED here would tell a producer bringing the cell back that it
    # is registered, when DECOMMISSIONED is final.
    current = a_cell(state=CellState.DECOMMISSIONED)
    decision, row = apply_cell_event({"cell-1": current}, register())
    assert row == current
    assert decision.outcome is Outcome.REJECTED


# --- registration --------------------------------------------------------------------------


def test_register_new_cell_starts_provisioning_with_weight_zero() -> None:
    event = register("cell-2", address="https://c2.example.com", session_prefix="c2", region="us-east-1")
    decision, row = apply_cell_event({"cell-1": a_cell()}, event)
    assert decision == Decision(Outcome.APPLIED)
    assert row == Cell(
        cell_id="cell-2",
        address="https://c2.example.com",
        session_prefix="c2",
        region="us-east-1",
        weight=0,
        state=CellState.PROVISIONING,
        state_reason="",
    )


def test_first_cell_registers_into_empty_topology() -> None:
    decision, row = apply_cell_event({}, register())
    assert decision.outcome is Outcome.APPLIED
    assert row is not None and row.state is CellState.PROVISIONING


@pytest.mark.parametrize("state", [s for s in CellState if s is not CellState.DECOMMISSIONED])
def test_identical_re_registration_is_unchanged(state: CellState) -> None:
    current = a_cell(state=state, weight=5)
    decision, row = apply_cell_event({"cell-1": current}, register())
    assert decision.outcome is Outcome.UNCHANGED
    assert row is current  # neither state nor weight are reset


@pytest.mark.parametrize(
    "changes",
    [{"address": "https://other.example.com"}, {"session_prefix": "other_"}, {"region": "us-east-1"}],
)
def test_re_registration_with_different_attributes_is_rejected(changes: dict[str, str]) -> None:
    current = a_cell()
    decision, row = apply_cell_event({"cell-1": current}, register(**changes))
    assert decision.outcome is Outcome.REJECTED
    assert decision.reason == "cell already registered"
    assert row is current


@pytest.mark.parametrize("other_state", list(CellState))
def test_session_prefix_of_another_cell_is_rejected(other_state: CellState) -> None:
    cells = {"cell-1": a_cell(session_prefix="shared", state=other_state)}
    decision, row = apply_cell_event(cells, register("cell-2", session_prefix="shared"))
    assert decision.outcome is Outcome.REJECTED
    assert decision.reason == "session prefix already used by cell cell-1"
    assert row is None


def test_session_prefix_comparison_is_exact() -> None:
    cells = {"cell-1": a_cell(session_prefix="shared")}
    decision, _ = apply_cell_event(cells, register("cell-2", session_prefix="shared2"))
    assert decision.outcome is Outcome.APPLIED


# --- updates -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"weight": 0}, {"weight": 0}),
        ({"address": "https://new.example.com"}, {"address": "https://new.example.com"}),
        ({"region": "ap-south-1"}, {"region": "ap-south-1"}),
        ({"weight": 10, "region": "ap-south-1"}, {"weight": 10, "region": "ap-south-1"}),
    ],
)
def test_cell_update_changes_only_given_fields(changes: dict[str, Any], expected: dict[str, Any]) -> None:
    current = a_cell(weight=3, state=CellState.DRAINING, state_reason="maintenance")
    decision, row = apply_cell_event({"cell-1": current}, update(**changes))
    assert decision == Decision(Outcome.APPLIED)
    want = {
        "cell_id": "cell-1",
        "address": current.address,
        "session_prefix": current.session_prefix,
        "region": current.region,
        "weight": 3,
        "state": CellState.DRAINING,
        "state_reason": "maintenance",
    }
    want.update(expected)
    assert row == Cell(**want)


@pytest.mark.parametrize(
    "changes",
    [{"weight": 3}, {"region": "eu-west-1"}, {"address": "https://cell-1.example.com", "weight": 3}],
)
def test_cell_update_without_effect_is_unchanged(changes: dict[str, Any]) -> None:
    current = a_cell(weight=3, region="eu-west-1")
    decision, row = apply_cell_event({"cell-1": current}, update(**changes))
    assert decision.outcome is Outcome.UNCHANGED
    assert row is current


@pytest.mark.parametrize(
    "event",
    [update("cell-9", weight=1), change_state(CellState.ACTIVE, "cell-9")],
    ids=["CellUpdated", "CellStateChanged"],
)
def test_events_on_unknown_cells_are_rejected(event: CellUpdated | CellStateChanged) -> None:
    decision, row = apply_cell_event({"cell-1": a_cell()}, event)
    assert decision == Decision(Outcome.REJECTED, "unknown cell")
    assert row is None


# --- GitLab's numeric cell id (adr/0021) -----------------------------------------------------


def test_a_cell_registers_with_its_number() -> None:
    decision, row = apply_cell_event({}, register("cell-1", number=7))
    assert decision.outcome is Outcome.APPLIED and row is not None and row.number == 7


def test_a_cell_registered_without_a_number_has_none() -> None:
    _, row = apply_cell_event({}, register("cell-3"))
    assert row is not None and row.number is None  # no digits are read into the data


@pytest.mark.parametrize("holder_state", [CellState.ACTIVE, CellState.DECOMMISSIONED])
def test_a_second_cell_claiming_a_taken_number_is_rejected(holder_state: CellState) -> None:
    cells = {"cell-1": a_cell("cell-1", number=1, state=holder_state)}
    decision, row = apply_cell_event(cells, register("cell-2", number=1))
    assert decision == Decision(Outcome.REJECTED, "cell number 1 already used by cell cell-1")
    assert row is None


def test_re_registration_with_another_number_is_rejected_and_the_same_one_unchanged() -> None:
    _, row = apply_cell_event({}, register("cell-1", number=1))
    assert row is not None
    cells = {"cell-1": row}
    assert apply_cell_event(cells, register("cell-1", number=1))[0].outcome is Outcome.UNCHANGED
    assert apply_cell_event(cells, register("cell-1", number=2))[0] == Decision(Outcome.REJECTED,
                                                                                "cell already registered")
    assert apply_cell_event(cells, register("cell-1"))[0].outcome is Outcome.REJECTED


def test_an_update_records_the_number_of_a_cell_that_has_none() -> None:
    decision, row = apply_cell_event({"cell-1": a_cell()}, update(number=5))
    assert decision.outcome is Outcome.APPLIED and row == a_cell(number=5)


def test_an_update_naming_the_cells_own_number_is_unchanged() -> None:
    decision, row = apply_cell_event({"cell-1": a_cell(number=5)}, update(number=5))
    assert decision.outcome is Outcome.UNCHANGED and row == a_cell(number=5)


def test_a_cells_number_never_changes() -> None:
    decision, row = apply_cell_event({"cell-1": a_cell(number=5)}, update(number=6, weight=9))
    assert decision == Decision(Outcome.REJECTED, "cell number is 5; a cell's number never changes")
    assert row == a_cell(number=5)  # nothing of the event applied, the weight neither


def test_an_update_to_a_number_another_cell_holds_is_rejected() -> None:
    cells = {"cell-1": a_cell("cell-1", number=1), "cell-2": a_cell("cell-2")}
    decision, row = apply_cell_event(cells, update("cell-2", number=1))
    assert decision == Decision(Outcome.REJECTED, "cell number 1 already used by cell cell-1")
    assert row == cells["cell-2"]


def test_a_number_is_kept_through_other_updates_and_state_changes() -> None:
    cells = {"cell-1": a_cell(number=5, state=CellState.PROVISIONING)}
    _, updated = apply_cell_event(cells, update(weight=1))
    _, active = apply_cell_event(cells, change_state(CellState.ACTIVE))
    assert updated is not None and updated.number == 5 and active is not None and active.number == 5


@pytest.mark.parametrize("number", [0, -1, 2**63])
def test_a_number_outside_gitlabs_positive_int64_is_invalid(number: int) -> None:
    with pytest.raises(ValueError, match="number"):
        register(number=number)
    with pytest.raises(ValueError, match="number"):
        update(number=number)


def test_an_update_of_the_number_alone_is_valid() -> None:
    assert update(number=3).number == 3
    with pytest.raises(ValueError, match="at least one of address, region, weight, number"):
        update()


def test_apply_cell_event_does_not_mutate_cells() -> None:
    cells = {"cell-1": a_cell(state=CellState.PROVISIONING)}
    snapshot = dict(cells)
    apply_cell_event(cells, change_state(CellState.ACTIVE))
    apply_cell_event(cells, register("cell-2"))
    assert cells == snapshot


# --- claims: ClaimCreated / ClaimReleased through the decider -------------------------------


def test_create_on_free_claim_is_committed_at_log_time() -> None:
    at = T0 + timedelta(minutes=5, milliseconds=123)
    event = create("GitLab-Org", cell_id="cell-2", owner_type=OwnerType.PROJECT, owner_id=42, occurred_at=T0)
    verdict, row = decide_one(None, event, at)
    assert verdict.outcome == "applied" and verdict.reason is None
    (decision,) = verdict.decisions
    assert isinstance(decision, ClaimsCommitted)
    assert decision.request_id == event.event_id
    assert [r.key for r in decision.claims] == [("NAMESPACE", "gitlab-org")]
    # claimed_at is the log's time, not the emitter's occurred_at.
    assert row == a_claim("gitlab-org", cell_id="cell-2", owner_type=OwnerType.PROJECT, owner_id=42, claimed_at=at)
    assert row is not None and row.key == ("NAMESPACE", "gitlab-org") == claim_key(event)


def test_create_by_same_holder_is_unchanged_and_keeps_claimed_at() -> None:
    current = a_claim(claimed_at=T0)
    verdict, row = decide_one(current, create(), T0 + timedelta(hours=1))
    assert verdict == Verdict((), "unchanged", "already held by this owner")
    assert row is current


@pytest.mark.parametrize(
    "other",
    [
        {"cell_id": "cell-2"},
        {"owner_id": 2},
        {"owner_type": OwnerType.PROJECT},
    ],
    ids=["other-cell", "other-owner-id", "other-owner-type"],
)
def test_create_by_another_holder_is_rejected(other: dict[str, Any]) -> None:
    current = a_claim()
    verdict, row = decide_one(current, create(**other))
    assert verdict.outcome == "rejected"
    assert verdict.reason == "already claimed in cell cell-1"
    (decision,) = verdict.decisions
    assert isinstance(decision, RequestRejected) and decision.request_type == "ClaimCreated"
    assert row is current


def test_release_by_holder_frees_the_claim() -> None:
    event = release()
    verdict, row = decide_one(a_claim(), event)
    assert verdict.outcome == "applied"
    (decision,) = verdict.decisions
    assert isinstance(decision, ClaimsDestroyed) and decision.request_id == event.event_id
    assert row is None


@pytest.mark.parametrize(
    "other",
    [{"cell_id": "cell-2"}, {"owner_id": 2}, {"owner_type": OwnerType.USER}],
    ids=["other-cell", "other-owner-id", "other-owner-type"],
)
def test_release_by_non_holder_is_rejected(other: dict[str, Any]) -> None:
    current = a_claim()
    verdict, row = decide_one(current, release(**other))
    assert verdict.outcome == "rejected"
    assert verdict.reason == "held by another owner in cell cell-1"
    assert row is current


def test_release_of_free_claim_is_rejected() -> None:
    verdict, row = decide_one(None, release())
    assert (verdict.outcome, verdict.reason) == ("rejected", "not claimed")
    assert row is None


def test_release_of_a_leased_claim_is_rejected() -> None:
    registry = Registry()
    request = claims_support.begin("gitlab-org")
    decide(registry, request, T0, SECRET)
    before = dict(registry.claims)
    verdict = decide(registry, release(), T0, SECRET)
    assert verdict.outcome == "rejected"
    assert registry.claims == before


# --- project_batch -------------------------------------------------------------------------


def batch(
    events: Iterable[PositionedEvent],
    cells: Mapping[str, Cell] | None = None,
    registry: Registry | None = None,
    seen: Set[uuid.UUID] = frozenset(),
) -> BatchResult:
    return project_batch(events, cells or {}, registry or Registry(), seen, SECRET)


def test_project_batch_applies_in_order_and_reports_final_rows() -> None:
    events = positioned(
        [
            register("cell-1"),
            change_state(CellState.ACTIVE, "cell-1"),
            update("cell-1", weight=4),
            create("a"),
            create("b", cell_id="cell-2"),
        ]
    )
    result = batch(events)
    assert outcomes(result.decisions) == [Outcome.APPLIED] * 5
    assert result.cells == {
        "cell-1": Cell(
            cell_id="cell-1",
            address="https://cell-1.example.com",
            session_prefix="cell-1_",
            region="eu-west-1",
            weight=4,
            state=CellState.ACTIVE,
            state_reason="",
        )
    }
    assert result.registry.claims == {("NAMESPACE", "a"): a_claim("a"), ("NAMESPACE", "b"): a_claim("b", cell_id="cell-2")}
    assert result.registry.changed_claims == {("NAMESPACE", "a"), ("NAMESPACE", "b")}
    assert result.namespaces == {"a": "cell-1", "b": "cell-2"}
    assert [type(d) for d in result.claim_decisions] == [ClaimsCommitted, ClaimsCommitted]
    # Each claim command's decision carries the events it produced.
    assert [d.events for _, d in result.decisions][3:] == [(result.claim_decisions[0],), (result.claim_decisions[1],)]
    assert result.routing_changed


def test_decisions_are_in_input_order() -> None:
    events = positioned([create("a"), release("b"), create("a", owner_id=9), register("cell-1"), create("c")])
    result = batch(events)
    assert [p for p, _ in result.decisions] == events
    assert [p.offset for p, _ in result.decisions] == [0, 1, 2, 3, 4]
    assert outcomes(result.decisions) == [
        Outcome.APPLIED,
        Outcome.REJECTED,
        Outcome.REJECTED,
        Outcome.APPLIED,
        Outcome.APPLIED,
    ]
    # Rejections are recorded too, in order.
    assert [type(d) for d in result.claim_decisions] == [ClaimsCommitted, RequestRejected, RequestRejected,
                                                         ClaimsCommitted]


def test_already_seen_event_ids_are_duplicates_and_change_nothing() -> None:
    seen_create = create("a")
    events = positioned([seen_create, register("cell-1", event_id=uuid.UUID(int=7))])
    result = batch(events, seen={seen_create.event_id, uuid.UUID(int=7)})
    assert [d for _, d in result.decisions] == [Decision(Outcome.DUPLICATE), Decision(Outcome.DUPLICATE)]
    assert result.cells == {}
    assert result.registry.claims == {}
    assert result.claim_decisions == []
    assert not result.routing_changed


def test_repeats_within_a_batch_are_duplicates() -> None:
    first = create("a")
    # Same event_id, different content: the id alone decides.
    replay = create("a", cell_id="cell-2", event_id=first.event_id)
    release_it = release("a")
    release_replay = release("a", event_id=release_it.event_id)
    result = batch(positioned([first, replay, release_it, release_replay]))
    assert outcomes(result.decisions) == [Outcome.APPLIED, Outcome.DUPLICATE, Outcome.APPLIED, Outcome.DUPLICATE]
    assert result.registry.claims == {}
    assert result.registry.changed_claims == {("NAMESPACE", "a")}  # written as freed
    assert len(result.claim_decisions) == 2


def test_a_rejected_event_is_a_duplicate_when_redelivered() -> None:
    rejected = release("a")
    result = batch(positioned([rejected, create("a"), rejected]))
    assert outcomes(result.decisions) == [Outcome.REJECTED, Outcome.APPLIED, Outcome.DUPLICATE]
    assert result.registry.claims == {("NAMESPACE", "a"): a_claim("a")}


def test_create_release_create_in_one_batch_leaves_the_final_row() -> None:
    later = T0 + timedelta(seconds=30)
    events = [
        PositionedEvent(create("a", owner_id=1), "claims", 0, 0, log_time=T0),
        PositionedEvent(release("a", owner_id=1), "claims", 0, 1, log_time=T0),
        PositionedEvent(create("a", cell_id="cell-2", owner_type=OwnerType.USER, owner_id=2), "claims", 0, 2,
                        log_time=later),
    ]
    result = batch(events)
    assert outcomes(result.decisions) == [Outcome.APPLIED] * 3
    assert result.registry.claims == {
        ("NAMESPACE", "a"): a_claim("a", cell_id="cell-2", owner_type=OwnerType.USER, owner_id=2, claimed_at=later)
    }
    assert result.namespaces == {"a": "cell-2"}


def test_create_then_release_in_one_batch_reports_the_key_as_released() -> None:
    result = batch(positioned([create("a"), release("a")]))
    assert result.registry.claims == {}
    assert result.registry.changed_claims == {("NAMESPACE", "a")}
    assert result.namespaces == {}  # it never routed before, and does not now
    assert not result.routing_changed  # so no new version for routers


def test_batch_uses_given_rows_and_absent_means_free() -> None:
    registry = registry_of(a_claim("a", owner_id=1))
    events = positioned([create("a", owner_id=2), create("b", owner_id=2), release("a", owner_id=1)])
    result = batch(events, registry=registry)
    assert outcomes(result.decisions) == [Outcome.REJECTED, Outcome.APPLIED, Outcome.APPLIED]
    assert result.registry.claims == {("NAMESPACE", "b"): a_claim("b", owner_id=2)}
    assert result.registry.changed_claims == {("NAMESPACE", "a"), ("NAMESPACE", "b")}
    assert result.namespaces == {"a": None, "b": "cell-1"}


def test_same_value_in_different_buckets_are_different_claims() -> None:
    events = positioned(
        [create("alice", bucket=ClaimBucket.NAMESPACE), create("alice", bucket=ClaimBucket.USERNAME, owner_id=2)]
    )
    result = batch(events)
    assert outcomes(result.decisions) == [Outcome.APPLIED, Outcome.APPLIED]
    assert set(result.registry.claims) == {("NAMESPACE", "alice"), ("USERNAME", "alice")}
    assert result.namespaces == {"alice": "cell-1"}  # only NAMESPACE claims route


def test_case_variants_collide_on_one_claim() -> None:
    events = positioned([create("GitLab-Org", owner_id=1), create("gitlab-ORG", owner_id=2)])
    result = batch(events)
    assert outcomes(result.decisions) == [Outcome.APPLIED, Outcome.REJECTED]


def test_unchanged_and_rejected_events_change_nothing() -> None:
    cells = {"cell-1": a_cell()}
    registry = registry_of(a_claim("a"))
    events = positioned(
        [
            create("a"),
            create("a", owner_id=5),
            register("cell-1"),
            update("cell-1", weight=3),
            change_state(CellState.PROVISIONING),
        ]
    )
    result = batch(events, cells, registry)
    assert outcomes(result.decisions) == [
        Outcome.UNCHANGED,
        Outcome.REJECTED,
        Outcome.UNCHANGED,
        Outcome.UNCHANGED,
        Outcome.REJECTED,
    ]
    assert result.cells == {}
    assert result.registry.changed_claims == set()
    assert result.registry.changed_leases == set()
    assert result.namespaces == {}
    assert not result.routing_changed
    # The rejection is still a decision to record.
    assert [type(d) for d in result.claim_decisions] == [RequestRejected]


def test_claim_commands_are_decided_at_log_time() -> None:
    request = claims_support.begin("a", ttl_ms=5_000)
    events = [
        PositionedEvent(request, "claim-requests", 0, 0, log_time=T0 + 100 * SEC),
        PositionedEvent(claims_support.commit(request), "claim-requests", 0, 1, log_time=T0 + 104 * SEC),
    ]
    result = batch(events)
    granted, committed = result.claim_decisions
    assert isinstance(granted, LeaseGranted) and granted.expires_at == T0 + 105 * SEC
    assert committed.occurred_at == T0 + 104 * SEC
    assert result.registry.claims[("NAMESPACE", "a")].status is ClaimStatus.COMMITTED
    assert result.namespaces == {"a": "cell-1"}


def test_without_log_time_the_event_time_is_used() -> None:
    request = claims_support.begin("a", ttl_ms=5_000)
    result = batch([PositionedEvent(request, "claim-requests", 0, 0)])
    (granted,) = result.claim_decisions
    assert isinstance(granted, LeaseGranted) and granted.expires_at == request.occurred_at + 5 * SEC


def test_leases_change_the_registry_but_not_routing() -> None:
    # Routers must not see a new version when nothing they route by changed.
    request = claims_support.begin("a")
    leased = batch(positioned([request]))
    assert not leased.routing_changed and leased.registry.changed_leases == {request.lease_id}
    assert leased.namespaces == {}  # a lease does not route


def test_a_granted_sequence_range_changes_routing() -> None:
    # The cell's document carries its ranges (GitLab's CellInfo.sequence_ranges, adr/0021).
    ranged = batch(positioned([claims_support.sequence()]))
    assert ranged.routing_changed and len(ranged.registry.granted_ranges) == 1
    assert ranged.cells == {} and ranged.namespaces == {}


def test_project_batch_does_not_mutate_its_inputs() -> None:
    seen_id = uuid.uuid4()
    cells = {"cell-1": a_cell(state=CellState.PROVISIONING)}
    registry = registry_of(a_claim("a"))
    seen = {seen_id}
    events = positioned(
        [
            change_state(CellState.ACTIVE),
            register("cell-2"),
            release("a"),
            create("b"),
            create("c"),
            create("d", event_id=seen_id),
            claims_support.begin("e"),
            claims_support.sequence(),
        ]
    )
    before = (copy.deepcopy(cells), copy.deepcopy(registry), set(seen), list(events))

    result = project_batch(iter(events), cells, registry, frozenset(seen) | seen, SECRET)  # any Set works
    project_batch(events, cells, registry, seen, SECRET)

    assert result.routing_changed
    assert result.registry is not registry
    assert (cells, registry, seen, events) == before


def test_a_fold_without_the_secret_follows_decisions_and_never_decides() -> None:
    live = project_batch(positioned([register(), create("a"), create("b", cell_id="cell-2")]), {}, Registry(),
                         set(), SECRET)
    decisions = positioned(live.claim_decisions)
    projection = Projection()

    followed = fold(decisions, projection)

    assert outcomes(followed.decisions) == [Outcome.APPLIED, Outcome.APPLIED]
    assert followed.claim_decisions == []  # recorded once, by the decider; a replay records nothing
    assert projection.registry.claims == live.registry.claims
    assert outcomes(fold(decisions, projection).decisions) == [Outcome.DUPLICATE] * 2  # the relay repeats
    with pytest.raises(TypeError, match="cannot decide ClaimCreated"):
        fold(positioned([create("c")]), projection)


def test_replayed_folds_whole_logs_in_memory() -> None:
    cell = register()
    projection = replayed([cell, cell], project_batch(positioned([create("a")]), {}, Registry(), set(),
                                                      SECRET).claim_decisions)
    assert list(projection.cells) == ["cell-1"] and list(projection.registry.claims) == [("NAMESPACE", "a")]
    assert len(projection.seen) == 2  # the cell event once, and the one decision


# --- batch-boundary independence (property) ------------------------------------------------

CELL_IDS = ["cell-1", "cell-2", "cell-3"]
PREFIXES = ["p1", "p2", "p3", "p4"]
ID_POOL = [uuid.UUID(int=n) for n in range(1, 7)]


@st.composite
def initial_cells(draw: st.DrawFn) -> dict[str, Cell]:
    """Some of the cells already exist, in any state, with distinct prefixes p1..p3."""
    cells = {}
    for number, cell_id in enumerate(CELL_IDS, 1):
        if draw(st.booleans()):
            cells[cell_id] = a_cell(
                cell_id,
                state=draw(st.sampled_from(list(CellState))),
                address="https://x.example.com",
                session_prefix=f"p{number}",
                region="eu",
                weight=1,
            )
    return cells


@st.composite
def cell_events(draw: st.DrawFn, event_id: uuid.UUID) -> Event:
    kind = draw(st.sampled_from(["register", "update", "state", "state"]))
    cell_id = draw(st.sampled_from(CELL_IDS))
    if kind == "register":
        return register(
            cell_id,
            session_prefix=draw(st.sampled_from(PREFIXES)),
            address=f"https://{draw(st.sampled_from(['x', 'y']))}.example.com",
            region=draw(st.sampled_from(["eu", "us"])),
            event_id=event_id,
        )
    if kind == "update":
        changes = {
            "address": draw(st.sampled_from([None, "https://x.example.com", "https://z.example.com"])),
            "region": draw(st.sampled_from([None, "eu", "ap"])),
            "weight": draw(st.sampled_from([None, 0, 1, 5])),
        }
        if all(value is None for value in changes.values()):
            changes["weight"] = 1
        return update(cell_id, event_id=event_id, **changes)
    return change_state(
        draw(st.sampled_from(list(CellState))), cell_id, reason=draw(st.sampled_from(["", "why"])), event_id=event_id
    )


@st.composite
def event_logs(draw: st.DrawFn) -> list[PositionedEvent]:
    """Cell events and claim commands interleaved, some ids repeated (redeliveries),
    at monotone non-decreasing log times that need not match occurred_at."""
    size = draw(st.integers(0, 30))
    events: list[PositionedEvent] = []
    begun: list[tuple[uuid.UUID, str]] = []
    asked: list[tuple[claims_support.Owner, ClaimRef]] = []
    at = T0
    for position in range(size):
        at += timedelta(milliseconds=draw(st.sampled_from(claims_support.TIME_STEPS_MS)))
        pooled = draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, len(ID_POOL) - 1)))
        event_id = ID_POOL[pooled] if pooled is not None else uuid.UUID(int=10_000 + position)
        event: Event
        if draw(st.integers(0, 3)) == 0:
            event = draw(cell_events(event_id))
        else:
            event = draw(claims_support.commands(event_id, begun, asked))
            claims_support.remember(event, begun, asked)
        topic = "claims" if isinstance(event, CLAIM_COMMANDS) else "cells"
        events.append(PositionedEvent(event=event, topic=topic, partition=0, offset=position, log_time=at))
    return events


@dataclass
class Store:
    """What the store keeps between batches: every row, and the ids processed."""

    cells: dict[str, Cell]
    claims: dict[ClaimKey, HeldClaim] = field(default_factory=dict)
    leases: dict[uuid.UUID, Lease] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=dict)
    routes: dict[str, str | None] = field(default_factory=dict)
    seen: set[uuid.UUID] = field(default_factory=set)

    def load(self, commands: Sequence[tuple[Event, datetime]]) -> Registry:
        """What projector.registry_store.load_registry reads for these commands."""
        wanted = needs(commands, SECRET)
        registry = Registry()
        for k in wanted.keys:
            if k in self.claims:
                registry.claims[k] = self.claims[k]
        for k, row in self.claims.items():
            if row.owner in wanted.owners:
                registry.claims[k] = row
        for lease_id, lease in self.leases.items():
            if lease_id in wanted.lease_ids:
                registry.leases[lease_id] = lease
        for lease in registry.leases.values():
            if lease.status is LeaseStatus.OPEN:
                for k in (*lease.claims, *lease.destroys):  # those it creates and those it destroys
                    if k in self.claims:
                        registry.claims[k] = self.claims[k]
        registry.sequences.update({n: self.sequences[n] for n in wanted.sequences if n in self.sequences})
        return registry

    def write(self, result: BatchResult) -> None:
        """What the store writes back: changed rows only."""
        self.cells.update(result.cells)
        working = result.registry
        for k in working.changed_claims:
            if k in working.claims:
                self.claims[k] = working.claims[k]
            else:
                self.claims.pop(k, None)
        for lease_id in working.changed_leases:
            self.leases[lease_id] = working.leases[lease_id]
        for granted in working.granted_ranges:
            self.sequences[granted.sequence_name] = max(self.sequences.get(granted.sequence_name, 0), granted.end)
        self.routes.update(result.namespaces)


def _fold(
    batches: Sequence[Sequence[PositionedEvent]], cells: Mapping[str, Cell]
) -> tuple[Store, tuple[list[tuple[int, Decision]], list[Event]]]:
    """What the store does batch after batch, carrying rows and seen ids forward; it
    hands each batch only the rows ``needs`` names and the seen ids among the batch.
    Returns the store and (each event's decision, the claim decisions recorded)."""
    store = Store(cells=dict(cells))
    per_event: list[tuple[int, Decision]] = []
    recorded: list[Event] = []
    for part in batches:
        ids = {p.event.event_id for p in part}
        commands = [(p.event, p.at) for p in part if isinstance(p.event, CLAIM_COMMANDS)]
        result = project_batch(part, store.cells, store.load(commands), store.seen & ids, SECRET)
        store.write(result)
        store.seen |= ids
        per_event.extend((p.offset, d) for p, d in result.decisions)
        recorded.extend(result.claim_decisions)
    return store, (per_event, recorded)


def _split(events: Sequence[PositionedEvent], cuts: Iterable[int]) -> list[list[PositionedEvent]]:
    bounds = [0, *sorted(set(cuts)), len(events)]
    return [list(events[a:b]) for a, b in itertools.pairwise(bounds)]


def _routes(store: Store) -> dict[str, str | None]:
    """Where each namespace routes, by the routing changes the batches reported."""
    return {name: cell for name, cell in store.routes.items() if cell is not None}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), events=event_logs(), cells=initial_cells())
def test_batch_boundaries_do_not_change_the_outcome(
    data: st.DataObject, events: list[PositionedEvent], cells: dict[str, Cell]
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(events)), max_size=6), label="cuts")

    one, one_decisions = _fold([events], cells)
    split, split_decisions = _fold(_split(events, cuts), cells)
    singles, single_decisions = _fold([[p] for p in events], cells)

    for other, other_decisions in ((split, split_decisions), (singles, single_decisions)):
        assert (other.cells, other.claims, other.leases, other.sequences) == (
            one.cells, one.claims, one.leases, one.sequences)
        assert other_decisions == one_decisions
        assert _routes(other) == _routes(one)

    # Every namespace that routes is a committed NAMESPACE claim, and the reverse.
    committed = {v: h.cell_id for (b, v), h in one.claims.items()
                 if b == "NAMESPACE" and h.status is ClaimStatus.COMMITTED}
    assert _routes(one) == committed
    # Decisions: one per event, in log order; DUPLICATE exactly for ids seen before.
    per_event, recorded = one_decisions
    assert recorded == [e for _, d in per_event for e in d.events]
    assert [offset for offset, _ in per_event] == [p.offset for p in events]
    earlier: set[uuid.UUID] = set()
    for p, (_, decision) in zip(events, per_event, strict=True):
        assert (decision.outcome is Outcome.DUPLICATE) == (p.event.event_id in earlier)
        earlier.add(p.event.event_id)
    # Invariants of the resulting topology and registry.
    prefixes = [cell.session_prefix for cell in one.cells.values()]
    assert len(prefixes) == len(set(prefixes))
    for cell_id, cell in cells.items():
        if cell.state is CellState.DECOMMISSIONED:
            assert one.cells[cell_id] == cell
    assert claims_support.invariant_violations(Registry(one.claims, one.leases, one.sequences)) == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), events=event_logs(), cells=initial_cells())
def test_a_replay_of_the_recorded_decisions_reaches_the_live_projection(
    data: st.DataObject, events: list[PositionedEvent], cells: dict[str, Cell]
) -> None:
    """adr/0010: the live projector decides commands; a replay reads the cells topic and
    the decision log (never the requests) and folds them, in chunks, with the same fold."""
    cell_log = [p for p in events if p.topic == "cells"]
    # A replay never reads the requests, so it cannot know a cell event whose id a claim
    # request used before it was a duplicate live: ids are unique across topics.
    assume(not {p.event.event_id for p in cell_log} & {p.event.event_id for p in events if p.topic != "cells"})
    live, (_, recorded) = _fold(_split(events, data.draw(st.lists(st.integers(0, len(events)), max_size=4))), cells)
    decision_log = positioned(recorded + recorded[: data.draw(st.integers(0, len(recorded)))])  # relay repeats
    projection = Projection(cells=dict(cells))
    for stream in (cell_log, decision_log):
        for chunk in _split(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=4))):
            fold(chunk, projection)  # no secret: it cannot decide

    assert projection.cells == live.cells
    assert (projection.registry.claims, projection.registry.leases) == (live.claims, live.leases)
    assert projection.registry.sequences == live.sequences
