"""HTTP for clients that do not speak Kafka: claim requests with a synchronous answer, a
door of the claims service (``service/claims.py``, adr/0015).

Each call publishes a command to the claim-requests topic and waits for the
projector's decision (read-your-writes): 201/200 when granted, 409 naming the
conflicting cell, 504 with the request id when no decision arrives in time (the
client then polls ``GET /v1/requests/{id}``). A request id given twice gets the
same answer and never a second claim: the request id is the command's event_id,
which the projector processes once. A request id reused for another command (another
type, or other content) is refused with 409 ``request_id_reused`` (adr/0017).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime
from typing import Annotated, Any

from annotated_types import Ge, Le
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Receive, Scope, Send

from topology_store.producer.publisher import EventPublisher
from topology_store.query_api.auth import Authorizer, denied, secured
from topology_store.query_api.contract import (
    ANY_CLAIM_VALUE_PATTERN,
    CLAIM_VALUE_FORMATS,
    PARAM_INTEGER,
    TEXT_PATTERN,
    ClaimInput,
    LeaseTtlBody,
    OwnerIdBody,
    OwnerIdParam,
    Uuid,
    door_claim_value,
    parse_bucket,
)
from topology_store.query_api.decisions import DecisionWaiter, lookup
from topology_store.query_api.documents import ClaimView, ErrorDocument, any_case_pattern
from topology_store.query_api.errors import DATABASE_DOWN, RETRY_AFTER_S, error, validation_message
from topology_store.runtime.settings import Settings
from topology_store.schemas import router_sync
from topology_store.schemas.models import (
    MAX_CLAIM_VALUE_LENGTH,
    MAX_CLAIMS_PER_REQUEST,
    CellId,
    ClaimBucket,
    Event,
    OwnerType,
    protect_value,
    stored_claim_value,
)
from topology_store.service import commands
from topology_store.service.admission import Admission, Budget, Overloaded
from topology_store.service.claims import (
    ClaimsService,
    Decided,
    DecisionUnreadable,
    NotPublished,
    Pending,
    RequestDecision,
    RequestReused,
    Submission,
)

log = logging.getLogger(__name__)


MAX_OWNER_PAGE = 1000


class BeginRequest(BaseModel):
    """Reserve all claims for one owner under a lease, or none."""

    model_config = ConfigDict(extra="forbid")  # strict types and no unknown fields: query_api/contract.py

    request_id: Uuid | None = Field(default=None, description="Idempotency key; generated when absent")
    lease_id: Uuid | None = Field(default=None, description="Generated when absent")
    cell_id: CellId
    owner_type: OwnerType
    owner_id: OwnerIdBody
    claims: list[ClaimInput] = Field(
        min_length=1, max_length=MAX_CLAIMS_PER_REQUEST, json_schema_extra={"uniqueItems": True},
        description="Each (bucket, value) once, also once canonical (case-insensitive buckets lower-cased): "
        "a request naming one twice is a 400")
    lease_ttl_ms: LeaseTtlBody = 60_000


class LeaseAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cell_id: CellId
    request_id: Uuid | None = None


class RequestAnswer(BaseModel):
    request_id: uuid.UUID
    request_type: str
    outcome: str = Field(description="applied, unchanged or rejected")
    reason: str | None
    decisions: list[dict[str, Any]] = Field(description="The decision events recorded in the log")


class OwnerClaim(BaseModel):
    bucket: str
    value: str
    status: str
    lease_id: uuid.UUID | None
    claimed_at: datetime


class OwnerDocument(BaseModel):
    cell_id: str
    owner_type: OwnerType
    owner_id: int
    claims: list[OwnerClaim]
    next_after: str | None = Field(
        default=None, description="More claims follow: pass this as after= to get the next page")


CLAIMS_READ, CLAIMS_WRITE = router_sync.CLAIMS_READ, router_sync.CLAIMS_WRITE

_PATH_VALUE = (f"The value as the client spells it; canonicalized (e.g. lower-cased), e-mails hashed. Its format "
               f"depends on the bucket ({CLAIM_VALUE_FORMATS}): a value its bucket cannot hold names no claim (404)")


def _no_such_claim(bucket: str, value: str) -> JSONResponse | None:
    """The 404 of a value that ``bucket`` cannot hold; None for a possible claim (or an
    unknown bucket, which the caller refuses). No claim can have such a value, and the
    document cannot tie the value's format to the bucket of another path parameter."""
    try:
        claim_bucket = parse_bucket(bucket)
    except ValueError:
        return None
    try:
        door_claim_value(claim_bucket, value)
    except ValueError as exc:
        return error(404, "claim_not_found", f"no {claim_bucket.value} claim can have this value: {exc}")
    return None




