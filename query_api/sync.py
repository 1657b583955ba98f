"""The router sync protocol over HTTP (adr/0009): full snapshots, deltas, long-poll,
content negotiation, bearer tokens, and point classification.

``RouterSyncMiddleware`` is plain ASGI in front of FastAPI: it checks the bearer
token of every routing-data request and answers ``GET /v1/snapshot`` itself,
without FastAPI's routing and validation, because that is the request a fleet of
routers repeats (a revalidation costs a header scan, a token hash and a few
comparisons). FastAPI still documents the route (OpenAPI) and serves it through
the same :class:`SnapshotEndpoint` when called without the middleware. The
cheapest case, a 304 revalidation, is answered even earlier, in uvicorn's
protocol (``query_api.fast_protocol``, via :meth:`RouterSync.revalidation_response`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, FastAPI, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.query_api.auth import Authorizer
from topology_store.query_api.claims_api import login_cell
from topology_store.query_api.encodings import Compression, Observer
from topology_store.query_api.metrics import ApiMetrics
from topology_store.query_api.models import (
    ClassifyDocument,
    DeltaDocument,
    ErrorDocument,
    GoneDocument,
    SnapshotDocument,
    any_case_pattern,
)
from topology_store.query_api.snapshot import (
    Delta,
    Snapshot,
    SnapshotCache,
    read_changes,
    read_floor,
    read_only_connection,
)
from topology_store.runtime.settings import Settings
from topology_store.schemas.router_sync import (
    AGE_HEADER,
    CLASSIFY_TYPES,
    SNAPSHOT_READ,
    VERSION_HEADER,
    WAIT_PATTERN,
    choose_encoding,
    choose_format,
    classify_in,
    etag_versions,
    parse_wait,
)

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_VERSION = VERSION_HEADER.lower().encode()
_AGE = AGE_HEADER.lower().encode()
_VARY = (b"vary", b"Accept, Accept-Encoding")
_NO_CACHE = (b"cache-control", b"no-cache")
_JSON_TYPE = (b"content-type", b"application/json")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Headers
    body: bytes = b""


@lru_cache(maxsize=4)
def _static_headers(version: int) -> tuple[tuple[bytes, bytes], ...]:
    return ((_VERSION, str(version).encode()), _NO_CACHE, _VARY)


def error_answer(status: int, code: str, message: str, extra: dict[str, Any] | None = None,
                 headers: Headers | None = None) -> Answer:
    body = orjson.dumps({"error": {"code": code, "message": message, **(extra or {})}})
    return Answer(status, [_JSON_TYPE, (b"content-length", str(len(body)).encode()), *(headers or [])], body)


class DeltaCache:
    """Deltas by (since, version): computed once from the change log (concurrent
    requests for the same pair share one query), kept in a small LRU. The
    refresh hands in the delta from the previous version, which is the one every
    up-to-date long-polling router asks for next."""

    def __init__(self, engine: AsyncEngine, compression: Compression, observe: Observer | None,
                 max_entries: int = 256, metrics: ApiMetrics | None = None) -> None:
        self._engine = engine
        self._compression = compression
        self._observe = observe
        self._max_entries = max_entries
        self._metrics = metrics
        self._entries: OrderedDict[tuple[int, int], Delta] = OrderedDict()
        self._pending: dict[tuple[int, int], asyncio.Task[Delta | None]] = {}

    def put(self, delta: Delta) -> None:
        self._entries[(delta.since, delta.version)] = delta
        self._entries.move_to_end((delta.since, delta.version))
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def get(self, since: int, target: Snapshot) -> Delta | None:
        """The delta from ``since`` to ``target``; None when the change log no longer covers it."""
        key = (since, target.version)
        delta = self._entries.get(key)
        if delta is not None:
            self._entries.move_to_end(key)
            if self._metrics is not None:
                self._metrics.deltas.labels("cached").inc()
            return delta
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._compute(since, target))
            self._pending[key] = task
        return await asyncio.shield(task)

    async def _compute(self, since: int, target: Snapshot) -> Delta | None:
        key = (since, target.version)
        try:
            conn = await read_only_connection(self._engine)
            try:
                async with conn.begin():
                    changes = await read_changes(conn, since, target.version)
            finally:
                await conn.close()
            if changes is None:
                if self._metrics is not None:
                    self._metrics.deltas.labels("gone").inc()
                return None
            delta = Delta(since, target, changes, self._compression, self._observe)
            self.put(delta)
            if self._metrics is not None:
                self._metrics.deltas.labels("computed").inc()
            return delta
        finally:
            self._pending.pop(key, None)

    async def floor(self) -> int:
        conn = await read_only_connection(self._engine)
        try:
            async with conn.begin():
                return await read_floor(conn)
        finally:
            await conn.close()


class SnapshotEndpoint:
    """``GET /v1/snapshot`` with ``since``, ``wait``, ``min_version``, If-None-Match,
    Accept and Accept-Encoding."""

    def __init__(self, cache: SnapshotCache, deltas: DeltaCache, max_wait_s: float, metrics: ApiMetrics) -> None:
        self.cache = cache
        self.deltas = deltas
        self.max_wait_s = max_wait_s
        self.metrics = metrics

    def version_headers(self, snapshot: Snapshot, etag: bool = True) -> Headers:
        headers = [(_AGE, f"{snapshot.age_seconds():.3f}".encode()), *_static_headers(snapshot.version)]
        if etag:
            headers.append((b"etag", snapshot.etag.encode()))
        return headers

    async def handle(self, query: bytes, if_none_match: str, accept: str, accept_encoding: str) -> Answer:
        since: int | None = None
        min_version: int | None = None
        wait_s = 0.0
        if query:
            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                try:
                    if name == "since":
                        since = int(value)
                        if since < 0:
                            raise ValueError
                    elif name == "min_version":
                        min_version = int(value)
                        if min_version < 0:
                            raise ValueError
                    elif name == "wait":
                        wait_s = min(parse_wait(value), self.max_wait_s)
                except ValueError:
                    hint = "30s, 500ms, 1m or 30" if name == "wait" else "a non-negative integer"
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
        if known is not None and snapshot.version <= known:
            # Nothing newer here. A process behind the client (a lagging replica)
            # never hands out the older version: 304, with its own version stated.
            return Answer(304, self.version_headers(snapshot, etag=snapshot.version == held))

        if since is not None:
            delta = await self.deltas.get(since, snapshot)
            if delta is None:
                floor = await self.deltas.floor()
                return error_answer(
                    410,
                    "delta_unavailable",
                    f"the change log no longer holds the changes from version {since} to {snapshot.version} "
                    f"(deltas start at version {floor} or later): fetch the full snapshot without since",
                    {"oldest_since": floor, "version": snapshot.version},
                    headers=self.version_headers(snapshot),
                )
            representations = delta.representations
        else:
            representations = snapshot.representations
        cached = representations.cached(fmt, encoding)
        body, used = cached if cached is not None else await representations.get(fmt, encoding)
        headers = self.version_headers(snapshot)
        headers.append((b"content-type", fmt.encode()))
        headers.append((b"content-length", str(len(body)).encode()))
        if used != "identity":
            headers.append((b"content-encoding", used.encode()))
        return Answer(200, headers, body)


def classify(snapshot: Snapshot, kind: str, value: str) -> tuple[int, dict[str, Any]]:
    """(status, document) for ``GET /v1/classify``."""
    return classify_in(snapshot.version, snapshot.namespaces, snapshot.cells_by_id, kind, value)


class RouterSync:
    """The per-process state of the protocol; ``start`` runs in the app's lifespan."""

    def __init__(self, settings: Settings, metrics: ApiMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.authorizer = Authorizer.from_settings(settings)
        self.compression = Compression(settings.snapshot_gzip_level, settings.snapshot_zstd_level)
        self.endpoint: SnapshotEndpoint | None = None
        self.cache: SnapshotCache | None = None
        self._revalidations = metrics.requests.labels("/v1/snapshot", "304")
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

    def revalidation_response(self, authorization: bytes, if_none_match: bytes,
                              default_headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """The raw HTTP/1.1 304 for a revalidation that needs nothing else (query_api.fast_protocol);
        None when the request must take the normal path (not current, not authorized, ...)."""
        endpoint = self.endpoint
        snapshot = endpoint.cache.current if endpoint is not None else None
        if endpoint is None or snapshot is None:
            return None
        match_all, held = etag_versions(if_none_match.decode("latin-1"))
        if match_all or held is None or held < snapshot.version:
            return None
        if self.authorizer.check(authorization, SNAPSHOT_READ) is not None:
            return None
        self._revalidations.inc()
        headers = [*default_headers, *endpoint.version_headers(snapshot, etag=held == snapshot.version)]
        return b"HTTP/1.1 304 Not Modified\r\n" + b"".join(b"%s: %s\r\n" % pair for pair in headers) + b"\r\n"

    def close_soon(self) -> None:
        """Release long-polls (from a signal handler: thread-safe)."""
        if self._loop is not None and self.cache is not None:
            self._loop.call_soon_threadsafe(self.cache.close)


def _protected(method: str, path: str) -> bool:
    """Routing data needs ``snapshot:read``: snapshots, classification, cells. (The claim
    endpoints get scopes of their own with the issue that owns them, adr/0009.)"""
    if method != "GET":
        return False
    return path.startswith(("/v1/snapshot", "/v1/classify", "/v1/cells"))


def _template(path: str) -> str:
    if path.startswith("/v1/cells/"):
        return "/v1/cells/{cell_id}"
    return path if path in ("/v1/snapshot", "/v1/classify", "/v1/cells") else "unmatched"


class RouterSyncMiddleware:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], sync: RouterSync) -> None:
        self.app = app
        self.sync = sync
        self._counted: dict[tuple[str, int], Any] = {}
        self._timed: dict[str, Any] = {}

    def _count(self, route: str, status: int, started: float | None) -> None:
        child = self._counted.get((route, status))
        if child is None:
            child = self._counted[(route, status)] = self.sync.metrics.requests.labels(route, str(status))
        child.inc()
        if started is not None:
            timer = self._timed.get(route)
            if timer is None:
                timer = self._timed[route] = self.sync.metrics.latency.labels(route)
            timer.observe(time.perf_counter() - started)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "topology.authorized" in scope or not _protected(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        authorization = if_none_match = accept = accept_encoding = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"if-none-match":
                if_none_match = value
            elif name == b"accept-encoding":
                accept_encoding = value
            elif name == b"accept":
                accept = value
        denied = self.sync.authorizer.check(authorization, SNAPSHOT_READ)
        if denied is not None:
            status, code, message = denied
            self.sync.metrics.auth_failures.labels(code).inc()
            extra = [(b"www-authenticate", b'Bearer realm="topology"' if status == 401 else
                      b'Bearer realm="topology", error="insufficient_scope", scope="snapshot:read"')]
            await self._send(send, error_answer(status, code, message, headers=extra))
            self._count(_template(path), status, started)
            return
        if path != "/v1/snapshot":
            scope["topology.authorized"] = True  # an inner copy of this middleware need not check again
            await self.app(scope, receive, send)
            return
        endpoint = self.sync.endpoint
        query = scope["query_string"]
        if endpoint is not None and not query and if_none_match:
            # The revalidation a fleet repeats: "I hold V", and V is current (or newer).
            snapshot = endpoint.cache.current
            if snapshot is not None and (etag_versions(if_none_match.decode("latin-1"))[1] or -1) >= snapshot.version:
                held = etag_versions(if_none_match.decode("latin-1"))[1]
                await send({"type": "http.response.start", "status": 304,
                            "headers": endpoint.version_headers(snapshot, etag=held == snapshot.version)})
                await send({"type": "http.response.body", "body": b""})
                self._count("/v1/snapshot", 304, None)
                return
        if endpoint is None:
            answer = error_answer(503, "not_loaded", "starting up")
        else:
            answer = await endpoint.handle(
                query, if_none_match.decode("latin-1"), accept.decode("latin-1"), accept_encoding.decode("latin-1"),
            )
        await self._send(send, answer)
        self._count("/v1/snapshot", answer.status, None if b"wait=" in query else started)

    @staticmethod
    async def _send(send: Send, answer: Answer) -> None:
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        await send({"type": "http.response.body", "body": answer.body})


_SECURED = ("/v1/snapshot", "/v1/classify", "/v1/cells", "/v1/cells/{cell_id}")
_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDocument, "description": "Missing or unknown bearer token"},
    403: {"model": ErrorDocument, "description": "The token lacks the snapshot:read scope"},
}


