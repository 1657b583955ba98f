"""The routing data's door in plain ASGI (adr/0009): ``RouterSyncMiddleware``, in front
of FastAPI, checks the bearer token of every routing-data request (snapshot,
classification, cells) and hands ``GET /v1/snapshot`` to the snapshot endpoint
(``query_api/snapshot_api.py``) itself, without FastAPI's routing and validation,
because that is the request a fleet of routers repeats: a revalidation costs a
header scan, a token hash and a few comparisons. The cheapest case, a plain 304
revalidation, is answered even earlier, in uvicorn's protocol
(``query_api/uvicorn_fast_path.py``).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from topology_store.query_api.auth import challenge
from topology_store.query_api.snapshot_api import Answer, RouterSync, error_answer
from topology_store.schemas.router_sync import SNAPSHOT_READ


def _protected(method: str, path: str) -> bool:
    """Routing data needs ``snapshot:read``: snapshots, classification (GET and GitLab's POST), cells. (The claim
    endpoints get scopes of their own with the issue that owns them, adr/0009.)"""
    if method == "POST":
        return path == "/v1/classify"  # GitLab's Classify (query_api/gitlab_api.py): the same data, the same scope
    if method != "GET":
        return False
    return path.startswith(("/v1/snapshot", "/v1/classify", "/v1/cells"))


def _template(path: str) -> str:
    if path.startswith("/v1/cells/"):
        return "/v1/cells/{cell_id}"
    return path if path in ("/v1/snapshot", "/v1/classify", "/v1/cells") else "unmatched"


class RouterSyncMiddleware:
    def __init__(self, app: ASGIApp, sync: RouterSync) -> None:
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
            refusal = error_answer(status, code, message,
                                   headers=[(b"www-authenticate", challenge(status, SNAPSHOT_READ).encode())])
            await self._send(send, refusal)
            self._count(_template(path), status, started)
            return
        if path != "/v1/snapshot":
            scope["topology.authorized"] = True  # an inner copy of this middleware need not check again
            await self.app(scope, receive, send)
            return
        query = scope["query_string"]
        endpoint = self.sync.endpoint
        if endpoint is not None and not query and if_none_match:
            # The revalidation a fleet repeats: "I hold V", and V is current (or newer).
            not_modified = endpoint.revalidate_current(if_none_match, accept, accept_encoding)
            if not_modified is not None:
                await self._send(send, not_modified)
                self._count("/v1/snapshot", 304, None)
                return
        answer = await self.sync.answer(
            query, if_none_match.decode("latin-1"), accept.decode("latin-1"), accept_encoding.decode("latin-1"),
        )
        await self._send(send, answer)
        self._count("/v1/snapshot", answer.status, None if b"wait=" in query else started)

    @staticmethod
    async def _send(send: Send, answer: Answer) -> None:
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        await send({"type": "http.response.body", "body": answer.body})
