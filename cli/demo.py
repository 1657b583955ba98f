"""A small, realistic topology for ``topology up --demo``: a few cells in two
regions, a few thousand namespaces and users spread over them."""

from __future__ import annotations

import random
from collections.abc import Iterator

from topology_store.schemas.models import (
    CellRegistered,
    CellState,
    CellStateChanged,
    CellUpdated,
    ClaimBucket,
    ClaimCreated,
    Event,
    OwnerType,
)

# (name, region, GitLab's cell id: what each cell's Rails has as cell.id, adr/0021)
DEMO_CELLS = (
    ("cell-1", "us-east1", 1),
    ("cell-2", "us-east1", 2),
    ("cell-3", "europe-west4", 3),
    ("cell-4", "europe-west4", 4),
)
_WORDS = (
    "gitlab", "acme", "orbit", "nimbus", "pixel", "delta", "quartz", "ember", "atlas", "harbor",
    "lumen", "vertex", "cobalt", "falcon", "meadow", "summit", "tundra", "zephyr", "aurora", "cinder",
)


def demo_events(namespaces: int = 3000, seed: int = 7) -> Iterator[Event]:
    rng = random.Random(seed)
    for cell_id, region, cell_number in DEMO_CELLS:
        yield CellRegistered(
            source="demo", cell_id=cell_id, address=f"https://{cell_id}.demo.example.com",
            session_prefix=f"{cell_id}-", region=region, number=cell_number,
        )
        yield CellUpdated(source="demo", cell_id=cell_id, weight=100)
        yield CellStateChanged(source="demo", cell_id=cell_id, state=CellState.ACTIVE, reason="demo")
    yield CellStateChanged(source="demo", cell_id="cell-4", state=CellState.DRAINING, reason="rebalancing demo")
    for number in range(namespaces):
        cell_id, _, _ = DEMO_CELLS[rng.randrange(3)]  # cell-4 is draining: no new namespaces
        path = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}-{number}"
        owner_type = OwnerType.GROUP if number % 3 else OwnerType.USER
        yield ClaimCreated(
            source=cell_id, bucket=ClaimBucket.NAMESPACE, value=path, cell_id=cell_id,
            owner_type=owner_type, owner_id=number + 1,
        )
        if owner_type is OwnerType.USER:
            yield ClaimCreated(
                source=cell_id, bucket=ClaimBucket.USERNAME, value=path, cell_id=cell_id,
                owner_type=OwnerType.USER, owner_id=number + 1,
            )
