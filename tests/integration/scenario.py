"""A generated topology history whose final state is known independently of the
projector: the expected snapshot is derived from how the scenario was built, not
by running the domain functions."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from topology_store.schemas.models import (
    CellRegistered,
    CellState,
    CellStateChanged,
    CellUpdated,
    ClaimBucket,
    ClaimCreated,
    ClaimReleased,
    Event,
    OwnerType,
)


@dataclass
class Scenario:
    events: list[Event] = field(default_factory=list)
    cells: dict[str, dict[str, object]] = field(default_factory=dict)
    namespaces: dict[str, str] = field(default_factory=dict)
    applied: int = 0
    rejected: int = 0
    redelivered: int = 0  # events published twice with the same event_id

    @property
    def distinct_events(self) -> int:
        return len({e.event_id for e in self.events})


def build(namespaces: int, seed: int = 11) -> Scenario:
    rng = random.Random(seed)
    scenario = Scenario()
    cell_ids = [f"cell-{n}" for n in range(1, 6)]
    for n, cell_id in enumerate(cell_ids, start=1):
        scenario.events += [
            CellRegistered(source="ops", cell_id=cell_id, address=f"https://{cell_id}.example.com",
                           session_prefix=f"c{n}", region="eu" if n % 2 else "us", number=100 + n),
            CellUpdated(source="ops", cell_id=cell_id, weight=10 * n),
            CellStateChanged(source="ops", cell_id=cell_id, state=CellState.ACTIVE, reason="launch"),
        ]
        scenario.applied += 3
        scenario.cells[cell_id] = {
            "cell_id": cell_id, "address": f"https://{cell_id}.example.com", "session_prefix": f"c{n}",
            "region": "eu" if n % 2 else "us", "weight": 10 * n, "state": "ACTIVE", "state_reason": "launch",
            "number": 100 + n, "sequence_ranges": [],
        }
    scenario.events.append(CellStateChanged(source="ops", cell_id="cell-5", state=CellState.DECOMMISSIONED, reason="x"))
    scenario.rejected += 1  # ACTIVE cannot jump to DECOMMISSIONED without draining

    for n in range(namespaces):
        path = f"ns-{n}"
        cell_id = cell_ids[n % 4]
        created = ClaimCreated(source=cell_id, bucket=ClaimBucket.NAMESPACE, value=path, cell_id=cell_id,
                               owner_type=OwnerType.GROUP, owner_id=n)
        scenario.events.append(created)
        scenario.applied += 1
        scenario.namespaces[path] = cell_id
        if n % 10 == 3:  # another cell tries to take it: rejected
            other = cell_ids[(n + 1) % 4]
            scenario.events.append(ClaimCreated(source=other, bucket=ClaimBucket.NAMESPACE, value=path,
                                                cell_id=other, owner_type=OwnerType.GROUP, owner_id=n + 1))
            scenario.rejected += 1
        if n % 10 == 7:  # released by its holder
            scenario.events.append(ClaimReleased(**created.model_dump(exclude={"event_id", "occurred_at"})))
            scenario.applied += 1
            del scenario.namespaces[path]
        if n % 25 == 0:  # the producer retried: same event, same event_id, twice in the log
            scenario.events.append(created)
            scenario.redelivered += 1
    # Interleave claim keys a little, as concurrent cells would; per-key order is kept
    # because every key's events stay in their original relative order.
    return scenario


def split(events: list[Event], parts: int, seed: int = 3) -> list[list[Event]]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(events)), parts - 1))
    bounds = [0, *cuts, len(events)]
    return [events[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
