"""The log's clock for lease expiry: ticks that name the leases due, on their own partition
(adr/0010, adr/0017).

Leases expire by log time, so that a replay follows exactly what the live run decided.
Every ``lease_tick_interval_s`` the projector looks for open leases whose end has passed
by its clock and publishes, for each partition of the claim-requests topic holding
some, one ``LeaseExpiryTick`` naming them, keyed by the first lease named: the default
partitioner puts the tick on the partition of every lease it names, behind every
begin, commit and rollback of those leases that reached the log first. The decision
then compares the tick's own log timestamp with each lease's end, never the clock that
prompted it. With no lease due, nothing is published.

A lease whose tick was published is not named again for ``RETICK_INTERVALS`` rounds: its
tick is in the log and will be decided even if the member owning its partition is
slow. Named again after that, it covers a tick whose log time was still before the
lease's end (a broker clock behind this one) or that was decided nothing for another
reason. Every projector runs this loop; duplicate ticks decide nothing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import MAX_LEASES_PER_TICK, LeaseExpiryTick

log = logging.getLogger(__name__)

MAX_DUE_PER_ROUND = 20_000  # leases looked at per round; the rest wait for the next
RETICK_INTERVALS = 6  # rounds before a lease already named in a tick is named again


async def leases_due(
    engine: AsyncEngine, now: datetime, skip: Iterable[uuid.UUID] = (), limit: int = MAX_DUE_PER_ROUND
) -> list[uuid.UUID]:
    """Open leases whose end is at or before ``now``, earliest end first, but those in
    ``skip`` (named in a tick lately: a stuck partition's leases must not crowd out the
    others)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT lease_id FROM leases WHERE status = 'OPEN' AND expires_at <= :now "
                 "AND NOT (lease_id = ANY(CAST(:skip AS uuid[]))) ORDER BY expires_at, lease_id LIMIT :limit"),
            {"now": now, "skip": list(skip), "limit": limit},
        )
        return [row.lease_id for row in rows]


def ticks_for(by_partition: Mapping[int, Sequence[uuid.UUID]], source: str) -> list[LeaseExpiryTick]:
    """One tick per partition (more past ``MAX_LEASES_PER_TICK``), each naming only leases
    of that partition, the first of them its key."""
    ticks: list[LeaseExpiryTick] = []
    for _, lease_ids in sorted(by_partition.items()):
        for start in range(0, len(lease_ids), MAX_LEASES_PER_TICK):
            ticks.append(LeaseExpiryTick(source=source, lease_ids=tuple(lease_ids[start:start + MAX_LEASES_PER_TICK])))
    return ticks


def recently_named(named: dict[uuid.UUID, float], now_s: float, retick_s: float) -> set[uuid.UUID]:
    """The leases named in a tick within ``retick_s``; ``named`` forgets the others (they
    may be named again if still due), so it holds at most ``retick_s`` worth of ticks."""
    for lease_id in [l for l, at in named.items() if now_s - at >= retick_s]:
        del named[lease_id]
    return set(named)


async def publish_named(
    settings: Settings, publisher: EventPublisher, lease_ids: Sequence[uuid.UUID], source: str
) -> list[LeaseExpiryTick]:
    """Publish ticks naming ``lease_ids``, grouped by the partition each lease's commands
    go to; return them once all were acknowledged (raise the first failure)."""
    by_partition: dict[int, list[uuid.UUID]] = {}
    for lease_id in lease_ids:
        partition = await publisher.partition_for(settings.claim_requests_topic, str(lease_id).encode("utf-8"))
        by_partition.setdefault(partition, []).append(lease_id)
    ticks = ticks_for(by_partition, source)
    async for outcome in publisher.publish_many(ticks):
        if isinstance(outcome, PublishFailed):
            raise outcome
    return ticks


async def publish_ticks(settings: Settings, engine: AsyncEngine, stop: asyncio.Event) -> None:
    source = f"projector@{socket.gethostname()}"[:255]
    publisher: EventPublisher | None = None
    named: dict[uuid.UUID, float] = {}  # lease -> when a tick naming it was acknowledged
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), settings.lease_tick_interval_s)
                return
            except TimeoutError:
                pass
            try:
                now_s = time.monotonic()
                skip = recently_named(named, now_s, RETICK_INTERVALS * settings.lease_tick_interval_s)
                fresh = await leases_due(engine, datetime.now(UTC), skip)
                if not fresh:
                    continue
                if publisher is None:
                    publisher = EventPublisher(settings)
                    await publisher.start()
                for tick in await publish_named(settings, publisher, fresh, source):
                    named.update(dict.fromkeys(tick.lease_ids, now_s))
            except Exception as exc:  # noqa: BLE001 - a missed tick only delays expiry to the next round
                log.warning("lease expiry tick not published: %s", exc.__class__.__name__)
    finally:
        if publisher is not None:
            await publisher.stop()
