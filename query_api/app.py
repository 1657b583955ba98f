"""The read API as one FastAPI app (adr/0009): its resources (one module each), the
middleware in front of them, error handling, and the lifespan that opens the database
and keeps the snapshot fresh. ``server`` runs it on uvicorn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from topology_store.query_api.audit_api import audit_router
from topology_store.query_api.auth import document_bearer_auth
from topology_store.query_api.cells_api import cells_router
from topology_store.query_api.claims_api import ClaimsDoor, ShedEarly, claims_router
from topology_store.query_api.contract import document_contract
from topology_store.query_api.errors import RequestLimitsMiddleware, document_errors, install_error_handlers
from topology_store.query_api.gitlab_api import gitlab_router
from topology_store.query_api.health_api import health_router
from topology_store.query_api.metrics import ApiMetrics
from topology_store.query_api.snapshot_api import RouterSync, snapshot_router
from topology_store.query_api.state import ApiState
from topology_store.query_api.sync_middleware import RouterSyncMiddleware
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings

# Another door over this process's snapshot, run while the app runs (the gRPC door,
# adr/0021, handed in by the command: the doors do not import each other).
BesideDoor = Callable[[ApiState], AbstractAsyncContextManager[object]]


def create_app(settings: Settings, metrics: ApiMetrics | None = None, beside: Sequence[BesideDoor] = ()) -> FastAPI:
    api_metrics = metrics or ApiMetrics()
    sync = RouterSync(settings, api_metrics)  # snapshots, deltas, long-poll, tokens (adr/0009)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.sqlalchemy_url)
        cache = sync.start(engine)
        app.state.claims = ClaimsDoor(settings, engine)
        app.state.api = ApiState(settings=settings, engine=engine, cache=cache, metrics=api_metrics,
                                 claims=app.state.claims.service)
        api_metrics.watch_admission(app.state.claims.admission)
        await app.state.claims.start()
        refresher = asyncio.create_task(cache.run(), name="snapshot-refresh")
        try:
            async with AsyncExitStack() as doors:
                for door in beside:
                    await doors.enter_async_context(door(app.state.api))
                yield
        finally:
            await app.state.claims.stop()
            refresher.cancel()
            try:
                await refresher
            except asyncio.CancelledError:
                pass
            await engine.dispose()

    app = FastAPI(
        title="Topology read API",
        version="1",
        summary="Which cell owns this? Versioned routing snapshots and point lookups.",
        lifespan=lifespan,
    )

    app.state.sync = sync
    app.include_router(claims_router())
    app.include_router(audit_router())
    install_error_handlers(app)
    app.add_middleware(RequestLimitsMiddleware, max_bytes=settings.api_max_body_bytes)

    app.add_middleware(_Measured, metrics=api_metrics)
    app.add_middleware(ShedEarly)  # outside the timing: a refusal is counted by the admission metrics

    app.include_router(cells_router())

    app.include_router(health_router(api_metrics))
    app.include_router(snapshot_router(sync))
    app.include_router(gitlab_router(sync))  # GitLab's Classify over REST (adr/0021)
    app.add_middleware(RouterSyncMiddleware, sync=sync)  # last: it must be the outermost
    document_bearer_auth(app)
    document_contract(app)
    document_errors(app)  # last: it completes what the routes and the other wrappers put in the document
    return app


class _Measured:
    """Counts and times every HTTP request by route template and status. Plain ASGI: a
    ``@app.middleware("http")`` runs the rest of the app as a task of its own and wraps
    every response in a stream, a large share of the API's CPU per claim call in a
    profile (adr/0018)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the last-resort handler answers when the app raises

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            # The router put the matched route in the scope: a template, never a raw value.
            template = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(template, str(status)).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - started)
