"""On the real stack: random claim requests from several cells, decided by two
projector members while partitions move, keep every invariant, and replaying the
recorded decisions (the live projector's fold, and the replay pipeline) reproduces
the live registry exactly."""

from __future__ import annotations

import asyncio
import io
import random
import uuid

import psycopg
import pytest

from tests.integration.test_projector import Member, wait_for
from topology_store.core.fold import replayed
from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.projector.replay import LIVE_SCHEMA, compare, replay
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.models import (
    ClaimBucket,
    ClaimCreated,
    ClaimRef,
    ClaimReleased,
    ClaimsDestroyRequested,
    ClaimsRequested,
    Event,
    LeaseCommitRequested,
    LeaseExpiryTick,
    LeaseRollbackRequested,
    OwnerTransferRequested,
    OwnerType,
    SequenceRangeRequested,
    parse_event,
)

pytestmark = pytest.mark.integration

CELLS = ("cell-1", "cell-2", "cell-3")
VALUES = [f"v{n}" for n in range(12)]


def random_commands(rng: random.Random, count: int) -> list[Event]:
    commands: list[Event] = []
    leases: list[tuple[uuid.UUID, str]] = []
    for _ in range(count):
        cell = rng.choice(CELLS)
        owner = rng.randrange(4)
        picks = rng.sample(VALUES, rng.randint(1, 3))
        refs = [
            ClaimRef(bucket=ClaimBucket.EMAIL, value=f"{v}@Example.com") if rng.random() < 0.3
            else ClaimRef(bucket=ClaimBucket.NAMESPACE, value=v)
            for v in picks
        ]
        kind = rng.random()
        common = {"source": cell, "cell_id": cell, "owner_type": OwnerType.USER, "owner_id": owner}
        if kind < 0.35:
            command = ClaimsRequested(**common, claims=refs, lease_ttl_ms=rng.choice([1000, 60_000]))
            leases.append((command.lease_id, cell))
        elif kind < 0.55 and leases:
            lease_id, lease_cell = rng.choice(leases)
            model = LeaseCommitRequested if rng.random() < 0.7 else LeaseRollbackRequested
            command = model(source=lease_cell, lease_id=lease_id, cell_id=lease_cell)
        elif kind < 0.65:
            command = ClaimCreated(**common, bucket=ClaimBucket.NAMESPACE, value=rng.choice(VALUES))
        elif kind < 0.72:
            command = ClaimReleased(**common, bucket=ClaimBucket.NAMESPACE, value=rng.choice(VALUES))
        elif kind < 0.8:
            command = ClaimsDestroyRequested(**common, claims=refs)
        elif kind < 0.87:
            command = OwnerTransferRequested(source=cell, owner_type=OwnerType.USER, owner_id=owner,
                                             from_cell_id=cell, to_cell_id=rng.choice([c for c in CELLS if c != cell]))
        elif kind < 0.93:
            command = SequenceRangeRequested(source=cell, cell_id=cell, sequence_name="projects", size=rng.randint(1, 1000))
        else:
            # A tick names a lease and is keyed by it, so it lands on that lease's partition (adr/0017).
            command = LeaseExpiryTick(source="test", lease_ids=(rng.choice(leases)[0],) if leases else ())
        commands.append(command)
        if rng.random() < 0.05:
            commands.append(command)  # a producer retry: the same event_id twice
    return commands


async def publish(settings: Settings, events: list[Event]) -> None:
    async with EventPublisher(settings) as publisher:
        async for outcome in publisher.publish_many(events):
            assert not isinstance(outcome, PublishFailed), outcome


async def test_random_requests_keep_invariants_and_replaying_the_decisions_reproduces_the_registry(
    topics: Settings,
) -> None:
    settings = topics.model_copy(update={"batch_max_events": 25})
    commands = random_commands(random.Random(20261123), 500)
    distinct = len({c.event_id for c in commands})
    chunks = [commands[i : i + 125] for i in range(0, len(commands), 125)]
    async with Member(settings):
        for chunk in chunks:
            async with Member(settings):  # a second member joins and leaves: partitions move
                await publish(settings, chunk)
                await asyncio.sleep(0.6)  # let some 1 s leases run out in log time
        await wait_for(settings, "SELECT count(*) FROM processed_events", distinct, timeout_s=120)

    with psycopg.connect(settings.libpq_url) as conn:
        claims = {
            (b, v): (cell, owner_type, owner_id, status, lease_id)
            for b, v, cell, owner_type, owner_id, status, lease_id in conn.execute(
                "SELECT bucket, value, cell_id, owner_type, owner_id, status, lease_id FROM claims"
            )
        }
        leases = {
            lease_id: (status, cause, tuple(map(tuple, keys)))
            for lease_id, status, cause, keys in conn.execute("SELECT lease_id, status, cause, claims FROM leases")
        }
        ranges = conn.execute('SELECT start, "end" FROM sequence_ranges ORDER BY start').fetchall()
        outbox = [bytes(p) for (p,) in conn.execute("SELECT payload FROM topology_outbox ORDER BY id")]
        outcomes = dict(conn.execute("SELECT outcome, count(*) FROM processed_events GROUP BY 1").fetchall())

    # Every kind of outcome happened, or the test proves little.
    assert set(outcomes) == {"applied", "unchanged", "rejected"}, outcomes
    # Invariants: a leased claim belongs to an open lease that lists it, and back.
    for key, (_, _, _, status, lease_id) in claims.items():
        if status == "LEASED":
            assert leases[lease_id][0] == "OPEN" and key in leases[lease_id][2]
    for lease_id, (status, _, keys) in leases.items():
        if status == "OPEN":
            assert all(claims[k][3] == "LEASED" and claims[k][4] == lease_id for k in keys)
    # Sequence ranges never overlap.
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:], strict=False))
    # No clear e-mail anywhere in the registry.
    assert not [v for (_, v) in claims if "@" in v]

    # Replay: the recorded decisions alone rebuild the same registry.
    codec = EventCodec()
    registry = replayed([parse_event(d.payload, d.event_type) for d in map(codec.decode, outbox)]).registry
    assert {
        k: (h.cell_id, h.owner_type.value, h.owner_id, h.status.value, h.lease_id) for k, h in registry.claims.items()
    } == claims
    assert {
        i: (l.status.value, l.cause.value if l.cause else None, l.claims) for i, l in registry.leases.items()
    } == leases
    assert [(r.start, r.end) for r in registry.granted_ranges] == [tuple(r) for r in ranges]
    # And so does the replay pipeline, from the outbox, into a schema of its own.
    await asyncio.to_thread(replay, settings, "claims_replay", out=io.StringIO())
    assert (await asyncio.to_thread(compare, settings, LIVE_SCHEMA, "claims_replay")).equal
