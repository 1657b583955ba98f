"""The servicers of GitLab's Topology Service contract that this store answers (adr/0021, adr/0022).

From the snapshot the HTTP API holds (the same object, in the same process):

- ``CellService.GetCell``; ``GetCells`` of ``ClassifyService``, ``ClaimService`` and
  ``SequenceService`` (GitLab declares it on all three);
- ``ClassifyService.Classify`` (:mod:`topology_store.service.gitlab_classify`);
- ``HealthService``: ``ReadinessProbe`` answers once a snapshot is loaded (also while
  PostgreSQL is away: the snapshot held is served, as ``/readyz`` says), ``LivenessProbe``
  always.

``ClaimService``'s writes (BeginUpdate, CommitUpdate, RollbackUpdate) go through the claims
service like the HTTP door's: published, decided in log order by the projector, answered
with the decision (:mod:`topology_store.service.gitlab_claims` maps both ways). Its reads
(ListLeases, ListRecords, GetRecord) read the projection (:mod:`topology_store.grpc_api.records`).
GitLab's access rule of each is checked first (:mod:`topology_store.grpc_api.access`): a
credential bound to another cell than the request's ``cell_id`` gets PERMISSION_DENIED,
GetRecord wants an admin's.

Every answer other than OK is a :class:`~topology_store.service.gitlab_classify.Refusal` turned
into its status and message; nothing a client sends can make one INTERNAL.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.grpc_api.access import CellAccess, TokenBinding
from topology_store.grpc_api.claim_owners import ClaimOwners
from topology_store.grpc_api.records import Records
from topology_store.runtime.settings import Settings
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
from topology_store.schemas.generated.proto.claims.v1 import messages_pb2 as claims_messages_pb2
from topology_store.schemas.generated.proto.claims.v1 import service_pb2 as claims_service_pb2
from topology_store.schemas.generated.proto.claims.v1 import service_pb2_grpc as claims_service_pb2_grpc
from topology_store.schemas.generated.proto.types.v1 import uuid_pb2
from topology_store.schemas.models import MAX_LEASE_TTL_MS, Event, stored_claim_value
from topology_store.service import gitlab_claims
from topology_store.service.claims import ClaimsService, Decided, RequestDecision, Submission
from topology_store.service.gitlab_cells import cell_info
from topology_store.service.gitlab_classify import Refusal, SnapshotSource, Tables, cell_by_number, invalid

Request = TypeVar("Request")
Response = TypeVar("Response")
Result = TypeVar("Result")

#: Call metadata asking for a lease with a server-side TTL, in ms (adr/0022).
LEASE_TTL_METADATA = "x-topology-lease-ttl-ms"


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
    def __init__(self, tables: Tables, owners: ClaimOwners | None = None, secret: bytes = b"") -> None:
        self._tables = tables
        self._owners = owners
        self._secret = secret

    GetCells = _get_cells

    @answers
    async def Classify(self, request: classify_service_pb2.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> classify_service_pb2.ClassifyResponse:
        if self._owners is None:
            return self._tables.classify(request)
        return await _read(self._tables.classify_claims(request, self._owners, self._secret))


class SequenceService(sequence_service_pb2_grpc.SequenceServiceServicer):
    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    GetCells = _get_cells


def _decision(submission: Submission) -> RequestDecision:
    """The decision of an applied or unchanged submission; GitLab's status raised for anything else."""
    refusal = gitlab_claims.refusal_of(submission)
    if refusal is not None:
        raise refusal
    assert isinstance(submission, Decided)
    return submission.decision


def _deadline(context: grpc.aio.ServicerContext, default_s: float) -> float:
    """How long to wait for a decision: the call's own deadline, less a margin to answer in."""
    remaining = context.time_remaining()
    return default_s if remaining is None else max(0.0, min(default_s, remaining - 0.01))


def _lease_ttl_ms(context: grpc.aio.ServicerContext, default_ms: int) -> int:
    """The lease's server-side TTL: the deployment's (0: none, GitLab's model), or the
    call's ``x-topology-lease-ttl-ms`` metadata (adr/0022)."""
    for key, value in context.invocation_metadata() or ():
        if key == LEASE_TTL_METADATA:
            text = value.decode() if isinstance(value, bytes) else value
            if not text.isdigit() or not (int(text) == 0 or 1000 <= int(text) <= MAX_LEASE_TTL_MS):
                raise invalid(f"{LEASE_TTL_METADATA} must be 0 (no expiry) or 1000..{MAX_LEASE_TTL_MS}, got {text[:32]!r}")
            return int(text)
    return default_ms


