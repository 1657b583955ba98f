"""The revalidation fast path in uvicorn's HTTP protocol, below ASGI (adr/0009).

A fleet of routers mostly asks "I hold version V; anything newer?" and the answer is
mostly 304. Through ASGI that costs a scope, a request/response cycle object, an
asyncio task and two ``send`` calls per request; here, in uvicorn's httptools
protocol, the parser callback that completes the headers writes the snapshot
endpoint's 304 (``SnapshotEndpoint.revalidate_current``, ``query_api/snapshot_api.py``)
straight to the transport when, and only when, all of these hold:

``GET /v1/snapshot`` without a query, HTTP/1.1 keep-alive, no pipelined request in
flight, a valid bearer token with ``snapshot:read``, and an If-None-Match naming the
current version or a newer one. Anything else (including every error) takes the
normal ASGI path, so behaviour is the same either way; only the cost differs.

It relies on uvicorn's ``HttpToolsProtocol`` internals; :func:`protocol_for`
returns None (and the server uses uvicorn's own protocol) when they are not what
this code expects.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter

from topology_store.query_api.snapshot_api import RouterSync
from topology_store.schemas.router_sync import SNAPSHOT_READ

log = logging.getLogger(__name__)

_EXPECTED = ("on_headers_complete", "on_message_complete", "on_body", "on_response_complete")


def not_modified_bytes(sync: RouterSync, counted: Counter, authorization: bytes, if_none_match: bytes,
                       default_headers: list[tuple[bytes, bytes]], accept: bytes = b"",
                       accept_encoding: bytes = b"") -> bytes | None:
    """The raw HTTP/1.1 304 for a revalidation that needs nothing else; None when the
    request must take the ASGI path (not current, not authorized, not started, ...).
    Accept and Accept-Encoding pick the representation whose ETag the 304 carries."""
    endpoint = sync.endpoint
    answer = (endpoint.revalidate_current(if_none_match, accept, accept_encoding)
              if endpoint is not None else None)
    # The token after the version: a stale version needs no hash.
    if answer is None or sync.authorizer.check(authorization, SNAPSHOT_READ) is not None:
        return None
    counted.inc()
    lines = [b"%s: %s\r\n" % pair for pair in (*default_headers, *answer.headers)]
    return b"HTTP/1.1 304 Not Modified\r\n" + b"".join(lines) + b"\r\n"


def protocol_for(sync: RouterSync) -> type[Any] | None:
    # The counter's series exists from the start, as every route's does once answered.
    counted = sync.metrics.requests.labels("/v1/snapshot", "304")
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # needs httptools
    except ImportError:
        return None
    if not all(hasattr(HttpToolsProtocol, name) for name in _EXPECTED):
        log.warning("uvicorn's httptools protocol changed; the revalidation fast path is off")
        return None

    class FastRevalidationProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _fast = False

        def on_headers_complete(self) -> None:
            if self.url == b"/v1/snapshot" and (self.cycle is None or self.cycle.response_complete):
                parser = self.parser
                if (parser.get_method() == b"GET" and parser.get_http_version() == "1.1"
                        and parser.should_keep_alive() and not parser.should_upgrade()):
                    authorization = if_none_match = None
                    accept = accept_encoding = b""
                    for name, value in self.headers:
                        if name == b"authorization":
                            authorization = value
                        elif name == b"if-none-match":
                            if_none_match = value
                        elif name == b"accept":
                            accept = value
                        elif name == b"accept-encoding":
                            accept_encoding = value
                    if authorization is not None and if_none_match is not None:
                        raw = not_modified_bytes(sync, counted, authorization, if_none_match,
                                                 self.server_state.default_headers, accept, accept_encoding)
                        if raw is not None:
                            self._fast = True
                            self.transport.write(raw)
                            self.on_response_complete()
                            return
            self._fast = False
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._fast:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._fast:
                self._fast = False
                return
            super().on_message_complete()

    return FastRevalidationProtocol
