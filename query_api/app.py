"""HTTP routes of the read API."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import FastAPI, Path, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.query_api.audit_api import audit_router
from topology_store.query_api.claims_api import CLAIMS_READ, ClaimsDoor, claims_router, denied, secured
from topology_store.query_api.errors import RequestLimitsMiddleware, document_errors, error, install_error_handlers
from topology_store.query_api.metrics import ApiMetrics
from topology_store.query_api.models import (
    CellsDocument,
    CellView,
    ClaimView,
    ErrorDocument,
    ReadyDocument,
    any_case_pattern,
)
from topology_store.query_api.snapshot import Snapshot, SnapshotCache
from topology_store.query_api.sync import RouterSync, install_router_sync
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import CellId, ClaimBucket, stored_claim_value

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Topology-Version"
AGE_HEADER = "X-Topology-Age-Seconds"

def _version_headers(snapshot: Snapshot) -> dict[str, str]:
    return {
        "ETag": snapshot.etag,
        VERSION_HEADER: str(snapshot.version),
        AGE_HEADER: f"{snapshot.age_seconds():.3f}",
        "Cache-Control": "no-cache",
    }


@dataclass
class ApiState:
    settings: Settings
    engine: AsyncEngine
    cache: SnapshotCache
    metrics: ApiMetrics


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

    app.include_router(claims_router())
    app.include_router(audit_router())
    install_error_handlers(app)
    app.add_middleware(RequestLimitsMiddleware, max_bytes=settings.api_max_body_bytes)

    def state(request: Request) -> ApiState:
        return request.app.state.api  # type: ignore[no-any-return]

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

    def served_snapshot(request: Request) -> Snapshot | None:
        return state(request).cache.current

    @app.get("/v1/cells", response_model=CellsDocument, responses={503: {"model": ErrorDocument}})
    async def list_cells(request: Request) -> Response:
        snapshot = served_snapshot(request)
        if snapshot is None:
            return error(503, "not_loaded", "no snapshot loaded yet", headers={"Retry-After": "1"})
        document = CellsDocument(version=snapshot.version, cells=snapshot.cell_views)
        return Response(document.model_dump_json(), media_type="application/json", headers=_version_headers(snapshot))

    @app.get("/v1/cells/{cell_id}", response_model=CellView,
             responses={404: {"model": ErrorDocument}, 503: {"model": ErrorDocument}})
    async def get_cell(request: Request, cell_id: Annotated[CellId, Path()]) -> Response:
        snapshot = served_snapshot(request)
        if snapshot is None:
            return error(503, "not_loaded", "no snapshot loaded yet", headers={"Retry-After": "1"})
        for cell in snapshot.cell_views:
            if cell.cell_id == cell_id:
                return Response(cell.model_dump_json(), media_type="application/json", headers=_version_headers(snapshot))
        return error(404, "cell_not_found", f"no cell {cell_id!r}")

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
            canonical = stored_claim_value(claim_bucket, value, state(request).settings.claim_secret)
        except ValueError as exc:
            return error(400, "bad_value", f"{claim_bucket.value} value: {exc}")
        async with state(request).engine.connect() as conn:
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

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=ReadyDocument,
        summary="A snapshot is loaded: ready, also while PostgreSQL is unreachable (then stale: true)",
        description="200 once a snapshot is in memory. A database outage keeps the process ready and "
        "serving the snapshot it holds, flagged stale with its age (README \"Reliability\"); 503 only "
        "before the first snapshot is loaded.",
        responses={503: {"model": ErrorDocument, "description": "No snapshot loaded yet"}},
    )
    async def readyz(request: Request) -> Response:
        api = state(request)
        if api.cache.current is None:
            return error(503, "not_loaded", "no snapshot loaded yet")
        try:
            async with asyncio.timeout(2):
                async with api.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - unreachable: still ready, the snapshot in memory is served
            # Taking every replica out during a database outage would turn stale answers
            # into none (adr/0003): stay ready, say it is stale and how old (README "Reliability").
            current = api.cache.current
            return JSONResponse({"status": "stale", "stale": True, "version": current.version,
                                 "age_seconds": round(current.age_seconds(), 3),
                                 "database": f"unreachable: {exc.__class__.__name__}"})
        return JSONResponse({"status": "ready", "stale": False, "version": api.cache.current.version,
                             "age_seconds": round(api.cache.current.age_seconds(), 3)})

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=True, response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}})
    async def metrics() -> Response:
        return Response(generate_latest(api_metrics.registry), media_type=CONTENT_TYPE_LATEST)

    install_router_sync(app, sync)  # last: its middleware must be the outermost
    document_errors(app)  # after install_router_sync: it completes what that one adds to the document
    return app
