"""What an event does to the topology: pure functions over plain data.

No I/O and no framework here. The shell (``projector.store``) loads the rows a
batch touches, calls :func:`project_batch`, and writes back what it returns.

Cells (adr/0004): a cell's fate depends only on earlier cell events, which live
in the single partition of the cells topic, so any replay of that log reaches the
same cells whatever the batch boundaries.

Claims (adr/0010): requests are decided by :mod:`topology_store.core.claims` against the live
registry, once; the decisions are recorded as events (outbox -> claim-decisions
topic), and replays follow the recorded decisions instead of deciding again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import TypeAlias
from uuid import UUID

from topology_store.core.claims import CLAIM_COMMANDS, Registry, decide, routed_namespaces
from topology_store.schemas.models import CellRegistered, CellState, CellStateChanged, CellUpdated, Event


@dataclass(frozen=True, slots=True)
class Cell:
    cell_id: str
    address: str
    session_prefix: str
    region: str
    weight: int
    state: CellState
    state_reason: str


class Outcome(StrEnum):
    APPLIED = "applied"  # the topology changed
    UNCHANGED = "unchanged"  # valid, but the topology already said so
    DUPLICATE = "duplicate"  # this event_id was processed before
    REJECTED = "rejected"  # breaks a rule; the topology is untouched


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    reason: str | None = None
    # The decision events a claim command produced (recorded in the log).
    events: tuple[Event, ...] = ()


APPLIED = Decision(Outcome.APPLIED)
DUPLICATE = Decision(Outcome.DUPLICATE)


def _unchanged(reason: str) -> Decision:
    return Decision(Outcome.UNCHANGED, reason)


def _rejected(reason: str) -> Decision:
    return Decision(Outcome.REJECTED, reason)


# A cell drains before it is decommissioned; DECOMMISSIONED is final.
ALLOWED_TRANSITIONS: Mapping[CellState, frozenset[CellState]] = {
    CellState.PROVISIONING: frozenset({CellState.ACTIVE, CellState.DECOMMISSIONED}),
    CellState.ACTIVE: frozenset({CellState.DRAINING, CellState.READ_ONLY}),
    CellState.DRAINING: frozenset({CellState.ACTIVE, CellState.READ_ONLY, CellState.DECOMMISSIONED}),
    CellState.READ_ONLY: frozenset({CellState.ACTIVE, CellState.DRAINING, CellState.DECOMMISSIONED}),
    CellState.DECOMMISSIONED: frozenset(),
}


CellEvent: TypeAlias = CellRegistered | CellUpdated | CellStateChanged


def apply_cell_event(cells: Mapping[str, Cell], event: CellEvent) -> tuple[Decision, Cell | None]:
    """Decide one cell event against all known cells; return the decision and the
    cell's row afterwards (``None`` while the cell does not exist)."""
    current = cells.get(event.cell_id)
    if current is not None and current.state is CellState.DECOMMISSIONED:
        return _rejected("cell is decommissioned"), current
    if isinstance(event, CellRegistered):
        registered = Cell(
            cell_id=event.cell_id,
            address=event.address,
            session_prefix=event.session_prefix,
            region=event.region,
            weight=0,
            state=CellState.PROVISIONING,
            state_reason="",
        )
        if current is not None:
            same = (current.address, current.session_prefix, current.region) == (
                event.address,
                event.session_prefix,
                event.region,
            )
            if same:
                return _unchanged("cell already registered with these attributes"), current
            return _rejected("cell already registered"), current
        for other in cells.values():
            if other.session_prefix == event.session_prefix:
                return _rejected(f"session prefix already used by cell {other.cell_id}"), None
        return APPLIED, registered

    if current is None:
        return _rejected("unknown cell"), None

    if isinstance(event, CellUpdated):
        updated = replace(
            current,
            address=event.address if event.address is not None else current.address,
            region=event.region if event.region is not None else current.region,
            weight=event.weight if event.weight is not None else current.weight,
        )
        if updated == current:
            return _unchanged("no attribute changes"), current
        return APPLIED, updated

    if event.state is current.state:
        return _unchanged(f"cell already {current.state.value}"), current
    if event.state not in ALLOWED_TRANSITIONS[current.state]:
        return _rejected(f"transition {current.state.value} -> {event.state.value} not allowed"), current
    return APPLIED, replace(current, state=event.state, state_reason=event.reason)


@dataclass(frozen=True, slots=True)
class PositionedEvent:
    """An event and where it sits in the log."""

    event: Event
    topic: str
    partition: int
    offset: int
    log_time: datetime | None = None  # the record's timestamp; None: the event's occurred_at

    @property
    def at(self) -> datetime:
        return self.log_time if self.log_time is not None else self.event.occurred_at


@dataclass(slots=True)
class BatchResult:
    """What a batch does: final rows of every changed key, the claim decisions made,
    and one decision per event, in order."""

    cells: dict[str, Cell] = field(default_factory=dict)
    registry: Registry = field(default_factory=Registry)
    claim_decisions: list[Event] = field(default_factory=list)
    namespaces: dict[str, str | None] = field(default_factory=dict)  # routing changes
    decisions: list[tuple[PositionedEvent, Decision]] = field(default_factory=list)

    @property
    def routing_changed(self) -> bool:
        """Whether routers would see a difference: a cell or a namespace route."""
        return bool(self.cells or self.namespaces)


def project_batch(
    events: Iterable[PositionedEvent],
    cells: Mapping[str, Cell],
    registry: Registry,
    seen_event_ids: Set[UUID],
    secret: bytes,
) -> BatchResult:
    """Fold a batch of events, in log order, over the rows it touches.

    ``cells`` holds every cell; ``registry`` holds what :func:`topology_store.core.claims.needs`
    named for the batch's claim commands; ``seen_event_ids`` the ids among the batch
    already processed in earlier batches. Inputs are not modified.
    """
    working_cells = dict(cells)
    working = registry.copy()
    seen = set(seen_event_ids)
    result = BatchResult(registry=working)
    for positioned in events:
        event = positioned.event
        if event.event_id in seen:
            result.decisions.append((positioned, DUPLICATE))
            continue
        seen.add(event.event_id)
        if isinstance(event, CLAIM_COMMANDS):
            verdict = decide(working, event, positioned.at, secret)
            result.claim_decisions.extend(verdict.decisions)
            decision = Decision(Outcome(verdict.outcome), verdict.reason, verdict.decisions)
        elif isinstance(event, CellRegistered | CellUpdated | CellStateChanged):
            decision, cell = apply_cell_event(working_cells, event)
            if decision.outcome is Outcome.APPLIED:
                assert cell is not None  # cells are never deleted, only decommissioned
                working_cells[cell.cell_id] = cell
                result.cells[cell.cell_id] = cell
        else:
            raise TypeError(f"no rule for {type(event).__name__}")
        result.decisions.append((positioned, decision))
    result.namespaces = routed_namespaces(registry.claims, working.claims, working.changed_claims)
    return result
