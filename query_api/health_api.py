"""``GET /healthz``, ``GET /readyz`` and ``GET /metrics``: whether the process lives,
whether it serves a snapshot (also a stale one while PostgreSQL is away, adr/0012),
and its Prometheus metrics (adr/0011).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from topology_store.query_api.documents import ErrorDocument, ReadyDocument
from topology_store.query_api.errors import error
from topology_store.query_api.metrics import ApiMetrics
from topology_store.query_api.state import api_state


def health_router(api_metrics: ApiMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        response_model=ReadyDocument,
        summary="A snapshot is loaded: ready, also while PostgreSQL is unreachable (then stale: true)",
        description="200 once a snapshot is in memory. A database outage keeps the process ready and "
        "serving the snapshot it holds, flagged stale with its age (README \"Reliability\"); 503 only "
        "before the first snapshot is loaded.",
        responses={503: {"model": ErrorDocument, "description": "No snapshot loaded yet"}},
    )
    async def readyz(request: Request) -> Response:
        api = api_state(request)
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

    @router.get("/metrics", summary="Prometheus metrics", include_in_schema=True, response_class=Response,
                responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                 "description": "Prometheus text exposition format"}})
    async def metrics() -> Response:
        return Response(generate_latest(api_metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
