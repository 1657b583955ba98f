"""The read API as one FastAPI app (adr/0009): its resources (one module each), the
middleware in front of them, error handling, and the lifespan that opens the database
and keeps the snapshot fresh. ``server`` runs it on uvicorn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Path, Request, Response
from sqlalchemy import text

from topology_store.query_api.audit_api import audit_router
from topology_store.query_api.auth import denied, document_bearer_auth, secured
from topology_store.query_api.cells_api import cells_router
from topology_store.query_api.claims_api import CLAIMS_READ, ClaimsDoor, claims_router
from topology_store.query_api.documents import ClaimView, ErrorDocument, any_case_pattern
from topology_store.query_api.errors import RequestLimitsMiddleware, document_errors, error, install_error_handlers
from topology_store.query_api.health_api import health_router
from topology_store.query_api.metrics import ApiMetrics
from topology_store.query_api.snapshot_api import RouterSync, snapshot_router
from topology_store.query_api.state import ApiState, api_state
from topology_store.query_api.sync_middleware import RouterSyncMiddleware
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import ClaimBucket, stored_claim_value


def create_app(settings: Settings, metrics: ApiMetrics | None = None) -> FastAPI:
    api_metrics = metrics or ApiMetrics()
    sync = RouterSync(settings, api_metrics)  # snapshots, deltas, long-poll, tokens (adr/0009)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.sqlalchemy_url)
        cache = sync.start(engine)
        app.state.api = ApiState(settings=settings, engine=engine, cache=cache, metrics=api_metrics)
        app.state.claims = ClaimsDoor(settings, engine)
        await app.state.claims.start()
        refresher = asyncio.create_task(cache.run(), name="snapshot-refresh")
        try:
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

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        status = 500  # what the last-resort handler answers when call_next raises
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")  # a template, never a raw value
            api_metrics.requests.labels(template, str(status)).inc()
            api_metrics.latency.labels(template).observe(time.perf_counter() - started)

    app.include_router(cells_router())

    # A claims read; it goes with the claims door (query_api/claims_api.py) when that one moves.
    @app.get(
        "/v1/claims/{bucket}/{value:path}",
        response_model=ClaimView,
        responses={400: {"model": ErrorDocument}, 404: {"model": ErrorDocument},
                   503: {"model": ErrorDocument, "description": "PostgreSQL does not answer (Retry-After)"}},
        summary="Who holds a claim (read from PostgreSQL, not the snapshot)",
        openapi_extra=secured(CLAIMS_READ),
    )
    async def get_claim(
        request: Request,
        bucket: str = Path(min_length=1, max_length=32, description="A claim bucket (any case): "
                           + ", ".join(b.value for b in ClaimBucket),
                           # Documented, checked below: the message then lists the buckets.
                           json_schema_extra={"pattern": any_case_pattern(ClaimBucket)}),
        value: str = Path(min_length=1, max_length=1024, description="The value as the client spells it; canonicalized "
                          "(e.g. lower-cased) before the lookup, e-mails hashed"),
    ) -> Response:
        if refused := denied(request, request.app.state.claims.authorizer, CLAIMS_READ):
            return refused
        try:
            claim_bucket = ClaimBucket(bucket.upper())
        except ValueError:
            return error(400, "bad_bucket", f"bucket must be one of {', '.join(b.value for b in ClaimBucket)}")
        try:
            # E-mails are stored only as keyed hashes; look them up the same way.
            canonical = stored_claim_value(claim_bucket, value, api_state(request).settings.claim_secret)
        except ValueError as exc:
            return error(400, "bad_value", f"{claim_bucket.value} value: {exc}")
        async with api_state(request).engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT bucket, value, cell_id, owner_type, owner_id, claimed_at, version, status FROM claims "
                        "WHERE bucket = :bucket AND value = :value"
                    ),
                    {"bucket": claim_bucket.value, "value": canonical},
                )
            ).one_or_none()
        if row is None:
            return error(404, "claim_not_found", f"{claim_bucket.value} {canonical!r} is not claimed")
        return Response(ClaimView.model_validate(row._asdict()).model_dump_json(), media_type="application/json")

    app.include_router(health_router(api_metrics))
    app.include_router(snapshot_router(sync))
    app.add_middleware(RouterSyncMiddleware, sync=sync)  # last: it must be the outermost
    document_bearer_auth(app)
    document_errors(app)  # last: it completes what the routes and the other wrappers put in the document
    return app
