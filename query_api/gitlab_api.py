"""``POST /v1/classify``: GitLab's Classify over REST, what GitLab's HTTP Router calls
(adr/0021; the router's side as read: docs/gitlab-contract.md).

The body is a ``ClassifyRequest`` and the answer a ``ClassifyResponse`` in protobuf's JSON
mapping (``google.protobuf.json_format``, the generated messages of ``schemas/generated/``:
lowerCamelCase names, enums by name, int64 as strings; both the proto names and the
lowerCamelCase names are read, and unknown fields are ignored, as GitLab's grpc-gateway
does). The decision is the gRPC door's own: :meth:`topology_store.service.gitlab_classify.Tables.classify`.
``GET /v1/classify`` (our document) stays as it was.

A refusal carries the read API's error document, with the HTTP status GitLab's
grpc-gateway gives its gRPC code (INVALID_ARGUMENT 400, NOT_FOUND 404, UNAVAILABLE 503),
except two whose cause is not the request's form: UNIMPLEMENTED (a claim kind other than a
route, which only the gRPC door looks up, adr/0022) is 400 ``not_served``, not 501 (the server
is not failing), and
FAILED_PRECONDITION (a cell id two cells end with) 409, not 400. The OpenAPI document states
exactly the requests that are answered (``CLASSIFY_REQUEST_SCHEMA``).

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
from pydantic import BaseModel, Field

from topology_store.query_api.auth import refusals, secured
from topology_store.query_api.documents import ErrorDocument
from topology_store.query_api.errors import error_body
from topology_store.query_api.snapshot_api import RouterSync
from topology_store.schemas.generated.proto import classify_service_pb2
from topology_store.schemas.generated.proto.types.v1 import claim_pb2
from topology_store.schemas.router_sync import JSON, SNAPSHOT_READ, VERSION_HEADER
from topology_store.service.gitlab_classify import MAX_VALUE_CHARS, ClassifyType, Refusal, RoutingTables, Tables

# The HTTP status of each gRPC code a classification can end with: grpc-gateway's, but for two (module docstring).
HTTP_STATUS: dict[StatusCode, tuple[int, str]] = {
    StatusCode.INVALID_ARGUMENT: (400, "invalid_argument"),
    StatusCode.FAILED_PRECONDITION: (409, "failed_precondition"),
    StatusCode.NOT_FOUND: (404, "not_found"),
    StatusCode.UNIMPLEMENTED: (400, "not_served"),
    StatusCode.UNAVAILABLE: (503, "not_loaded"),
}
_TYPE_NAMES = frozenset(ClassifyType.keys())
# Both spellings protobuf's parser reads: the proto's names and lowerCamelCase.
_REQUEST_FIELDS = frozenset(name for field in classify_service_pb2.ClassifyRequest.DESCRIPTOR.fields
                            for name in (field.name, field.json_name))
_CLAIM_FIELDS = frozenset(name for field in claim_pb2.Claim.DESCRIPTOR.fields for name in (field.name, field.json_name))
_NO_STORE = (b"cache-control", b"no-store")
_JSON_TYPE = (b"content-type", JSON.encode())
_VERSION = VERSION_HEADER.lower().encode()


def _known(document: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """``document`` without the fields the message does not have: ignored, as grpc-gateway's
    ``DiscardUnknown`` ignores them (``[name]`` keys included, which protobuf's parser would
    read as extensions)."""
    return {name: value for name, value in document.items() if name in names}


def parse_request(body: bytes) -> classify_service_pb2.ClassifyRequest:
    """The request body as a ``ClassifyRequest`` (protobuf's JSON parser over the known
    fields), or an INVALID_ARGUMENT :class:`Refusal` saying what is wrong."""
    try:
        document = orjson.loads(body)  # depth-bounded
    except orjson.JSONDecodeError as exc:
        raise Refusal(StatusCode.INVALID_ARGUMENT, f"the body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise Refusal(StatusCode.INVALID_ARGUMENT,
                      "the body must be a JSON object: a ClassifyRequest in protobuf's JSON mapping")
    document = _known(document, _REQUEST_FIELDS)
    kind = document.get("type")
    # protobuf's parser would read 1.5 as 1, and true as a number: name the mistake instead.
    if isinstance(kind, bool) or not isinstance(kind, str | int | float | None) or (
            isinstance(kind, float) and not kind.is_integer()):
        raise Refusal(StatusCode.INVALID_ARGUMENT,
                      f"type must be a classify type (its name, or its number), got {json.dumps(kind)[:64]}")
    if isinstance(kind, str) and kind not in _TYPE_NAMES:
        raise Refusal(StatusCode.INVALID_ARGUMENT,
                      f"unknown classify type {kind[:64]!r}: one of {', '.join(ClassifyType.keys())}")
    claims = document.get("claims")
    if isinstance(claims, list):
        document["claims"] = [_known(claim, _CLAIM_FIELDS) if isinstance(claim, dict) else claim for claim in claims]
    try:
        return json_format.ParseDict(document, classify_service_pb2.ClassifyRequest())
    except (json_format.ParseError, RecursionError) as exc:
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


# -- the OpenAPI document: exactly the requests this store answers ---------------------------
# Four shapes, by type: FIRST_CELL; SESSION_PREFIX and CELL_ID with their value; claims (route
# claims: the kind this store classifies by). Any other field is ignored, so allowed.

# str.strip()'s whitespace (str.isspace), spelled out: what \s means differs between regex
# engines (Python's takes U+001C..U+001F, ECMAScript's and Rust's do not), and the server strips these.
_SPACE = r"[\t\n\u000b\u000c\r\u001c-\u001f \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_NOT_SPACE = "[^" + _SPACE[1:]
_NONE: dict[str, Any] = {"type": "null"}
_NO_CLAIMS = {"anyOf": [_NONE, {"type": "array", "maxItems": 0}], "description": "absent, null or []"}
_VALUE = {"type": "string", "maxLength": MAX_VALUE_CHARS}


def _typed(names: tuple[str, ...], numbers: tuple[int, ...]) -> dict[str, Any]:
    return {"enum": [*names, *numbers]}


def _shape(title: str, kind: dict[str, Any], value: dict[str, Any], claims: dict[str, Any],
           required: tuple[str, ...]) -> dict[str, Any]:
    return {"title": title, "type": "object", "required": list(required),
            "properties": {"type": kind, "value": value, "claims": claims}}


_ROUTE_CLAIM = {
    "type": "object", "required": ["route"],
    "description": "types.v1.Claim with its route (a path: its top-level namespace answers). Other claim kinds "
    "are GitLab's too, answered over gRPC only (by their committed claim, adr/0022); here 400 not_served",
    "properties": {"route": {**_VALUE, "pattern": rf"^(?!{_SPACE}*$)(?!/*$)",
                             "description": "A path with a segment (not only slashes or whitespace)"}},
    "propertyNames": {"not": {"enum": sorted(_CLAIM_FIELDS - {"route"})}},
}

CLASSIFY_REQUEST_SCHEMA: dict[str, Any] = {
    "title": "ClassifyRequest",
    "description": "gitlab.cells.topology_service.ClassifyRequest in protobuf's JSON mapping: lowerCamelCase or "
    "the proto's snake_case names, enums by name or number, null for a field's default; unknown fields are "
    "ignored. Either a type (FIRST_CELL; SESSION_PREFIX or CELL_ID with a value) or route claims.",
    "type": "object",
    "anyOf": [
        _shape("FirstCell", _typed(("FIRST_CELL",), (1,)), {"anyOf": [{"type": "string"}, _NONE],
               "description": "ignored"}, _NO_CLAIMS, ("type",)),
        _shape("SessionPrefix", _typed(("SESSION_PREFIX",), (2,)), {
            **_VALUE, "pattern": _NOT_SPACE, "description": "The session value (its prefix names the cell)"},
            _NO_CLAIMS, ("type", "value")),
        _shape("CellId", _typed(("CELL_ID",), (3,)), {
            **_VALUE, "pattern": rf"^{_SPACE}*0*[1-9][0-9]{{0,17}}{_SPACE}*$",
            "description": "GitLab's numeric cell id, in decimal (an int64 above 0)"}, _NO_CLAIMS, ("type", "value")),
        _shape("Claims", {"enum": ["UNSPECIFIED", 0, None]}, {"enum": ["", None], "description": "empty"},
               {"type": "array", "minItems": 1, "items": _ROUTE_CLAIM,
                "description": "The first claim that matches answers, as matchedClaim"}, ("claims",)),
    ],
}


class GitLabProxyInfo(BaseModel):
    address: str = Field(description="The cell's host:port (its URL's host, and the port it names or its scheme's)")


class GitLabClaim(BaseModel):
    """``gitlab.cells.topology_service.types.v1.Claim``: the claim that answered."""

    route: str = Field(description="The top-level namespace that matched (the request's path starts with it)")


class GitLabClassifyResponse(BaseModel):
    """``gitlab.cells.topology_service.ClassifyResponse`` in protobuf's JSON mapping."""

    action: str = Field(description="PROXY: send the request to proxy.address",
                        json_schema_extra={"enum": ["PROXY"]})
    proxy: GitLabProxyInfo
    matchedClaim: GitLabClaim | None = Field(description="With claims: the claim that answered; else null")


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
                  "missing or malformed value (invalid_argument); a claim kind not classified yet (not_served; "
                  "GitLab answers 501 UNIMPLEMENTED)"},
            404: {"model": ErrorDocument, "description": "No cell has this session prefix, cell id or route"},
            409: {"model": ErrorDocument, "description": "Two cells claim this cell id (failed_precondition: "
                  "record each cell's number, adr/0021, or name it in TOPOLOGY_GRPC_CELL_IDS)"},
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
