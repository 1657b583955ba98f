"""The one fold of the log: events in log order over a projection. Pure, no I/O (adr/0007).

The live projector (``projector.store``, through :func:`project_batch`), ``topology
replay``, ``topology rebuild`` and ``topology verify`` (``projector.replay``, through
:func:`fold`) all run this function; nothing else applies an event to a projection.

One step for every event, chosen by what the event is, not by who folds it:

- a **cell event** is decided by the cell rules (:func:`topology_store.core.cells.apply_cell_event`),
  every time: a cell's fate depends only on earlier events of the one-partition cells
  topic, so deciding it again in log order is deterministic (adr/0004);
- a **claim command** is decided (:func:`topology_store.core.claims.decide`), which records
  its decisions and evolves the registry by them: only the live projector folds commands,
  because it is the decider (adr/0010);
- a **recorded claim decision** is followed (:func:`topology_store.core.claims.evolve`, the
  same function ``decide`` evolves by): replays read the cells topic and the decision log,
  never the requests, so they follow what was decided instead of deciding again, even
  with newer code (adr/0010, adr/0013).

Why one step that dispatches on the event rather than a "live or replay" switch: the
log already says which events are decisions, and the live projector never consumes
the decision topic while a replay never reads the request topics. Dispatching on the
event keeps every shared rule (deduplication by event id, the first occurrence wins;
the cell rules; ``evolve``) in one loop, so the live tables and a replay cannot drift
apart. A fold without the claim secret cannot decide at all: a command in a replay's
stream raises instead of being decided a second time.

The dispatch is one dict lookup by the event's exact type: pydantic's
``isinstance`` goes through ``ABCMeta`` and cost a replay several microseconds per
decision when it tried the command and cell types first (measured).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, get_args
from uuid import UUID

from topology_store.core.cells import APPLIED, CELL_EVENTS, DUPLICATE, Cell, Decision, Outcome, apply_cell_event
from topology_store.core.claims import CLAIM_COMMANDS, ClaimDecision, Registry, decide, evolve, routed_namespaces
from topology_store.schemas.models import Event


class PositionedEvent(NamedTuple):
    """An event and where it sits in the log. A named tuple: a replay makes one per
    event, and a frozen dataclass cost twice as much to create (measured)."""

    event: Event
    topic: str
    partition: int
    offset: int
    log_time: datetime | None = None  # the record's timestamp; None: the event's occurred_at

    @property
    def at(self) -> datetime:
        return self.log_time if self.log_time is not None else self.event.occurred_at


@dataclass(slots=True)
class Projection:
    """What a fold works on: every cell, the claim registry (all of it in a replay; in
    a live batch what :func:`topology_store.core.claims.needs` named) and the event ids
    already applied."""

    cells: dict[str, Cell] = field(default_factory=dict)
    registry: Registry = field(default_factory=Registry)
    seen: set[UUID] = field(default_factory=set)


@dataclass(slots=True)
class BatchResult:
    """What a fold did: final rows of every changed cell, the registry it evolved, the
    claim decisions it made, and one decision per event, in order."""

    cells: dict[str, Cell] = field(default_factory=dict)
    registry: Registry = field(default_factory=Registry)
    claim_decisions: list[Event] = field(default_factory=list)
    namespaces: dict[str, str | None] = field(default_factory=dict)  # routing changes (live batches)
    decisions: list[tuple[PositionedEvent, Decision]] = field(default_factory=list)

    @property
    def routing_changed(self) -> bool:
        """Whether routers would see a difference: a cell, a namespace route, or a cell's
        sequence ranges (part of its document, for GitLab's ``CellInfo``; adr/0021)."""
        return bool(self.cells or self.namespaces or self.registry.granted_ranges)


_DECIDE, _CELL, _FOLLOW = "decide", "cell", "follow"
_STEPS: dict[type, str] = {
    **dict.fromkeys(CLAIM_COMMANDS, _DECIDE),
    **dict.fromkeys(CELL_EVENTS, _CELL),
    **dict.fromkeys(get_args(ClaimDecision), _FOLLOW),
}


def fold(
    events: Iterable[PositionedEvent],
    projection: Projection,
    secret: bytes | None = None,
    decided_at: datetime | None = None,
) -> BatchResult:
    """Apply ``events``, in log order, to ``projection`` in place.

    ``secret`` keys the hashes of sensitive claim values and is what deciding needs;
    without it claim commands raise (a replay follows recorded decisions, adr/0010).
    ``decided_at``: the decider's clock, from which a grant's end counts (adr/0017).
    """
    cells, registry, seen = projection.cells, projection.registry, projection.seen
    result = BatchResult(registry=registry)
    decisions, changed_cells = result.decisions, result.cells
    for positioned in events:
        event = positioned.event
        if event.event_id in seen:
            decisions.append((positioned, DUPLICATE))
            continue
        step = _STEPS.get(type(event))
        if step == _FOLLOW:
            evolve(registry, event)
            decision = APPLIED
        elif step == _DECIDE and secret is not None:
            verdict = decide(registry, event, positioned.at, secret, decided_at)
            result.claim_decisions.extend(verdict.decisions)
            decision = Decision(Outcome(verdict.outcome), verdict.reason, verdict.decisions)
        elif step == _CELL:
            decision, cell = apply_cell_event(cells, event)  # type: ignore[arg-type]
            if decision.outcome is Outcome.APPLIED:
                assert cell is not None  # cells are never deleted, only decommissioned
                cells[cell.cell_id] = cell
                changed_cells[cell.cell_id] = cell
        elif step == _DECIDE:
            raise TypeError(f"a fold without the claim secret follows decisions; it cannot decide "
                            f"{type(event).__name__}")
        else:
            raise TypeError(f"no rule for {type(event).__name__}")
        seen.add(event.event_id)
        decisions.append((positioned, decision))
    return result


def project_batch(
    events: Iterable[PositionedEvent],
    cells: Mapping[str, Cell],
    registry: Registry,
    seen_event_ids: AbstractSet[UUID],
    secret: bytes,
    decided_at: datetime | None = None,
) -> BatchResult:
    """The live projector's batch: :func:`fold` over copies of the rows it touches,
    plus the namespace routes that changed.

    ``cells`` holds every cell; ``registry`` holds what :func:`topology_store.core.claims.needs`
    named for the batch's claim commands; ``seen_event_ids`` the ids among the batch
    already processed in earlier batches. Inputs are not modified.
    """
    working = registry.copy()
    result = fold(events, Projection(dict(cells), working, set(seen_event_ids)), secret, decided_at)
    result.namespaces = routed_namespaces(registry.claims, working.claims, working.changed_claims)
    return result


def replayed(*logs: Iterable[Event]) -> Projection:
    """The projection that logs of recorded events yield, each folded in order (the
    cells topic, then the decision log): a whole replay in memory, for small logs."""
    projection = Projection()
    for log in logs:
        fold((PositionedEvent(event, "", 0, offset) for offset, event in enumerate(log)), projection)
    return projection
