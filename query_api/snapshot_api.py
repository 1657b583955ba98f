"""``GET /v1/snapshot`` and ``GET /v1/classify``: the routing data edge routers keep in
sync (the router sync protocol, adr/0009; its wire details are ``schemas/router_sync.py``).

One framework-free object answers the snapshot, :class:`SnapshotEndpoint`: raw header
values in, an :class:`Answer` (status, raw headers, body) out. Three entries reach it
and differ only in cost: uvicorn's protocol for the plain 304 revalidation
(``query_api/uvicorn_fast_path.py``), plain ASGI for every other request
(``query_api/sync_middleware.py``), and the FastAPI route, which documents it
(OpenAPI) and serves it when the app runs without that middleware.
:meth:`SnapshotEndpoint.revalidate` alone decides between a 304 and a
representation, and :func:`version_headers` alone states an answer's version.
Entity tags name a representation, not only a version (``"7-json"``,
``W/"7-msgpack+zstd"``, a delta's ``"7-since-5-json"``: ``schemas/router_sync.py``);
a 304 carries the tag of the representation the request negotiated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.query_api.auth import Authorizer, refusals, secured
from topology_store.query_api.claims_api import login_cell
from topology_store.query_api.contract import TEXT_PATTERN, VersionParam, parse_version
from topology_store.query_api.documents import (
    ClassifyDocument,
    DeltaDocument,
    ErrorDocument,
    GoneDocument,
    SnapshotDocument,
    any_case_pattern,
)
from topology_store.query_api.encodings import Compression
from topology_store.query_api.errors import control_character_answer, error_body, query_control_character
from topology_store.query_api.metrics import ApiMetrics
from topology_store.query_api.snapshot import DeltaCache, Snapshot, SnapshotCache
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import MAX_BIGINT
from topology_store.schemas.router_sync import (
    AGE_HEADER,
    CLASSIFY_TYPES,
    JSON,
    SNAPSHOT_READ,
    VERSION_HEADER,
    WAIT_PATTERN,
    choose_encoding,
    choose_format,
    classify_in,
    etag_versions,
    parse_wait,
)

Headers = list[tuple[bytes, bytes]]

_VERSION = VERSION_HEADER.lower().encode()
_AGE = AGE_HEADER.lower().encode()
_NO_CACHE = (b"cache-control", b"no-cache")
_VARY = (b"vary", b"Accept, Accept-Encoding")  # the snapshot is negotiated on both
_JSON_TYPE = (b"content-type", JSON.encode())


@dataclass(slots=True)  # not frozen: that would cost four times as much to build, on every revalidation
class Answer:
    """An HTTP answer without a framework: what uvicorn's protocol, ASGI and FastAPI each send."""

    status: int
    headers: Headers
    body: bytes = b""

    @classmethod
    def json(cls, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> Answer:
        return cls(status, [_JSON_TYPE, (b"content-length", str(len(body)).encode()), *headers], body)


def error_answer(status: int, code: str, message: str, headers: Iterable[tuple[bytes, bytes]] = (),
                 **extra: Any) -> Answer:
    """The error document (``errors.error_body``) as an :class:`Answer`."""
    return Answer.json(status, orjson.dumps(error_body(code, message, **extra)), headers)


def starlette_response(answer: Answer) -> Response:
    """The :class:`Answer` as a Starlette response, its headers as they are."""
    response = Response(answer.body, answer.status)
    response.raw_headers = answer.headers
    return response


@lru_cache(maxsize=64)
def _fixed_headers(version: int, etag: str | None, vary: bool) -> tuple[tuple[bytes, bytes], ...]:
    """All but the age, which changes with every answer: built once per version and tag."""
    return (
        (_VERSION, str(version).encode()),
        _NO_CACHE,
        *((_VARY,) if vary else ()),
        *(((b"etag", etag.encode()),) if etag is not None else ()),
    )


def version_headers(snapshot: Snapshot, *, etag: str | None = None, vary: bool = False) -> Headers:
    """The version an answer comes from (X-Topology-Version), its age
    (X-Topology-Age-Seconds), Cache-Control: no-cache, the entity tag of the
    representation sent when there is one, and with ``vary`` the request headers the
    representation was negotiated on."""
    fixed = _fixed_headers(snapshot.version, etag, vary)
    return [(_AGE, b"%.3f" % snapshot.age_seconds()), *fixed]  # bytes formatting: half an f-string's cost


class SnapshotEndpoint:
    """``GET /v1/snapshot`` with ``since``, ``wait``, ``min_version``, If-None-Match,
    Accept and Accept-Encoding."""

    def __init__(self, cache: SnapshotCache, deltas: DeltaCache, max_wait_s: float, metrics: ApiMetrics) -> None:
        self.cache = cache
        self.deltas = deltas
        self.max_wait_s = max_wait_s
        self.metrics = metrics

    def revalidate(self, snapshot: Snapshot, known: int | None, held: int | None, fmt: str = JSON,
                   encoding: str = "identity") -> Answer | None:
        """The 304 when the client already has ``snapshot``'s version or a newer one
        (``known``); None when it needs a representation. A process behind the client
        (a lagging replica) never hands out the older version: it answers 304 with its
        own version, and the ETag only when that is the version the client holds
        (``held``): the tag of the full snapshot in the negotiated ``fmt`` and ``encoding``
        (RFC 9110 §15.4.5: the ETag a 200 would have carried)."""
        if known is None or snapshot.version > known:
            return None
        etag = snapshot.etag(fmt, encoding) if snapshot.version == held else None
        return Answer(304, version_headers(snapshot, etag=etag, vary=True))

    def revalidate_current(self, if_none_match: bytes, accept: bytes = b"",
                           accept_encoding: bytes = b"") -> Answer | None:
        """:meth:`revalidate` for the request a fleet repeats, ``If-None-Match: "V..."`` and
        no query, against the current snapshot; None when it needs :meth:`handle`."""
        snapshot = self.cache.current
        if snapshot is None:
            return None
        fmt = choose_format(accept.decode("latin-1"))
        if fmt is None:
            return None  # 406: the full path says so
        match_all, held = etag_versions(if_none_match.decode("latin-1"))
        if match_all:
            return None
        return self.revalidate(snapshot, held, held, fmt, choose_encoding(accept_encoding.decode("latin-1")))

    async def handle(self, query: bytes, if_none_match: str, accept: str, accept_encoding: str) -> Answer:
        since: int | None = None
        min_version: int | None = None
        wait_s = 0.0
        if query:
            if (where := query_control_character(query)) is not None:
                return Answer.json(400, orjson.dumps(control_character_answer(where)))
            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                try:
                    if name == "since":
                        since = parse_version(value)
                    elif name == "min_version":
                        min_version = parse_version(value)
                    elif name == "wait":
                        wait_s = min(parse_wait(value), self.max_wait_s)
                except ValueError:
                    hint = "30s, 500ms, 1m or 30" if name == "wait" else f"an integer from 0 to {MAX_BIGINT}"
                    return error_answer(400, "bad_parameter", f"{name} must be {hint}")
        fmt = choose_format(accept)
        if fmt is None:
            return error_answer(406, "not_acceptable", "this resource is application/json or application/msgpack")
        encoding = choose_encoding(accept_encoding)

        # The newest version the client already holds (None: it holds nothing).
        known: int | None = None
        if since is not None:
            known = since
        elif if_none_match:
            match_all, highest = etag_versions(if_none_match)
            if match_all:
                current = self.cache.current
                known = current.version if current is not None else None
            else:
                known = highest
        held = known  # the version the client says it holds
        if min_version is not None:
            # "Send me version min_version or newer": as if the client held min_version - 1.
            known = max(known if known is not None else -1, min_version - 1)

        snapshot = self.cache.current
        if wait_s > 0 and (snapshot is None or (known is not None and snapshot.version <= known)):
            self.metrics.long_polls_waiting.inc()
            try:
                snapshot = await self.cache.wait_newer(known if known is not None else -1, wait_s)
            finally:
                self.metrics.long_polls_waiting.dec()
        if snapshot is None:
            return error_answer(503, "not_loaded", "no snapshot loaded yet", headers=[(b"retry-after", b"1")])
        not_modified = self.revalidate(snapshot, known, held, fmt, encoding)
        if not_modified is not None:
            return not_modified
        return await self.represent(snapshot, since, fmt, encoding)

    async def represent(self, snapshot: Snapshot, since: int | None, fmt: str, encoding: str) -> Answer:
        """The full snapshot, or the delta from ``since`` (410 when the change log no
        longer goes back that far), in ``fmt`` and, when worth it, ``encoding``."""
        if since is not None:
            delta = await self.deltas.get(since, snapshot)
            if delta is None:
                floor = await self.deltas.floor()
                return error_answer(
                    410,
                    "delta_unavailable",
                    f"the change log no longer holds the changes from version {since} to {snapshot.version} "
                    f"(deltas start at version {floor} or later): fetch the full snapshot without since",
                    headers=version_headers(snapshot, vary=True),  # an error: no entity tag
                    oldest_since=floor,
                    version=snapshot.version,
                )
            representations = delta.representations
            etag = delta.etag(fmt, encoding)
        else:
            representations = snapshot.representations
            etag = snapshot.etag(fmt, encoding)
        cached = representations.cached(fmt, encoding)
        body, used = cached if cached is not None else await representations.get(fmt, encoding)
        headers = version_headers(snapshot, etag=etag, vary=True)
        headers.append((b"content-type", fmt.encode()))
        headers.append((b"content-length", str(len(body)).encode()))
        if used != "identity":
            headers.append((b"content-encoding", used.encode()))
        return Answer(200, headers, body)


def classify(snapshot: Snapshot, kind: str, value: str) -> tuple[int, dict[str, Any]]:
    """(status, document) for ``GET /v1/classify``."""
    return classify_in(snapshot.version, snapshot.namespaces, snapshot.cells_by_id, kind, value)


class RouterSync:
    """The per-process state of the protocol, built with the app; ``start`` runs in its lifespan."""

    def __init__(self, settings: Settings, metrics: ApiMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.authorizer = Authorizer.from_settings(settings)
        self.compression = Compression(settings.snapshot_gzip_level, settings.snapshot_zstd_level)
        self.endpoint: SnapshotEndpoint | None = None
        self.cache: SnapshotCache | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, engine: AsyncEngine) -> SnapshotCache:
        self._loop = asyncio.get_running_loop()
        deltas = DeltaCache(engine, self.compression, self.metrics.observe_encoding, metrics=self.metrics)
        self.cache = SnapshotCache(
            engine,
            self.settings.libpq_url,
            self.settings.snapshot_poll_interval_s,
            on_loaded=self.metrics.observe_snapshot,
            compression=self.compression,
            observe=self.metrics.observe_encoding,
            on_delta=deltas.put,
        )
        self.endpoint = SnapshotEndpoint(self.cache, deltas, self.settings.api_max_wait_s, self.metrics)
        return self.cache

    async def answer(self, query: bytes, if_none_match: str, accept: str, accept_encoding: str) -> Answer:
        """``GET /v1/snapshot``, also before the lifespan started the endpoint."""
        if self.endpoint is None:
            return error_answer(503, "not_loaded", "starting up")
        return await self.endpoint.handle(query, if_none_match, accept, accept_encoding)

    def close_soon(self) -> None:
        """Release long-polls (from a signal handler: thread-safe)."""
        if self._loop is not None and self.cache is not None:
            self._loop.call_soon_threadsafe(self.cache.close)


def snapshot_router(sync: RouterSync) -> APIRouter:
    """The routes; ``sync_middleware.RouterSyncMiddleware`` checks their token first."""
    router = APIRouter()

    @router.get(
        "/v1/snapshot",
        response_model=SnapshotDocument | DeltaDocument,
        responses={
            200: {
                "description": "The full snapshot (no since), or the delta from since (DeltaDocument). "
                "Headers: X-Topology-Version (the version), ETag (the representation: \"7-json\", "
                "W/\"7-msgpack+zstd\" (weak when compressed), a delta's \"7-since-5-json\"; "
                "If-None-Match reads any tag by its leading version), Vary: Accept, Accept-Encoding, "
                "X-Topology-Age-Seconds (since the projector last committed, as this process knows it). "
                "Content-Encoding zstd or gzip when Accept-Encoding allows it; application/msgpack when "
                "Accept prefers it.",
                "content": {"application/msgpack": {}},
            },
            304: {"description": "Nothing newer than the client's version (since, If-None-Match or "
                  "min_version - 1), also when this process is behind the client: it never hands out an "
                  "older version"},
            400: {"model": ErrorDocument},
            406: {"model": ErrorDocument},
            410: {"model": GoneDocument, "description": "The change log no longer goes back to since: "
                  "fetch the full snapshot"},
            503: {"model": ErrorDocument},
            **refusals(SNAPSHOT_READ),
        },
        summary="Routing tables at one version: full snapshot, or delta since a version; long-poll with wait",
        openapi_extra=secured(SNAPSHOT_READ),
    )
    async def get_snapshot(
        request: Request,
        since: Annotated[VersionParam | None, Query(description="Answer the changes from this version (a delta)")] = None,
        wait: str | None = Query(None, pattern=WAIT_PATTERN,
                                 description="Long-poll: hold the request up to this long (30s, 500ms; "
                                 "bounded by TOPOLOGY_API_MAX_WAIT_S) until a version newer than the "
                                 "client's exists"),
        min_version: Annotated[VersionParam | None, Query(description="Full snapshot at this version or newer "
                                                          "(never an older one)")] = None,
    ) -> Response:
        answer = await sync.answer(
            request.scope["query_string"], request.headers.get("if-none-match", ""),
            request.headers.get("accept", ""), request.headers.get("accept-encoding", ""),
        )
        return starlette_response(answer)

    @router.get(
        "/v1/classify",
        response_model=ClassifyDocument,
        responses={400: {"model": ErrorDocument}, 404: {"model": ErrorDocument}, 503: {"model": ErrorDocument},
                   **refusals(SNAPSHOT_READ)},
        summary="Which cell serves this request: ROUTE (a path; its top-level namespace), SESSION_PREFIX, CELL_ID, "
        "LOGIN (a username or e-mail)",
        openapi_extra=secured(SNAPSHOT_READ),
    )
    async def get_classify(
        request: Request,
        type: str = Query(..., description="ROUTE, SESSION_PREFIX, CELL_ID or LOGIN (any case)",
                          json_schema_extra={"pattern": any_case_pattern((*CLASSIFY_TYPES, "LOGIN"))}),
        value: str = Query(..., description="e.g. gitlab-org/gitlab for a ROUTE, a username or e-mail for a LOGIN",
                           json_schema_extra={"pattern": TEXT_PATTERN}),
    ) -> Response:
        if not type.isascii() or type.upper() not in (*CLASSIFY_TYPES, "LOGIN"):  # "ı".upper() == "I"
            return starlette_response(error_answer(
                400, "bad_type", f"type must be one of {', '.join(CLASSIFY_TYPES)} or LOGIN (any case)"))
        snapshot = sync.cache.current if sync.cache is not None else None
        if snapshot is None:
            return starlette_response(error_answer(503, "not_loaded", "no snapshot loaded yet"))
        if type.upper() == "LOGIN":
            # Usernames and e-mails are not in the routers' snapshot; the claims table answers.
            cell_id = await login_cell(request.app.state.claims, value)
            if cell_id is None:
                status, document = 404, error_body("not_found", "no cell holds this login")
            else:
                status, document = classify(snapshot, "CELL_ID", cell_id)
                if status == 200:
                    document = {**document, "type": "LOGIN", "value": value, "key": cell_id}
        else:
            status, document = classify(snapshot, type, value)
        # With the snapshot's Vary, as this answer has always had.
        return starlette_response(Answer.json(status, orjson.dumps(document), version_headers(snapshot, vary=True)))

    return router
