"""``POST /v1/classify``: GitLab's Classify over REST, what GitLab's HTTP Router calls
(adr/0021; the router's side as read: docs/gitlab-contract.md).

The body is a ``ClassifyRequest`` and the answer a ``ClassifyResponse`` in protobuf's JSON
mapping (``google.protobuf.json_format``, the generated messages of ``schemas/generated/``:
lowerCamelCase names, enums by name, int64 as strings; both the proto names and the
lowerCamelCase names are read, and unknown fields are ignored, as GitLab's grpc-gateway
does). The decision is the gRPC door's own: :meth:`topology_store.service.gitlab_classify.Tables.classify`.
``GET /v1/classify`` (our document) stays as it was.

A refusal carries the read API's error document, with the HTTP status GitLab's
grpc-gateway gives its gRPC code (INVALID_ARGUMENT and FAILED_PRECONDITION 400, NOT_FOUND
404, UNAVAILABLE 503), except UNIMPLEMENTED (a claim kind not classified yet): 422, not
501, since the request, not the server, is what cannot be answered.

Caching: a CDN does not cache a POST, and GitLab's router caches classify answers itself,
in the Cloudflare cache, keyed on the request. An answer says how long it may be kept
(``Cache-Control: public, max-age=TOPOLOGY_CLASSIFY_MAX_AGE_S``) and which snapshot version
decided it (``X-Topology-Version``); a refusal is ``no-store``.
The bearer token (``snapshot:read``) is checked in front, by ``sync_middleware``.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from google.protobuf import json_format
from grpc import StatusCode
from pydantic import BaseModel, ConfigDict, Field

from topology_store.query_api.auth import refusals, secured
from topology_store.query_api.documents import ErrorDocument
from topology_store.query_api.errors import error_body
from topology_store.query_api.snapshot_api import RouterSync
from topology_store.schemas.generated.proto import classify_service_pb2
from topology_store.schemas.router_sync import JSON, SNAPSHOT_READ, VERSION_HEADER
from topology_store.service.gitlab_classify import CLAIM_KINDS, ClassifyType, Refusal, RoutingTables, Tables

# GitLab's grpc-gateway's status for each gRPC code a classification can end with.
HTTP_STATUS: dict[StatusCode, tuple[int, str]] = {
    StatusCode.INVALID_ARGUMENT: (400, "invalid_argument"),
    StatusCode.FAILED_PRECONDITION: (400, "failed_precondition"),
    StatusCode.NOT_FOUND: (404, "not_found"),
    StatusCode.UNIMPLEMENTED: (422, "not_served"),
    StatusCode.UNAVAILABLE: (503, "not_loaded"),
}
_TYPE_NAMES = frozenset(ClassifyType.keys())
_NO_STORE = (b"cache-control", b"no-store")
_JSON_TYPE = (b"content-type", JSON.encode())
_VERSION = VERSION_HEADER.lower().encode()


def parse_request(body: bytes) -> classify_service_pb2.ClassifyRequest:
    """The request body as a ``ClassifyRequest`` (protobuf's JSON parser), or an
    INVALID_ARGUMENT :class:`Refusal` saying what is wrong."""
    try:
        document = orjson.loads(body)  # depth-bounded; the parser below then reads it exactly
    except orjson.JSONDecodeError as exc:
        raise Refusal(StatusCode.INVALID_ARGUMENT, f"the body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise Refusal(StatusCode.INVALID_ARGUMENT,
                      "the body must be a JSON object: a ClassifyRequest in protobuf's JSON mapping")
    kind = document.get("type")
    # protobuf's parser would let an unknown enum name pass as UNSPECIFIED (unknown fields are
    # ignored) and read 1.5 as 1: name the mistake instead.
    if isinstance(kind, bool) or not isinstance(kind, str | int | None):
        raise Refusal(StatusCode.INVALID_ARGUMENT, f"type must be a classify type (its name, or its number), got {json.dumps(kind)[:64]}")
    if isinstance(kind, str) and kind not in _TYPE_NAMES:
        raise Refusal(StatusCode.INVALID_ARGUMENT,
                      f"unknown classify type {kind[:64]!r}: one of {', '.join(ClassifyType.keys())}")
    try:
        return json_format.Parse(body, classify_service_pb2.ClassifyRequest(), ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError, RecursionError) as exc:
        raise Refusal(StatusCode.INVALID_ARGUMENT, f"not a ClassifyRequest: {str(exc)[:300]}") from None


def response_json(response: classify_service_pb2.ClassifyResponse) -> bytes:
    """The answer in protobuf's JSON mapping, every field written as grpc-gateway's default
    marshaler writes it (``EmitUnpopulated``): scalars at their default, an unset message
    field as ``null`` (``"matchedClaim": null`` when no claim answered)."""
    document = json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
    for field in response.DESCRIPTOR.fields:
        if field.message_type is not None and not field.is_repeated and field.containing_oneof is None:
            document.setdefault(field.json_name, None)
    return orjson.dumps(document)


class _SnapshotOf:
    """The snapshot the read API holds (none before its lifespan starts it)."""

    def __init__(self, sync: RouterSync) -> None:
        self._sync = sync

    @property
    def current(self) -> RoutingTables | None:
        return self._sync.cache.current if self._sync.cache is not None else None


# -- the OpenAPI document: protobuf's JSON mapping of the two messages -----------------------

def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}  # protobuf's JSON mapping reads null as the default


_INT64 = {"anyOf": [{"type": "string", "pattern": r"^-?[0-9]{1,19}$"}, {"type": "integer"}],
          "description": "int64: a decimal string (as written) or a number"}
_INT64_KINDS = {"project_id", "namespace_id", "user_id", "organization_id", "snippet_id"}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


class GitLabProxyInfo(BaseModel):
    address: str = Field(description="The cell's host:port (its URL's host, and the port it names or its scheme's)")


class GitLabClaim(BaseModel):
    """``gitlab.cells.topology_service.types.v1.Claim``: one of its kinds. Answered: ``route``."""

    model_config = ConfigDict(extra="allow")
    route: str | None = Field(None, description="The top-level namespace that matched (GitLab sends a full path)")


class GitLabClassifyResponse(BaseModel):
    """``gitlab.cells.topology_service.ClassifyResponse`` in protobuf's JSON mapping."""

    action: str = Field(description="PROXY: send the request to proxy.address",
                        json_schema_extra={"enum": ["ACTION_UNSPECIFIED", "PROXY"]})
    proxy: GitLabProxyInfo
    matchedClaim: GitLabClaim | None = Field(description="With claims: the claim that answered; else null")


CLASSIFY_REQUEST_SCHEMA: dict[str, Any] = {
    "title": "ClassifyRequest",
    "description": "gitlab.cells.topology_service.ClassifyRequest in protobuf's JSON mapping: lowerCamelCase or "
    "the proto's snake_case names, enums by name (or number), int64 as a string or a number, null for a default; "
    "unknown fields are ignored. Either a type (FIRST_CELL; SESSION_PREFIX or CELL_ID with a value) or claims.",
    "type": "object",
    "properties": {
        "type": _nullable({"anyOf": [{"type": "string", "enum": list(ClassifyType.keys())},
                                     {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}]}),
        "value": _nullable({"type": "string", "description": "SESSION_PREFIX: the session value (its prefix names "
                            "the cell); CELL_ID: GitLab's numeric cell id in decimal; FIRST_CELL: ignored"}),
        "claims": _nullable({"type": "array", "items": {
            "type": "object", "maxProperties": 1,
            "description": "types.v1.Claim: one kind (route is classified; other kinds: 422 not_served)",
            "properties": {_camel(kind): _nullable(_INT64 if kind in _INT64_KINDS else {"type": "string"})
                           for kind in CLAIM_KINDS},
        }}),
    },
}


def gitlab_router(sync: RouterSync) -> APIRouter:
    router = APIRouter()
    tables = Tables(_SnapshotOf(sync), sync.settings.grpc_cell_numbers)
    max_age = sync.settings.classify_max_age_s
    cache_control = (b"cache-control", b"public, max-age=%d" % max_age if max_age else b"no-cache")

    @router.post(
        "/v1/classify",
        response_model=GitLabClassifyResponse,
        responses={
            200: {"description": "The cell that serves the request. Headers: Cache-Control: public, max-age="
                  "TOPOLOGY_CLASSIFY_MAX_AGE_S (no-cache when 0), X-Topology-Version (the snapshot version that "
                  "decided)"},
            400: {"model": ErrorDocument, "description": "Not JSON, not a ClassifyRequest, an unknown type, a "
                  "missing or malformed value (invalid_argument); an ambiguous cell id (failed_precondition)"},
            404: {"model": ErrorDocument, "description": "No cell has this session prefix, cell id or route"},
            422: {"model": ErrorDocument, "description": "A claim kind not classified yet (not_served; GitLab "
                  "answers 501)"},
            503: {"model": ErrorDocument, "description": "No snapshot loaded yet (Retry-After)"},
            **refusals(SNAPSHOT_READ),
        },
        summary="GitLab's Classify (its HTTP Router's call): which cell serves a request, in protobuf's JSON mapping",
        openapi_extra={
            **secured(SNAPSHOT_READ),
            "requestBody": {"required": True, "content": {"application/json": {"schema": CLASSIFY_REQUEST_SCHEMA}}},
        },
    )
    async def post_classify(request: Request) -> Response:
        try:
            message = parse_request(await request.body())
            answer, snapshot = tables.classify_at(message)
        except Refusal as refusal:
            status, code = HTTP_STATUS.get(refusal.code, (400, "invalid_argument"))
            headers = [_JSON_TYPE, _NO_STORE, *([(b"retry-after", b"1")] if status == 503 else [])]
            response = Response(orjson.dumps(error_body(code, refusal.message)), status)
            response.raw_headers = headers + [(b"content-length", str(len(response.body)).encode())]
            return response
        body = response_json(answer)
        response = Response(body, 200)
        response.raw_headers = [
            _JSON_TYPE, cache_control, (_VERSION, str(snapshot.version).encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        return response

    return router
