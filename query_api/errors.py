"""The one error shape of the read API, and what turns every failure into it.

Every answer that is not a success is ``{"error": {"code": ..., "message": ...}}``
(plus fields of its own for some codes, e.g. ``conflicts``): FastAPI's 422
validation bodies, Starlette's 404/405, an oversize body, a database that does
not answer and, last of all, an unexpected exception (logged here, answered
without its trace). ``document_errors`` makes the OpenAPI document say so. A
database outage answers 503 with Retry-After (adr/0012).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import psycopg
import sqlalchemy.exc
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from topology_store.schemas.models import CONTROL_CHARACTERS
from topology_store.schemas.router_sync import error_document

log = logging.getLogger(__name__)

# A client told to come back should not come back at once, nor wait long: the
# read side recovers by itself as soon as PostgreSQL answers again.
RETRY_AFTER_S = 2

# What an unreachable or overloaded PostgreSQL raises: connection refused or cut,
# the pool exhausted, a query timed out. Not DataError & co.: those are bad input
# the routes must refuse before querying, and stay 500s so a test notices them.
DATABASE_DOWN: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    ConnectionError,
    TimeoutError,
)

_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The error document; every error answer of the API is built from it (as a
    ``JSONResponse`` by :func:`error`, as bytes by ``snapshot_api.error_answer``)."""
    return error_document(code, message, **extra)  # the one shape, shared with the router sidecar


def error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None,
          **extra: Any) -> JSONResponse:
    """The JSON error answer; ``extra`` adds fields beside code and message."""
    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=dict(headers or {}))


def database_unavailable() -> JSONResponse:
    return error(503, "database_unavailable", "PostgreSQL does not answer; retry later",
                 headers={"Retry-After": str(RETRY_AFTER_S)})


def validation_message(errors: Iterable[Mapping[str, Any]]) -> str:
    """``where: what`` for each problem. Never the rejected input itself: it may be
    an e-mail, and error messages end up in logs and client reports."""
    parts = []
    for problem in errors:
        where = ".".join(str(part) for part in problem.get("loc", ())) or "request"
        what = str(problem.get("msg", "invalid"))
        detail = (problem.get("ctx") or {}).get("error") if problem.get("type") == "json_invalid" else None
        parts.append(f"{where}: {what}" + (f" ({detail})" if detail else ""))
    return "; ".join(parts) or "invalid request"


def _route_template(request: Request) -> str:
    # The template, never the raw path: a path may hold an e-mail or a token-like value.
    return getattr(request.scope.get("route"), "path", "unmatched")


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error(400, "invalid_request", validation_message(exc.errors()))


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(app: Starlette, scope: Scope) -> list[str]:
    """Every method some route serves at the request's path, asked of the routes themselves
    (Starlette's own 405 names only the first route whose path matches, e.g. DELETE of a
    path that also has a GET)."""
    return [method for method in _METHODS
            if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in app.router.routes)]


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
    if exc.status_code in (204, 304) or exc.status_code < 200:
        return Response(status_code=exc.status_code, headers=headers)
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:  # a status of no standard
        phrase = "error"
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else phrase
    code = _CODES.get(exc.status_code, phrase.lower().replace(" ", "_").replace("-", "_"))
    return error(exc.status_code, code, message, headers=headers)


async def _on_database_down(request: Request, exc: Exception) -> Response:
    log.warning("database unavailable on %s %s: %s", request.method, _route_template(request),
                exc.__class__.__name__)
    return database_unavailable()


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled %s on %s %s", exc.__class__.__name__, request.method, _route_template(request),
              exc_info=exc)
    return error(500, "internal_error", "the server failed to answer this request; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    for kind in DATABASE_DOWN:
        app.add_exception_handler(kind, _on_database_down)
    # Starlette answers this one from its outermost middleware (and re-raises it
    # to the server, which logs it once more): the last resort, not a control path.
    app.add_exception_handler(Exception, _on_unexpected)


_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]")


def query_control_character(query: bytes) -> str | None:
    """The name of a query parameter (or "a query parameter name") holding a control
    character, after percent-decoding; None when there is none. No value the API
    reads has one, and a line break would reach a parser that skips whitespace."""
    if not query:
        return None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if _CONTROL.search(name):
            return "a query parameter name"
        if _CONTROL.search(value):
            return name if len(name) <= 64 else name[:64] + "..."
    return None


def control_character_answer(where: str) -> dict[str, Any]:
    """The error document of :func:`query_control_character`'s refusal (a 400)."""
    return error_body("bad_query", f"{where}: must not contain control characters (e.g. a line break or NUL)")


class RequestLimitsMiddleware:
    """Refuses what no route can take, before any route sees it: a path with control
    characters (no identifier here has one; the router's ``{value:path}`` would not
    even match a line break, and PostgreSQL cannot store a NUL) with a JSON 400, and
    a body larger than ``max_bytes`` with a JSON 413 - at once when Content-Length
    says so (nothing is read), else as soon as the chunks received pass the limit.
    Bodies are small JSON documents here; a large one is a mistake or an attack, and
    buffering it would cost memory on every replica."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> JSONResponse:
        return error(413, "payload_too_large", f"the request body must be at most {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _CONTROL.search(scope["path"]):
            await error(400, "bad_path", "the path must not contain control characters (e.g. a line break or NUL)")(
                scope, receive, send)
            return
        if (where := query_control_character(scope["query_string"])) is not None:
            await JSONResponse(control_character_answer(where), status_code=400)(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await error(400, "bad_request", "Content-Length must be a non-negative integer")(
                        scope, receive, send)
                    return
                if declared > self.max_bytes:
                    await self._too_large()(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read, which lets FastAPI's own
                    # HTTPException through (a plain one would become a 400).
                    raise HTTPException(413, f"the request body must be at most {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


def _operations(document: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    for item in document.get("paths", {}).values():
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options"):
                yield operation


_ERROR_REF = {"$ref": "#/components/schemas/ErrorDocument"}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document describe the errors the API really answers: 400 with
    the error document instead of FastAPI's 422 (which it never sends), 401/403 where a
    token is needed, 413 where a body is read; an ErrorDocument on every 4xx/5xx."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for operation in _operations(document):
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if operation.get("parameters") or operation.get("requestBody"):
                responses.setdefault("400", _error_response("Invalid parameters or body"))
            if operation.get("requestBody"):
                responses.setdefault("413", _error_response("The body is larger than TOPOLOGY_API_MAX_BODY_BYTES"))
            if operation.get("security"):
                responses.setdefault("401", _error_response("Missing or unknown bearer token"))
                responses.setdefault("403", _error_response("The token lacks the scope this operation needs"))
            for status, response in responses.items():
                if status[:1] in ("4", "5") and "content" not in response:
                    response["content"] = {"application/json": {"schema": _ERROR_REF}}
        # Nothing refers to FastAPI's validation bodies any more.
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        return document

    app.openapi = openapi  # type: ignore[method-assign]