def _answer(decision: RequestDecision, created: bool = False) -> JSONResponse:
    body = RequestAnswer(
        request_id=decision.request_id,
        request_type=decision.request_type,
        outcome=decision.outcome,
        reason=decision.reason,
        decisions=decision.decisions,
    ).model_dump(mode="json")
    if decision.outcome == "rejected":
        rejected = next((d for d in decision.decisions if d.get("type") == "RequestRejected"), {})
        return error(
            409,
            str(rejected.get("reason", "rejected")).lower(),
            decision.reason or "rejected",
            request_id=str(decision.request_id),
            conflicts=rejected.get("conflicts", []),
        )
    return JSONResponse(body, status_code=201 if created and decision.outcome == "applied" else 200)


def _respond(result: Submission, wait_s: float, created: bool = False) -> JSONResponse:
    """The HTTP answer to what a submission came to."""
    match result:
        case Decided(decision=decision):
            return _answer(decision, created)
        case NotPublished(request_id=request_id, cause=cause):
            log.warning("could not publish %s: %s", request_id, cause.__class__.__name__)
            return error(503, "broker_unavailable", "the request could not be published; retry with the same request_id",
                         headers={"Retry-After": str(RETRY_AFTER_S)}, request_id=str(request_id))
        case DecisionUnreadable(request_id=request_id, cause=cause):
            # Published, so it will be decided: the client retries with the same request id.
            log.warning("database unavailable waiting for %s: %s", request_id, cause.__class__.__name__)
            return error(503, "database_unavailable", "published, but the decision cannot be read now; retry "
                         "with the same request_id", headers={"Retry-After": str(RETRY_AFTER_S)},
                         request_id=str(request_id))
        case Pending(request_id=request_id):
            # An error document like every other non-success answer, with the id to poll.
            return error(504, "decision_pending", f"no decision within {wait_s}s; poll GET /v1/requests/{request_id}",
                         request_id=str(request_id))
        case RequestReused(request_id=request_id, recorded_type=recorded_type, same_type=same_type):
            what = f"another {recorded_type} (other content)" if same_type else f"a {recorded_type}"
            return error(409, "request_id_reused", f"request_id {request_id} was used for {what}; send this request "
                         "under a new request_id", request_id=str(request_id))
        case Overloaded(retry_after_s=retry_after_s, reason=reason):
            # Refused before anything was published: the same request, later, is safe (adr/0018).
            return error(429, "overloaded", f"too many claim requests waiting for a decision ({reason}); retry "
                         f"after {retry_after_s}s", headers={"Retry-After": str(retry_after_s)},
                         retry_after_s=retry_after_s)
    raise AssertionError(result)


def _overloaded(refusal: Overloaded) -> JSONResponse:
    return _respond(refusal, 0.0)