def router_sync_routes(sync: RouterSync) -> APIRouter:
    router = APIRouter()

    @router.get(
        "/v1/snapshot",
        response_model=SnapshotDocument | DeltaDocument,
        responses={
            200: {
                "description": "The full snapshot (no since), or the delta from since (DeltaDocument). "
                "Headers: ETag and X-Topology-Version (the version), X-Topology-Age-Seconds (since the "
                "projector last committed, as this process knows it). Content-Encoding zstd or gzip when "
                "Accept-Encoding allows it; application/msgpack when Accept prefers it.",
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
            **_AUTH_RESPONSES,
        },
        summary="Routing tables at one version: full snapshot, or delta since a version; long-poll with wait",
    )
    async def get_snapshot(
        request: Request,
        since: int | None = Query(None, ge=0, description="Answer the changes from this version (a delta)"),
        wait: str | None = Query(None, pattern=WAIT_PATTERN,
                                 description="Long-poll: hold the request up to this long (30s, 500ms; "
                                 "bounded by TOPOLOGY_API_MAX_WAIT_S) until a version newer than the "
                                 "client's exists"),
        min_version: int | None = Query(None, ge=0, description="Full snapshot at this version or newer "
                                        "(never an older one)"),
    ) -> Response:
        endpoint = sync.endpoint
        if endpoint is None:
            return Response(orjson.dumps({"error": {"code": "not_loaded", "message": "starting up"}}), 503)
        answer = await endpoint.handle(
            request.scope["query_string"], request.headers.get("if-none-match", ""),
            request.headers.get("accept", ""), request.headers.get("accept-encoding", ""),
        )
        return Response(answer.body, answer.status, headers={k.decode(): v.decode() for k, v in answer.headers})

    @router.get(
        "/v1/classify",
        response_model=ClassifyDocument,
        responses={400: {"model": ErrorDocument}, 404: {"model": ErrorDocument}, 503: {"model": ErrorDocument},
                   **_AUTH_RESPONSES},
        summary="Which cell serves this request: ROUTE (a path; its top-level namespace), SESSION_PREFIX, CELL_ID, "
        "LOGIN (a username or e-mail)",
    )
    async def get_classify(
        request: Request,
        type: str = Query(..., description="ROUTE, SESSION_PREFIX, CELL_ID or LOGIN (any case)",  # noqa: A002
                          json_schema_extra={"pattern": any_case_pattern((*CLASSIFY_TYPES, "LOGIN"))}),
        value: str = Query(..., description="e.g. gitlab-org/gitlab for a ROUTE, a username or e-mail for a LOGIN"),
    ) -> Response:
        snapshot = sync.cache.current if sync.cache is not None else None
        if snapshot is None:
            return Response(orjson.dumps({"error": {"code": "not_loaded", "message": "no snapshot loaded yet"}}),
                            503, media_type="application/json")
        if type.upper() == "LOGIN":
            # Usernames and e-mails are not in the routers' snapshot; the claims table answers.
            cell_id = await login_cell(request.app.state.claims, value)
            if cell_id is None:
                status, document = 404, {"error": {"code": "not_found", "message": "no cell holds this login"}}
            else:
                status, document = classify(snapshot, "CELL_ID", cell_id)
                if status == 200:
                    document = {**document, "type": "LOGIN", "value": value, "key": cell_id}
        else:
            status, document = classify(snapshot, type, value)
        headers = {k.decode(): v.decode() for k, v in sync.endpoint.version_headers(snapshot)} if sync.endpoint else {}
        return Response(orjson.dumps(document), status, headers=headers, media_type="application/json")

    return router


def install_router_sync(app: FastAPI, sync: RouterSync) -> None:
    """Routes, the token-checking fast path (outermost middleware), and the bearer
    scheme in the OpenAPI document. Call after every other middleware is added."""
    app.state.sync = sync
    app.include_router(router_sync_routes(sync))
    app.add_middleware(RouterSyncMiddleware, sync=sync)
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build_openapi()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearerAuth"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "A token configured in TOPOLOGY_API_TOKENS; routing data needs the snapshot:read scope",
        }
        for path in _SECURED:
            operation = schema.get("paths", {}).get(path, {}).get("get")
            if operation is not None:
                operation["security"] = [{"bearerAuth": ["snapshot:read"]}]
                operation.setdefault("responses", {}).setdefault(
                    "401", {"description": "Missing or unknown bearer token"})
                operation["responses"].setdefault("403", {"description": "The token lacks the snapshot:read scope"})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
