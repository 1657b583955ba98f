"""Waiting for the decision on a claim request: read-your-writes for the claims service's
doors (``service.claims.DecisionSource``, adr/0010).

The projector NOTIFYs ``topology_decisions`` when a batch that decided claim
requests commits, with the decisions themselves in the payload
(``runtime.database.encode_decision_notices``, adr/0018): one listening connection per
API process answers every waiting request from the notification, with no query. An
empty payload (a decision too large for one) wakes a lookup of all pending request
ids, one query; so does a slow poll, which covers a notification lost while the
listening connection was down.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.runtime.database import DECISIONS_CHANNEL, decode_decision_notice
from topology_store.runtime.retry import backoff
from topology_store.service.claims import RequestDecision

log = logging.getLogger(__name__)


async def lookup(engine: AsyncEngine, request_ids: list[uuid.UUID]) -> dict[uuid.UUID, RequestDecision]:
    if not request_ids:
        return {}
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT event_id, event_type, outcome, reason, detail, request_digest FROM processed_events "
                "WHERE event_id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"ids": request_ids},
        )
        return {
            row.event_id: RequestDecision(row.event_id, row.event_type, row.outcome, row.reason, row.detail or [],
                                          bytes(row.request_digest) if row.request_digest is not None else None)
            for row in rows
        }


class LookupBatcher:
    """Point lookups of decisions, many requests to one query.

    Under a burst every claim request looks its id up (a retried request may be
    decided already); one query each queued thousands of them behind the small
    connection pool. Ids asked for while a query runs go into the next one.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._queued: dict[uuid.UUID, list[asyncio.Future[RequestDecision | None]]] = {}
        self._flushing: asyncio.Task[None] | None = None

    async def find(self, request_id: uuid.UUID) -> RequestDecision | None:
        future: asyncio.Future[RequestDecision | None] = asyncio.get_running_loop().create_future()
        self._queued.setdefault(request_id, []).append(future)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="decision-lookups")
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # the other requests of this loop iteration join the first query
        while self._queued:
            batch, self._queued = self._queued, {}
            try:
                found = await lookup(self._engine, list(batch))
            except Exception as exc:  # noqa: BLE001 - each caller decides what a failed lookup means
                for futures in batch.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for request_id, futures in batch.items():
                for future in futures:
                    if not future.done():
                        future.set_result(found.get(request_id))


class DecisionWaiter:
    def __init__(self, engine: AsyncEngine, libpq_url: str, poll_interval_s: float = 1.0) -> None:
        self._engine = engine
        self._libpq_url = libpq_url
        self._poll_interval_s = poll_interval_s
        self._pending: dict[uuid.UUID, list[asyncio.Future[RequestDecision]]] = {}
        self.lookups = LookupBatcher(engine)
        #: LISTEN holds: PostgreSQL answered, and a decision's notification will come.
        self.listening = False

    async def find(self, request_id: uuid.UUID) -> RequestDecision | None:
        """The decision on ``request_id`` if recorded now (batched with concurrent lookups)."""
        return await self.lookups.find(request_id)

    @property
    def waiting(self) -> int:
        return sum(len(f) for f in self._pending.values())

    async def wait(self, request_id: uuid.UUID, timeout_s: float, check_first: bool = True) -> RequestDecision | None:
        """The decision on ``request_id``, or None if none arrives within ``timeout_s``.
        Register before publishing the request, so no decision can slip past.
        ``check_first=False``: the caller looked the id up already, before publishing."""
        future: asyncio.Future[RequestDecision] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(request_id, []).append(future)
        try:
            # The decision may already exist (a retried request id).
            found = await self.lookups.find(request_id) if check_first else None
            if found is not None:
                return found
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            return None
        finally:
            waiters = self._pending.get(request_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._pending.pop(request_id, None)

    def resolve_notice(self, payload: str) -> bool:
        """Answer the waiters whose decisions ``payload`` carries; False when it asks for a
        lookup instead (empty, or not in the notice format)."""
        try:
            notice = decode_decision_notice(payload)
        except ValueError as exc:
            log.warning("unreadable decision notification (%s); looking the decisions up", exc)
            return False
        if notice is None:
            return False
        for request_id, request_type, outcome, reason, detail, digest in notice:
            futures = self._pending.get(request_id)
            if not futures:
                continue  # another API process's request, or nobody waits any more
            decision = RequestDecision(request_id, request_type, outcome, reason, detail, digest)
            for future in futures:
                if not future.done():
                    future.set_result(decision)
        return True

    async def _resolve_pending(self) -> None:
        if not self._pending:
            return
        found = await lookup(self._engine, list(self._pending))
        for request_id, decision in found.items():
            for future in self._pending.get(request_id, []):
                if not future.done():
                    future.set_result(decision)

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._libpq_url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {DECISIONS_CHANNEL}")
                    self.listening = True
                    attempt = 0
                    while True:
                        # Notifications answer their waiters as they come; every poll
                        # interval, a lookup catches whatever a lost notification held.
                        async for notification in conn.notifies(timeout=self._poll_interval_s):
                            if not self.resolve_notice(notification.payload):
                                await self._resolve_pending()
                        await self._resolve_pending()
            except asyncio.CancelledError:
                self.listening = False
                raise
            except Exception as exc:  # keep answering from polls until LISTEN is back
                self.listening = False
                attempt += 1
                delay = backoff(attempt)
                log.warning("decision listener failed (%s); retrying in %.1fs", exc.__class__.__name__, delay)
                await asyncio.sleep(delay)