class ShedEarly:
    """Refuses a new claim request (POST /v1/claims, DELETE /v1/claims/...) with the
    service's 429 before its body is read, parsed, validated or authenticated, while the
    admission budget is spent (adr/0018). Under overload the API's event loop is the
    queue: a refusal after the whole FastAPI path cost about as much CPU as a claim's
    own handling, and took as long to come. Commits and rollbacks always pass; so does
    everything while the budget lasts, to be admitted (or refused) by the service."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
                (scope["method"] == "POST" and scope["path"] == "/v1/claims")
                or (scope["method"] == "DELETE" and scope["path"].startswith("/v1/claims/"))):
            door: ClaimsDoor | None = getattr(scope["app"].state, "claims", None)
            refusal = door.admission.refuse() if door is not None else None
            if refusal is not None:
                await _overloaded(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ClaimsDoor:
    """What the claims routes share: the claims service over a Kafka publisher (started
    on first use, so reads keep working while the broker is away) and the decision
    waiter, plus the engine and authorizer of the read routes."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.authorizer = Authorizer.from_settings(settings)
        self.waiter = DecisionWaiter(engine, settings.libpq_url)
        self.admission = Admission(Budget(settings.claims_max_in_flight, settings.claims_max_wait_age_ms / 1000))
        self.service = ClaimsService(self._started_publisher, self.waiter, settings.decision_wait_s,
                                     unreadable=DATABASE_DOWN, admission=self.admission,
                                     secret=settings.claim_secret)
        self._publisher: EventPublisher | None = None
        self._publisher_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.waiter.run(), name="decision-waiter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._publisher is not None:
            await self._publisher.stop()

    async def _started_publisher(self) -> EventPublisher:
        async with self._publisher_lock:
            if self._publisher is None:
                # No linger: a claim call waits for its acknowledgement, and aiokafka sends one
                # request per broker at a time, so what arrives meanwhile is batched anyway
                # (adr/0018). No gzip: a claim command is a few hundred bytes.
                publisher = EventPublisher(self.settings.model_copy(update={"producer_linger_ms": 0}),
                                           compress=False)
                await publisher.start()
                self._publisher = publisher
            return self._publisher

    async def submit(self, command: Event, created: bool = False, new_id: bool = False) -> JSONResponse:
        """Publish ``command`` (unless already decided) and answer with its decision.
        ``new_id``: the client gave no request id, so the command's is new and nothing
        is looked up before publishing it."""
        return _respond(await self.service.submit(command, new_id=new_id), self.service.wait_s, created)


