"""A large, mixed event stream whose decisions are known from how it was built.

Cells (the one-partition cells topic), single-value claims (``topology.claims``,
keyed ``BUCKET:value``) and claim requests (``topology.claim-requests``: leases,
commits, rollbacks, sequence ranges), plus redeliveries of the same event.

Every decision depends only on earlier events of its own partition: request values
are unique per lease, and nothing keyed by owner touches a leased value. So the
outcome of each event is fixed whatever the batching, the kills or the consumer
group layout, and a clean re-run must reach the same tables (adr/0004, adr/0010).
Leases live 24 h, so no ``LeaseExpiryTick`` is ever due during a test.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from topology_store.schemas.models import (
    CellRegistered,
    CellState,
    CellStateChanged,
    CellUpdated,
    ClaimBucket,
    ClaimCreated,
    ClaimRef,
    ClaimReleased,
    ClaimsRequested,
    Event,
    LeaseCommitRequested,
    LeaseRollbackRequested,
    OwnerType,
    SequenceRangeRequested,
)

LEASE_TTL_MS = 24 * 3600 * 1000


@dataclass
class Workload:
    events: list[Event] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)  # per distinct event

    @property
    def distinct_events(self) -> int:
        return len({e.event_id for e in self.events})

    def add(self, event: Event, outcome: str) -> None:
        self.events.append(event)
        self.outcomes[outcome] += 1


class _Pool:
    """A set with O(1) add, remove, random pick and random take (a generator of
    hundreds of thousands of events must not be quadratic)."""

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._index: dict[Any, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Any) -> None:
        self._index[item] = len(self._items)
        self._items.append(item)

    def remove(self, item: Any) -> None:
        position = self._index.pop(item)
        last = self._items.pop()
        if position < len(self._items):
            self._items[position] = last
            self._index[last] = position

    def pick(self, rng: random.Random) -> Any:
        return self._items[rng.randrange(len(self._items))]

    def take(self, rng: random.Random) -> Any:
        item = self.pick(rng)
        self.remove(item)
        return item


def build_workload(size: int, seed: int = 7, cells: int = 12) -> Workload:
    """About ``size`` records (redeliveries included)."""
    rng = random.Random(seed)
    work = Workload()
    cell_ids = [f"cell-{n}" for n in range(1, cells + 1)]
    weights: dict[str, int] = {}
    states: dict[str, CellState] = {}
    for n, cell_id in enumerate(cell_ids, start=1):
        work.add(CellRegistered(source="ops", cell_id=cell_id, address=f"https://{cell_id}.example.com",
                                session_prefix=f"s{n}", region=rng.choice(["eu", "us", "ap"])), "applied")
        work.add(CellStateChanged(source="ops", cell_id=cell_id, state=CellState.ACTIVE, reason="launch"), "applied")
        weights[cell_id], states[cell_id] = 0, CellState.ACTIVE

    held: dict[str, tuple[str, int]] = {}  # namespace -> (cell, owner)
    held_paths = _Pool()  # the same namespaces, for O(1) random picks
    free = _Pool()  # released namespaces, claimable again
    open_leases = _Pool()
    committed_leases: list[tuple[uuid.UUID, str]] = []
    sequences: Counter[str] = Counter()
    namespace_counter = user_counter = 0

    while len(work.events) < size:
        roll = rng.random()
        if roll < 0.06:  # cell attribute changes
            cell_id = rng.choice(cell_ids)
            weight = rng.randrange(0, 200)
            work.add(CellUpdated(source="ops", cell_id=cell_id, weight=weight),
                     "unchanged" if weight == weights[cell_id] else "applied")
            weights[cell_id] = weight
        elif roll < 0.08:  # drain and undrain; an illegal jump is rejected
            cell_id = rng.choice(cell_ids)
            if rng.random() < 0.2:
                work.add(CellStateChanged(source="ops", cell_id=cell_id, state=CellState.PROVISIONING), "rejected")
            else:
                target = CellState.DRAINING if states[cell_id] is CellState.ACTIVE else CellState.ACTIVE
                work.add(CellStateChanged(source="ops", cell_id=cell_id, state=target, reason="maintenance"), "applied")
                states[cell_id] = target
        elif roll < 0.55:  # a namespace claim
            if free and rng.random() < 0.1:
                path = free.take(rng)
            else:
                namespace_counter += 1
                path = f"ns-{namespace_counter}"
            cell_id, owner = rng.choice(cell_ids), rng.randrange(1, 10**9)
            created = ClaimCreated(source=cell_id, bucket=ClaimBucket.NAMESPACE, value=path, cell_id=cell_id,
                                   owner_type=OwnerType.GROUP, owner_id=owner)
            work.add(created, "applied")
            held[path] = (cell_id, owner)
            held_paths.add(path)
            if rng.random() < 0.03:  # the producer retried: the very same event again
                work.events.append(created)
        elif roll < 0.65 and held:  # conflicts, repeats and releases of held namespaces
            path = held_paths.pick(rng)
            cell_id, owner = held[path]
            kind = rng.random()
            if kind < 0.4:
                other = rng.choice([c for c in cell_ids if c != cell_id])
                work.add(ClaimCreated(source=other, bucket=ClaimBucket.NAMESPACE, value=path, cell_id=other,
                                      owner_type=OwnerType.GROUP, owner_id=owner + 1), "rejected")
            elif kind < 0.55:
                work.add(ClaimCreated(source=cell_id, bucket=ClaimBucket.NAMESPACE, value=path, cell_id=cell_id,
                                      owner_type=OwnerType.GROUP, owner_id=owner), "unchanged")
            elif kind < 0.7:
                work.add(ClaimReleased(source=cell_id, bucket=ClaimBucket.NAMESPACE, value=path, cell_id=cell_id,
                                       owner_type=OwnerType.GROUP, owner_id=owner + 7), "rejected")
            else:
                work.add(ClaimReleased(source=cell_id, bucket=ClaimBucket.NAMESPACE, value=path, cell_id=cell_id,
                                       owner_type=OwnerType.GROUP, owner_id=owner), "applied")
                del held[path]
                held_paths.remove(path)
                free.add(path)
        elif roll < 0.82:  # begin: a username and an e-mail under one lease
            user_counter += 1
            cell_id = rng.choice(cell_ids)
            lease = uuid.UUID(int=rng.getrandbits(128), version=4)
            work.add(ClaimsRequested(source=cell_id, lease_id=lease, cell_id=cell_id, owner_type=OwnerType.USER,
                                     owner_id=user_counter, lease_ttl_ms=LEASE_TTL_MS,
                                     claims=(ClaimRef(bucket=ClaimBucket.USERNAME, value=f"user-{user_counter}"),
                                             ClaimRef(bucket=ClaimBucket.EMAIL,
                                                      value=f"user-{user_counter}@example.com"))), "applied")
            open_leases.add((lease, cell_id))
        elif roll < 0.95 and open_leases:  # commit (mostly) or roll back an open lease
            lease, cell_id = open_leases.take(rng)
            if rng.random() < 0.75:
                work.add(LeaseCommitRequested(source=cell_id, lease_id=lease, cell_id=cell_id), "applied")
                committed_leases.append((lease, cell_id))
            else:
                work.add(LeaseRollbackRequested(source=cell_id, lease_id=lease, cell_id=cell_id), "applied")
        elif roll < 0.97 and committed_leases:  # a retried commit with a new request id
            lease, cell_id = rng.choice(committed_leases)
            work.add(LeaseCommitRequested(source=cell_id, lease_id=lease, cell_id=cell_id), "unchanged")
        elif roll < 0.98:  # a commit of a lease nobody began
            cell_id = rng.choice(cell_ids)
            work.add(LeaseCommitRequested(source=cell_id, lease_id=uuid.UUID(int=rng.getrandbits(128), version=4),
                                          cell_id=cell_id), "rejected")
        else:  # id ranges of a few sequences
            name = rng.choice(["projects.id", "users.id", "ci_builds.id"])
            sequences[name] += 1
            work.add(SequenceRangeRequested(source="cell-1", cell_id=rng.choice(cell_ids), sequence_name=name,
                                            size=rng.randrange(1, 100_000)), "applied")
    return work
