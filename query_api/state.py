"""What the read API's lifespan opens for its routes: the database engine and the
snapshot cache, beside the settings and metrics (adr/0009). One per app, on
``app.state.api``; the claims door keeps its own on ``app.state.claims``, and its service
here too for the doors beside the app (the gRPC door, adr/0022).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.query_api.metrics import ApiMetrics
from topology_store.query_api.snapshot import SnapshotCache
from topology_store.runtime.settings import Settings
from topology_store.service.claims import ClaimsService


@dataclass
class ApiState:
    settings: Settings
    engine: AsyncEngine
    cache: SnapshotCache
    metrics: ApiMetrics
    claims: ClaimsService | None = None  # the claims door's service, which doors beside share


def api_state(request: Request) -> ApiState:
    return request.app.state.api  # type: ignore[no-any-return]
