"""The servicers of GitLab's Topology Service contract that this store answers (adr/0021).

Read-only, from the snapshot the HTTP API holds (the same object, in the same process):

- ``CellService.GetCell``; ``GetCells`` of ``ClassifyService``, ``ClaimService`` and
  ``SequenceService`` (GitLab declares it on all three);
- ``ClassifyService.Classify`` (:mod:`topology_store.service.gitlab_classify`);
- ``HealthService``: ``ReadinessProbe`` answers once a snapshot is loaded (also while
  PostgreSQL is away: the snapshot held is served, as ``/readyz`` says), ``LivenessProbe``
  always.

``ClaimService``'s other RPCs (GetRecord, BeginUpdate, CommitUpdate, RollbackUpdate,
ListLeases, ListRecords) answer UNIMPLEMENTED with a pointer to the ADR: they need GitLab's
lease model in the claims decider first. GitLab's access rule of each is checked before
(:mod:`topology_store.grpc_api.access`): a credential bound to another cell than the
request's ``cell_id`` gets PERMISSION_DENIED, GetRecord wants an admin's.

Every answer other than OK is a :class:`~topology_store.service.gitlab_classify.Refusal` turned
into its status and message; nothing a client sends can make one INTERNAL.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from topology_store.grpc_api.access import CellAccess, TokenBinding
from topology_store.schemas.generated.proto import (
    cell_info_pb2,
    cell_service_pb2,
    cell_service_pb2_grpc,
    classify_service_pb2,
    classify_service_pb2_grpc,
    health_service_pb2,
    health_service_pb2_grpc,
    sequence_service_pb2,
    sequence_service_pb2_grpc,
)
from topology_store.schemas.generated.proto.claims.v1 import service_pb2 as claims_service_pb2
from topology_store.schemas.generated.proto.claims.v1 import service_pb2_grpc as claims_service_pb2_grpc
from topology_store.service.gitlab_cells import cell_info
from topology_store.service.gitlab_classify import Refusal, SnapshotSource, Tables, cell_by_number

Request = TypeVar("Request")
Response = TypeVar("Response")


def answers(method: Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]
            ) -> Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
    """A Refusal raised by ``method`` becomes its status and message."""

    @functools.wraps(method)
    async def answer(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except Refusal as refusal:
            await context.abort(refusal.code, refusal.message)
            raise AssertionError("unreachable: abort raises") from None

    return answer


@answers
async def _get_cells(self: Any, request: cell_info_pb2.GetCellsRequest,
                     context: grpc.aio.ServicerContext) -> cell_info_pb2.GetCellsResponse:
    """``GetCells``, one answer for the three services GitLab declares it on."""
    return self._tables.get_cells()  # type: ignore[no-any-return]


class CellService(cell_service_pb2_grpc.CellServiceServicer):
    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    @answers
    async def GetCell(self, request: cell_service_pb2.GetCellRequest,
                      context: grpc.aio.ServicerContext) -> cell_service_pb2.GetCellResponse:
        tables, numbers = self._tables.current()
        name = cell_by_number(tables, numbers, request.cell_id)
        return cell_service_pb2.GetCellResponse(cell_info=cell_info(tables.cells_by_id[name], request.cell_id))


class ClassifyService(classify_service_pb2_grpc.ClassifyServiceServicer):
    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    GetCells = _get_cells

    @answers
    async def Classify(self, request: classify_service_pb2.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> classify_service_pb2.ClassifyResponse:
        return self._tables.classify(request)


class SequenceService(sequence_service_pb2_grpc.SequenceServiceServicer):
    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    GetCells = _get_cells


def _not_served(rpc: str, rule: str) -> Callable[..., Awaitable[Any]]:
    """UNIMPLEMENTED, after GitLab's access ``rule`` (``cell``: the request's ``cell_id`` must
    match the credentials', grpc_api/access.py; ``admin``: admin credentials only)."""

    @answers
    async def refuse(self: ClaimService, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if rule == "cell":
            self._access.require_cell(context, request.cell_id)
        else:
            self._access.require_admin(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"ClaimService.{rpc} is not served yet (adr/0021): GitLab's lease model is not in the "
                            "claims decider yet; claim through the HTTP claims API (docs/protocol.md)")

    refuse.__name__ = rpc
    return refuse


class ClaimService(claims_service_pb2_grpc.ClaimServiceServicer):
    """GetCells only, so far."""

    def __init__(self, tables: Tables, access: CellAccess) -> None:
        self._tables = tables
        self._access = access

    GetCells = _get_cells

    GetRecord = _not_served("GetRecord", "admin")
    BeginUpdate = _not_served("BeginUpdate", "cell")
    CommitUpdate = _not_served("CommitUpdate", "cell")
    RollbackUpdate = _not_served("RollbackUpdate", "cell")
    ListLeases = _not_served("ListLeases", "cell")
    ListRecords = _not_served("ListRecords", "cell")


class HealthService(health_service_pb2_grpc.HealthServiceServicer):
    def __init__(self, snapshots: SnapshotSource) -> None:
        self._snapshots = snapshots

    async def ReadinessProbe(self, request: health_service_pb2.ReadinessProbeRequest,
                             context: grpc.aio.ServicerContext) -> health_service_pb2.ReadinessProbeResponse:
        if self._snapshots.current is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no snapshot loaded yet")
        return health_service_pb2.ReadinessProbeResponse()

    async def LivenessProbe(self, request: health_service_pb2.LivenessProbeRequest,
                            context: grpc.aio.ServicerContext) -> health_service_pb2.LivenessProbeResponse:
        return health_service_pb2.LivenessProbeResponse()


def _name(module: Any, service: str) -> str:
    return module.DESCRIPTOR.services_by_name[service].full_name  # type: ignore[no-any-return]


# Answered whole: health checking tracks these. ClaimService answers GetCells only.
SERVED = (
    _name(cell_service_pb2, "CellService"),
    _name(classify_service_pb2, "ClassifyService"),
    _name(health_service_pb2, "HealthService"),
    _name(sequence_service_pb2, "SequenceService"),
)
PARTLY_SERVED = (_name(claims_service_pb2, "ClaimService"),)


def add_services(server: grpc.aio.Server, snapshots: SnapshotSource, configured_numbers: dict[str, int],
                 token_binding: TokenBinding | None = None) -> None:
    """Register every servicer on ``server`` (:data:`SERVED` and :data:`PARTLY_SERVED`);
    ``token_binding``: the cell a bearer token is bound to (per-cell authorization)."""
    tables = Tables(snapshots, configured_numbers)
    cell_service_pb2_grpc.add_CellServiceServicer_to_server(CellService(tables), server)
    classify_service_pb2_grpc.add_ClassifyServiceServicer_to_server(ClassifyService(tables), server)
    sequence_service_pb2_grpc.add_SequenceServiceServicer_to_server(SequenceService(tables), server)
    claims_service_pb2_grpc.add_ClaimServiceServicer_to_server(ClaimService(tables, CellAccess(tables, token_binding)), server)
    health_service_pb2_grpc.add_HealthServiceServicer_to_server(HealthService(snapshots), server)