class ClaimService(claims_service_pb2_grpc.ClaimServiceServicer):
    """GitLab's claims: writes through the claims service (every one decided in the log),
    reads from the projection (adr/0022). GitLab's access rule of each RPC is checked first:
    a credential bound to another cell than the request's ``cell_id`` gets PERMISSION_DENIED,
    GetRecord wants an admin's."""

    def __init__(self, tables: Tables, access: CellAccess, claims: ClaimsService | None, records: Records | None,
                 settings: Settings) -> None:
        self._tables = tables
        self._access = access
        self._claims = claims
        self._records = records
        self._wait_s = settings.decision_wait_s
        self._ttl_ms = settings.grpc_lease_ttl_ms
        self._secret = settings.claim_secret
        self._source = f"grpc@{socket.gethostname()}"[:255]

    GetCells = _get_cells

    def _writes(self) -> tuple[ClaimsService, Records]:
        if self._claims is None or self._records is None:
            raise Refusal(grpc.StatusCode.UNIMPLEMENTED, "this gRPC door has no claims service (adr/0022)")
        return self._claims, self._records

    def _cell(self, number: int) -> tuple[str, int]:
        tables, numbers = self._tables.current()
        return cell_by_number(tables, numbers, number), number

    async def _submit(self, command: Event, context: grpc.aio.ServicerContext) -> Submission:
        claims, _ = self._writes()
        return await claims.submit(command, wait_s=_deadline(context, self._wait_s))

    @answers
    async def BeginUpdate(self, request: claims_service_pb2.BeginUpdateRequest,
                          context: grpc.aio.ServicerContext) -> claims_service_pb2.BeginUpdateResponse:
        self._access.require_cell(context, request.cell_id)
        claims, records = self._writes()
        cell, number = self._cell(request.cell_id)
        ttl_ms = _lease_ttl_ms(context, self._ttl_ms)
        # Past the budget, refused before anything is read or published (adr/0018).
        if claims.admission is not None and (overloaded := claims.admission.refuse()) is not None:
            _decision(overloaded)  # raises RESOURCE_EXHAUSTED
        first = gitlab_claims.attempt_ids(request, cell, count=1)[0]
        build = functools.partial(gitlab_claims.begin_command, request, cell, lease_ttl_ms=ttl_ms, source=self._source,
                                  secret=self._secret)
        # A first attempt (the common case) goes out at once under its id; the claims service's
        # own lookup answers one decided before, with no acknowledgement.
        submission = await self._submit(build(request_id=first), context)
        if isinstance(submission, Decided) and submission.acknowledgement is None:
            # Decided before: a retry (its lease still open: that answer stands), or these bytes
            # again after that attempt ended or was refused: the next attempt's id.
            request_id, start = None, 0
            while request_id is None:  # one lookup unless this content was begun and ended ATTEMPTS times
                ids = gitlab_claims.attempt_ids(request, cell, start)
                request_id = gitlab_claims.choose_attempt(ids, await _read(records.attempts(ids)))
                start += gitlab_claims.ATTEMPTS
            if request_id != first:
                submission = await self._submit(build(request_id=request_id), context)
        lease = gitlab_claims.granted_lease(_decision(submission))
        return claims_service_pb2.BeginUpdateResponse(cell_id=number, lease_uuid=uuid_pb2.UUID(value=str(lease)))

    async def _end_lease(self, request: claims_service_pb2.CommitUpdateRequest | claims_service_pb2.RollbackUpdateRequest,
                         context: grpc.aio.ServicerContext) -> None:
        self._access.require_cell(context, request.cell_id)
        cell, _ = self._cell(request.cell_id)
        _decision(await self._submit(gitlab_claims.end_command(request, cell, self._source), context))

    @answers
    async def CommitUpdate(self, request: claims_service_pb2.CommitUpdateRequest,
                           context: grpc.aio.ServicerContext) -> claims_service_pb2.CommitUpdateResponse:
        await self._end_lease(request, context)
        return claims_service_pb2.CommitUpdateResponse()

    @answers
    async def RollbackUpdate(self, request: claims_service_pb2.RollbackUpdateRequest,
                             context: grpc.aio.ServicerContext) -> claims_service_pb2.RollbackUpdateResponse:
        await self._end_lease(request, context)
        return claims_service_pb2.RollbackUpdateResponse()

    @answers
    async def ListLeases(self, request: claims_service_pb2.ListLeasesRequest,
                         context: grpc.aio.ServicerContext) -> claims_service_pb2.ListLeasesResponse:
        self._access.require_cell(context, request.cell_id)
        _, records = self._writes()
        cell, _ = self._cell(request.cell_id)
        limit = request.limit if request.HasField("limit") else gitlab_claims.DEFAULT_LIST_LIMIT
        if not 1 <= limit <= gitlab_claims.MAX_LIST_LIMIT:
            raise invalid(f"limit must be 1..{gitlab_claims.MAX_LIST_LIMIT}, got {limit}")
        after = None
        if request.HasField("next"):
            cursor = claims_messages_pb2.LeaseRecord()
            if not request.next.Unpack(cursor):
                raise invalid(f"next must be the cursor a ListLeases answer gave (a LeaseRecord), "
                              f"not {request.next.type_url[:128]!r}")
            after = (gitlab_claims.moment(cursor.created_at, "next.created_at"),
                     gitlab_claims.lease_uuid(cursor.uuid, "next.uuid"))
        created_after = (gitlab_claims.moment(request.created_after, "created_after")
                         if request.HasField("created_after") else None)
        found = await _read(records.open_leases(cell, created_after, after, limit + 1))
        page = [claims_messages_pb2.LeaseRecord(uuid=uuid_pb2.UUID(value=str(lease_id)),
                                                created_at=gitlab_claims.timestamp(at),
                                                updated_at=gitlab_claims.timestamp(at))
                for lease_id, at in found[:limit]]
        response = claims_service_pb2.ListLeasesResponse(leases=page)
        if len(found) > limit:  # more follow: the last one listed is where the next page starts
            response.next.Pack(page[-1])
        return response

    @answers
    async def ListRecords(self, request: claims_service_pb2.ListRecordsRequest,
                          context: grpc.aio.ServicerContext) -> claims_service_pb2.ListRecordsResponse:
        self._access.require_cell(context, request.cell_id)
        _, records = self._writes()
        cell, number = self._cell(request.cell_id)
        source_type = None
        if request.source_type:
            if request.source_type not in gitlab_claims.Source.Type.values():
                raise invalid(f"source_type {request.source_type} is not one of GitLab's Source types")
            source_type = gitlab_claims.Source.Type.Name(request.source_type)
        buckets = gitlab_claims.lookup_keys(request.bucket_types, request.claim_types)
        rows = await _read(records.records(cell, source_type, buckets, request.source_id_gt,
                                           request.source_id_lte or None, gitlab_claims.RECORDS_PAGE + 1))
        page, truncated = gitlab_claims.records_page(rows, number)
        return claims_service_pb2.ListRecordsResponse(records=page, truncated=truncated)

    @answers
    async def GetRecord(self, request: claims_service_pb2.GetRecordRequest,
                        context: grpc.aio.ServicerContext) -> claims_service_pb2.GetRecordResponse:
        self._access.require_admin(context)
        _, records = self._writes()
        bucket, value = gitlab_claims.get_record_key(request)
        row = await _read(records.record(bucket.value, stored_claim_value(bucket, value, self._secret)))
        if row is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"no record of {bucket.value} {value[:64]!r}")
        tables, numbers = self._tables.current()
        number = numbers.by_name.get(row.cell_id, 0)
        response = claims_service_pb2.GetRecordResponse(record=gitlab_claims.record_message(row, number))
        cell = tables.cells_by_id.get(row.cell_id)
        if cell is not None and number:
            response.cell_info.CopyFrom(cell_info(cell, number))
        return response


