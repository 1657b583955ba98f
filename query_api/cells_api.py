"""``GET /v1/cells`` and ``GET /v1/cells/{cell_id}``: the cells of the snapshot being
served, with its version headers (adr/0009). Routing data: the ``snapshot:read`` token
is checked in front, by ``query_api/sync_middleware.py``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from topology_store.query_api.auth import refusals, secured
from topology_store.query_api.documents import CellsDocument, CellView, ErrorDocument
from topology_store.query_api.errors import error
from topology_store.query_api.snapshot import Snapshot
from topology_store.query_api.snapshot_api import Answer, starlette_response, version_headers
from topology_store.query_api.state import api_state
from topology_store.schemas.models import CellId
from topology_store.schemas.router_sync import SNAPSHOT_READ


def _from(snapshot: Snapshot, document: CellsDocument | CellView) -> Response:
    return starlette_response(Answer.json(200, document.model_dump_json().encode(), version_headers(snapshot)))


def _not_loaded() -> Response:
    return error(503, "not_loaded", "no snapshot loaded yet", headers={"Retry-After": "1"})


def cells_router() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/cells", response_model=CellsDocument,
                responses={503: {"model": ErrorDocument}, **refusals(SNAPSHOT_READ)},
                openapi_extra=secured(SNAPSHOT_READ))
    async def list_cells(request: Request) -> Response:
        snapshot = api_state(request).cache.current
        if snapshot is None:
            return _not_loaded()
        return _from(snapshot, CellsDocument(version=snapshot.version, cells=snapshot.cell_views))

    @router.get("/v1/cells/{cell_id}", response_model=CellView,
                responses={404: {"model": ErrorDocument}, 503: {"model": ErrorDocument}, **refusals(SNAPSHOT_READ)},
                openapi_extra=secured(SNAPSHOT_READ))
    async def get_cell(request: Request, cell_id: Annotated[CellId, Path()]) -> Response:
        snapshot = api_state(request).cache.current
        if snapshot is None:
            return _not_loaded()
        for cell in snapshot.cell_views:
            if cell.cell_id == cell_id:
                return _from(snapshot, cell)
        return error(404, "cell_not_found", f"no cell {cell_id!r}")

    return router