def claims_router() -> APIRouter:
    router = APIRouter(tags=["claims"])
    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorDocument}, 401: {"model": ErrorDocument}, 403: {"model": ErrorDocument},
        409: {"model": ErrorDocument, "description": "Rejected (the code is the reason, e.g. `conflict`, "
              "`lease_expired`), or `request_id_reused`: the request_id was used for another command (another "
              "type or other content); nothing was decided for this one"},
        503: {"model": ErrorDocument},
        504: {"model": ErrorDocument, "description": "Published, no decision yet (code `decision_pending`, "
              "`request_id` beside the message): poll GET /v1/requests/{request_id}"},
    }
    # Commits and rollbacks are never shed (adr/0018): only the other requests document 429.
    sheddable: dict[int | str, dict[str, Any]] = {**errors, 429: {
        "model": ErrorDocument,
        "description": "Overloaded (code `overloaded`): too many claim requests wait for a decision; refused at once, "
                       "nothing published; the same request may be sent again after `Retry-After` seconds",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait"}}}}

    def service(request: Request) -> ClaimsDoor:
        return request.app.state.claims  # type: ignore[no-any-return]

    def invalid(exc: ValidationError | ValueError) -> JSONResponse:
        message = validation_message(exc.errors()) if isinstance(exc, ValidationError) else str(exc)
        return error(400, "invalid_request", message)

    @router.post("/v1/claims", status_code=201, response_model=RequestAnswer, responses=sheddable,
                 summary="Begin: reserve claims under a lease, all or none", openapi_extra=secured(CLAIMS_WRITE))
    async def begin(request: Request, body: BeginRequest) -> JSONResponse:
        if refused := denied(request, service(request).authorizer, CLAIMS_WRITE, cell=body.cell_id):
            return refused
        try:
            command = commands.begin(
                request_id=body.request_id, lease_id=body.lease_id, source=f"http:{body.cell_id}",
                cell_id=body.cell_id, owner_type=body.owner_type, owner_id=body.owner_id,
                claims=[c.model_dump() for c in body.claims], lease_ttl_ms=body.lease_ttl_ms,
            )
        except ValidationError as exc:
            return invalid(exc)
        return await service(request).submit(command, created=True, new_id=body.request_id is None)

    async def lease_action(request: Request, lease_id: uuid.UUID, body: LeaseAction, commit: bool) -> JSONResponse:
        if refused := denied(request, service(request).authorizer, CLAIMS_WRITE, cell=body.cell_id):
            return refused
        build = commands.commit if commit else commands.rollback
        try:
            command = build(request_id=body.request_id, source=f"http:{body.cell_id}", lease_id=lease_id,
                            cell_id=body.cell_id)
        except ValidationError as exc:
            return invalid(exc)
        return await service(request).submit(command, new_id=body.request_id is None)

    @router.post("/v1/leases/{lease_id}/commit", response_model=RequestAnswer, responses=errors,
                 summary="Make a lease's claims permanent", openapi_extra=secured(CLAIMS_WRITE))
    async def commit(request: Request, lease_id: Annotated[Uuid, Path()], body: LeaseAction) -> JSONResponse:
        return await lease_action(request, lease_id, body, commit=True)

    @router.post("/v1/leases/{lease_id}/rollback", response_model=RequestAnswer, responses=errors,
                 summary="Free a lease's claims", openapi_extra=secured(CLAIMS_WRITE))
    async def rollback(request: Request, lease_id: Annotated[Uuid, Path()], body: LeaseAction) -> JSONResponse:
        return await lease_action(request, lease_id, body, commit=False)

    @router.delete("/v1/claims/{bucket}/{value:path}", response_model=RequestAnswer,
                   responses={**sheddable, 404: {"model": ErrorDocument, "description": "No claim of the bucket "
                                                 "can have this value (nothing is published)"}},
                   summary="Destroy: free a committed claim of its owner", openapi_extra=secured(CLAIMS_WRITE))
    async def destroy(
        request: Request,
        owner_type: OwnerType,
        cell_id: Annotated[CellId, Query()],
        owner_id: Annotated[OwnerIdParam, Query()],
        bucket: str = Path(min_length=1, max_length=32, description="A claim bucket (any case)",
                           json_schema_extra={"pattern": any_case_pattern(ClaimBucket)}),
        value: str = Path(min_length=1, max_length=MAX_CLAIM_VALUE_LENGTH, description=_PATH_VALUE,
                          json_schema_extra={"pattern": ANY_CLAIM_VALUE_PATTERN}),
        request_id: Annotated[Uuid | None, Query()] = None,
    ) -> JSONResponse:
        if refused := denied(request, service(request).authorizer, CLAIMS_WRITE, cell=cell_id):
            return refused
        if missing := _no_such_claim(bucket, value):
            return missing
        try:
            command = commands.destroy(
                request_id=request_id, source=f"http:{cell_id}", cell_id=cell_id, owner_type=owner_type,
                owner_id=owner_id, claims=[{"bucket": bucket.upper(), "value": value}],
            )
        except ValidationError as exc:
            return invalid(exc)
        return await service(request).submit(command, new_id=request_id is None)

    @router.get(
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
        value: str = Path(min_length=1, max_length=MAX_CLAIM_VALUE_LENGTH, description=_PATH_VALUE,
                          json_schema_extra={"pattern": ANY_CLAIM_VALUE_PATTERN}),
    ) -> JSONResponse | Response:
        if refused := denied(request, service(request).authorizer, CLAIMS_READ):
            return refused
        try:
            claim_bucket = parse_bucket(bucket)
        except ValueError:
            return error(400, "bad_bucket", f"bucket must be one of {', '.join(b.value for b in ClaimBucket)}")
        if missing := _no_such_claim(bucket, value):
            return missing
        # E-mails are stored only as keyed hashes; look them up the same way.
        canonical = protect_value(claim_bucket, door_claim_value(claim_bucket, value),
                                  service(request).settings.claim_secret)
        async with service(request).engine.connect() as conn:
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

    @router.get("/v1/requests/{request_id}", response_model=RequestAnswer,
                responses={404: {"model": ErrorDocument}, 409: {"model": ErrorDocument},
                           503: {"model": ErrorDocument}},
                summary="The decision on a request (after a 504)", openapi_extra=secured(CLAIMS_READ))
    async def get_request(request: Request, request_id: Annotated[Uuid, Path()]) -> JSONResponse:
        if refused := denied(request, service(request).authorizer, CLAIMS_READ):
            return refused
        decision = (await lookup(service(request).engine, [request_id])).get(request_id)
        if decision is None:
            return error(404, "request_not_found", "no decision on this request (yet)")
        return _answer(decision)

    @router.get("/v1/owners/{owner_type}/{owner_id}", response_model=OwnerDocument,
                responses={404: {"model": ErrorDocument}, 503: {"model": ErrorDocument}},
                summary="The claims of an owner in a cell, a page at a time (by bucket, then value)",
                openapi_extra=secured(CLAIMS_READ))
    async def get_owner(
        request: Request,
        owner_type: OwnerType,
        cell_id: Annotated[CellId, Query()],
        owner_id: Annotated[OwnerIdParam, Path()],
        limit: Annotated[int, Ge(1), Le(MAX_OWNER_PAGE), PARAM_INTEGER, Query(description="Claims per page")
                         ] = MAX_OWNER_PAGE,
        after: str | None = Query(None, max_length=300, description="next_after of the previous page",
                                  pattern="^(" + "|".join(ClaimBucket) + "):" + TEXT_PATTERN.removeprefix("^")),
    ) -> JSONResponse:
        if refused := denied(request, service(request).authorizer, CLAIMS_READ):
            return refused
        after_bucket, _, after_value = (after or "").partition(":")
        if "\x00" in after_value:  # the pattern checked the bucket; PostgreSQL text cannot hold a NUL
            return error(400, "bad_cursor", "after must be the next_after of a previous page")
        async with service(request).engine.connect() as conn:
            rows = (await conn.execute(
                text("SELECT bucket, value, status, lease_id, claimed_at FROM claims "
                     "WHERE cell_id = :cell AND owner_type = :type AND owner_id = :id "
                     "AND (CAST(:after_bucket AS text) IS NULL OR (bucket, value) > (:after_bucket, :after_value)) "
                     "ORDER BY bucket, value LIMIT :limit"),
                {"cell": cell_id, "type": owner_type.value, "id": owner_id, "limit": limit + 1,
                 "after_bucket": after_bucket if after is not None else None, "after_value": after_value},
            )).all()
        if not rows:
            return error(404, "owner_not_found", f"{owner_type.value} {owner_id} holds no claims in {cell_id}"
                         + (" after this cursor" if after is not None else ""))
        page = rows[:limit]
        document = OwnerDocument(cell_id=cell_id, owner_type=owner_type, owner_id=owner_id,
                                 claims=[OwnerClaim.model_validate(row._asdict()) for row in page],
                                 next_after=f"{page[-1].bucket}:{page[-1].value}" if len(rows) > limit else None)
        return JSONResponse(document.model_dump(mode="json"))

    return router


async def login_cell(service: ClaimsDoor, login: str) -> str | None:
    """The cell of a user, given their username or e-mail: the holder of the
    committed USERNAME or EMAIL claim (e-mails are compared as keyed hashes)."""
    candidates: list[tuple[str, str]] = []
    for bucket in (ClaimBucket.EMAIL, ClaimBucket.USERNAME) if "@" in login else (ClaimBucket.USERNAME,):
        try:
            candidates.append((bucket.value, stored_claim_value(bucket, login, service.settings.claim_secret)))
        except ValueError:
            continue
    if not candidates:
        return None
    async with service.engine.connect() as conn:
        row = (await conn.execute(
            text("SELECT c.cell_id FROM claims c JOIN unnest(CAST(:buckets AS text[]), CAST(:values AS text[])) "
                 "AS k(b, v) ON c.bucket = k.b AND c.value = k.v WHERE c.status = 'COMMITTED' LIMIT 1"),
            {"buckets": [b for b, _ in candidates], "values": [v for _, v in candidates]},
        )).first()
    return row.cell_id if row is not None else None