async def _read(query: Awaitable[Result]) -> Result:
    """A read of the projection; the database away is UNAVAILABLE (Rails retries it)."""
    try:
        return await query
    except (OSError, SQLAlchemyError) as exc:
        raise Refusal(grpc.StatusCode.UNAVAILABLE, f"the projection cannot be read now: {type(exc).__name__}") from None


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


# Answered whole: health checking tracks these.
SERVED = (
    _name(cell_service_pb2, "CellService"),
    _name(classify_service_pb2, "ClassifyService"),
    _name(health_service_pb2, "HealthService"),
    _name(sequence_service_pb2, "SequenceService"),
    _name(claims_service_pb2, "ClaimService"),
)


def add_services(server: grpc.aio.Server, snapshots: SnapshotSource, settings: Settings,
                 token_binding: TokenBinding | None = None, claims: ClaimsService | None = None,
                 engine: AsyncEngine | None = None) -> None:
    """Register every servicer of :data:`SERVED` on ``server``; ``token_binding``: the cell a
    bearer token is bound to (per-cell authorization); ``claims`` and ``engine``: the claims
    service and the projection's database ClaimService writes through and reads from."""
    tables = Tables(snapshots, settings.grpc_cell_numbers)
    cell_service_pb2_grpc.add_CellServiceServicer_to_server(CellService(tables), server)
    owners = ClaimOwners(engine) if engine is not None else None
    classify_service_pb2_grpc.add_ClassifyServiceServicer_to_server(
        ClassifyService(tables, owners, settings.claim_secret), server)
    sequence_service_pb2_grpc.add_SequenceServiceServicer_to_server(SequenceService(tables), server)
    records = Records(engine) if engine is not None else None
    claims_service_pb2_grpc.add_ClaimServiceServicer_to_server(
        ClaimService(tables, CellAccess(tables, token_binding), claims, records, settings), server)
    health_service_pb2_grpc.add_HealthServiceServicer_to_server(HealthService(snapshots), server)
