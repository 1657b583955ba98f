"""The log's clock for lease expiry.

Leases expire by log time, so that a replay decides exactly as the live run did.
When some open lease has ended by this machine's clock, the projector publishes a
``LeaseExpiryTick``; the decision then uses the tick's own log timestamp, not the
clock that prompted it. With no lease due, nothing is published.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.producer.publisher import EventPublisher
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import LeaseExpiryTick

log = logging.getLogger(__name__)


async def leases_due(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        row = await conn.execute(text("SELECT 1 FROM leases WHERE status = 'OPEN' AND expires_at <= now() LIMIT 1"))
        return row.first() is not None


async def publish_ticks(settings: Settings, engine: AsyncEngine, stop: asyncio.Event) -> None:
    source = f"projector@{socket.gethostname()}"[:255]
    publisher: EventPublisher | None = None
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), settings.lease_tick_interval_s)
                return
            except TimeoutError:
                pass
            try:
                if not await leases_due(engine):
                    continue
                if publisher is None:
                    publisher = EventPublisher(settings)
                    await publisher.start()
                await publisher.publish(LeaseExpiryTick(source=source))
            except Exception as exc:  # a missed tick only delays expiry to the next one
                log.warning("lease expiry tick not published: %s", exc.__class__.__name__)
    finally:
        if publisher is not None:
            await publisher.stop()
