"""The cell rules: what a cell event does to the cells. Pure functions over plain data (adr/0007).

Cells (adr/0004): a cell's fate depends only on earlier cell events, which live
in the single partition of the cells topic, so any replay of that log reaches the
same cells whatever the batch boundaries. A cell may carry GitLab's numeric cell id
(``number``, Rails' ``cell.id``, adr/0021): unique across cells, recorded once (at
registration or by an update of a cell that has none), never changed. The fold that applies these rules, and
the claim rules of :mod:`topology_store.core.claims`, to a log is :mod:`topology_store.core.fold`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TypeAlias, get_args

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
    number: int | None = None  # GitLab's numeric cell id (Rails' cell.id); None: none recorded


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
CELL_EVENTS: tuple[type[CellEvent], ...] = get_args(CellEvent)


def number_holder(cells: Mapping[str, Cell], number: int | None) -> str | None:
    """The cell that holds GitLab's cell id ``number``, if any. Numbers are unique across
    cells, decommissioned ones included: Rails' ``cell.id`` names the cell in leases and
    records long after it is gone, so a number is never handed to another cell (adr/0021)."""
    if number is None:
        return None
    return next((other.cell_id for other in cells.values() if other.number == number), None)


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
            number=event.number,
        )
        if current is not None:
            same = (current.address, current.session_prefix, current.region, current.number) == (
                event.address,
                event.session_prefix,
                event.region,
                event.number,
            )
            if same:
                return _unchanged("cell already registered with these attributes"), current
            return _rejected("cell already registered"), current
        for other in cells.values():
            if other.session_prefix == event.session_prefix:
                return _rejected(f"session prefix already used by cell {other.cell_id}"), None
        if (holder := number_holder(cells, event.number)) is not None:
            return _rejected(f"cell number {event.number} already used by cell {holder}"), None
        return APPLIED, registered

    if current is None:
        return _rejected("unknown cell"), None

    if isinstance(event, CellUpdated):
        if event.number is not None and event.number != current.number:
            if current.number is not None:
                return _rejected(f"cell number is {current.number}; a cell's number never changes"), current
            if (holder := number_holder(cells, event.number)) is not None:
                return _rejected(f"cell number {event.number} already used by cell {holder}"), current
        updated = replace(
            current,
            address=event.address if event.address is not None else current.address,
            region=event.region if event.region is not None else current.region,
            weight=event.weight if event.weight is not None else current.weight,
            number=event.number if event.number is not None else current.number,
        )
        if updated == current:
            return _unchanged("no attribute changes"), current
        return APPLIED, updated

    if event.state is current.state:
        return _unchanged(f"cell already {current.state.value}"), current
    if event.state not in ALLOWED_TRANSITIONS[current.state]:
        return _rejected(f"transition {current.state.value} -> {event.state.value} not allowed"), current
    return APPLIED, replace(current, state=event.state, state_reason=event.reason)
