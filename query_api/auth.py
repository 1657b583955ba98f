"""Bearer tokens with scopes for the read API (adr/0009).

Tokens come from ``TOPOLOGY_API_TOKENS`` (a JSON object ``token -> [scopes]``, or
``token -> {"scopes": [...], "cell": "cell-1"}`` to bind the token to one cell, or
``{"scopes": [...], "admin": true}``) and/or the JSON file named by
``TOPOLOGY_API_TOKENS_FILE``. A token in the list form is unbound: an admin credential
that may act for any cell (what it was before cells could be bound; adr/0021). Only their SHA-256 digests are
kept in memory; a presented token is hashed and compared with every configured
digest by ``hmac.compare_digest`` (no early exit), so the time taken does not
depend on how much of a token matched. Tokens never appear in logs, errors or
reprs.

Per-cell authorization (adr/0021, GitLab's ``RULE_ALLOW_MATCHING_CELL_ONLY``): a claim
request names a cell; :func:`denied` given that ``cell`` refuses it with 403 ``wrong_cell``
unless the token's binding and the client certificate's (under mutual TLS,
:mod:`topology_store.query_api.tls`) both allow it (:func:`topology_store.core.access.refusal`).

A refused request gets the error document with a ``WWW-Authenticate`` challenge
(RFC 6750), and the OpenAPI document names the scope each operation needs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from topology_store.core.access import Binding, refusal
from topology_store.query_api.documents import ErrorDocument
from topology_store.query_api.errors import error
from topology_store.runtime.settings import Settings

# The key of ``scope["state"]`` under which the HTTP protocol leaves the binding of the
# connection's verified client certificate (query_api/tls.py).
CLIENT_CERTIFICATE = "topology_client_certificate"


class TokenConfigError(ValueError):
    """The token configuration is malformed (the message never contains a token)."""


# A token in the list form: unbound, an admin credential (how every token acted before).
ADMIN_TOKEN = Binding("bearer token", admin=True)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token holds: its scopes, and the cell it may act for (``binding``)."""

    scopes: frozenset[str]
    binding: Binding = ADMIN_TOKEN


def _grant(value: object, source: str, number: int) -> Grant:
    if isinstance(value, list):  # the original form: scopes only, unbound (admin)
        value = {"scopes": value, "admin": True}
    if not isinstance(value, dict):
        raise TokenConfigError(f"{source}: token #{number}: must map to a list of scopes or an object "
                               '{"scopes": [...], "cell": "<cell id>"} / {"scopes": [...], "admin": true}')
    unknown = set(value) - {"scopes", "cell", "admin"}
    if unknown:
        raise TokenConfigError(f"{source}: token #{number}: unknown keys {sorted(unknown)} (scopes, cell, admin)")
    scopes = value.get("scopes")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise TokenConfigError(f"{source}: token #{number}: scopes must be a list of strings")
    cell, admin = value.get("cell"), value.get("admin", False)
    if not isinstance(admin, bool):
        raise TokenConfigError(f"{source}: token #{number}: admin must be true or false")
    if cell is not None and (not isinstance(cell, str) or not cell):
        raise TokenConfigError(f"{source}: token #{number}: cell must be a cell id (a non-empty string)")
    if (cell is None) == (not admin):
        raise TokenConfigError(f"{source}: token #{number}: give exactly one of \"cell\" and \"admin\": true")
    return Grant(frozenset(scopes), Binding("bearer token", cell=cell, admin=admin))


def parse_tokens(raw: str, source: str) -> dict[str, Grant]:
    if not raw.strip():
        return {}
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TokenConfigError(f"{source}: not JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(document, dict):
        raise TokenConfigError(f"{source}: must be a JSON object of token -> list of scopes (or grant object)")
    tokens: dict[str, Grant] = {}
    for number, (token, value) in enumerate(document.items(), start=1):
        if not isinstance(token, str) or len(token) < 8:
            raise TokenConfigError(f"{source}: token #{number} is shorter than 8 characters")
        tokens[token] = _grant(value, source, number)
    return tokens


def _scope_refusal(grant: Grant | None, authorization: bytes | None, scope: str) -> tuple[int, str, str] | None:
    if grant is None:
        if not authorization:
            return 401, "unauthenticated", "a bearer token is required (Authorization: Bearer <token>)"
        return 401, "invalid_token", "the bearer token is not valid"
    if scope not in grant.scopes:
        return 403, "insufficient_scope", f"the token lacks the {scope} scope"
    return None


@dataclass(frozen=True)
class Authorizer:
    """Verifies ``Authorization: Bearer <token>`` against the configured tokens."""

    _entries: tuple[tuple[bytes, Grant], ...] = field(repr=False)

    @classmethod
    def from_tokens(cls, tokens: dict[str, Grant] | dict[str, frozenset[str]]) -> Authorizer:
        """``tokens``: token -> grant (a bare set of scopes: unbound, admin)."""
        return cls(tuple((hashlib.sha256(t.encode()).digest(), g if isinstance(g, Grant) else Grant(frozenset(g)))
                         for t, g in tokens.items()))

    @classmethod
    def from_settings(cls, settings: Settings) -> Authorizer:
        tokens = parse_tokens(settings.api_tokens, "TOPOLOGY_API_TOKENS")
        if settings.api_tokens_file:
            try:
                raw = Path(settings.api_tokens_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise TokenConfigError(f"TOPOLOGY_API_TOKENS_FILE: cannot read: {exc.strerror}") from None
            tokens.update(parse_tokens(raw, "TOPOLOGY_API_TOKENS_FILE"))
        return cls.from_tokens(tokens)

    @property
    def configured(self) -> int:
        return len(self._entries)

    def grant(self, authorization: bytes | None) -> Grant | None:
        """The grant of the presented token; None when it is missing or unknown."""
        if not authorization or authorization[:7].lower() != b"bearer ":
            return None
        presented = hashlib.sha256(authorization[7:].strip()).digest()
        found: Grant | None = None
        for digest, grant in self._entries:
            if hmac.compare_digest(digest, presented):
                found = grant
        return found

    def binding(self, authorization: bytes | None) -> Binding | None:
        """The cell binding of the presented token; None when it is missing or unknown."""
        grant = self.grant(authorization)
        return grant.binding if grant is not None else None

    def scopes(self, authorization: bytes | None) -> frozenset[str] | None:
        """The scopes of the presented token; None when it is missing or unknown."""
        grant = self.grant(authorization)
        return grant.scopes if grant is not None else None

    def check(self, authorization: bytes | None, scope: str) -> tuple[int, str, str] | None:
        """None when allowed; else (status, code, message) of the error to answer."""
        return _scope_refusal(self.grant(authorization), authorization, scope)

    def check_cell(self, authorization: bytes | None, scope: str, cell: str,
                   certificate: Binding | None = None) -> tuple[int, str, str] | None:
        """:meth:`check`, then per-cell authorization: may the token (and the client
        certificate, when one was presented) act for ``cell``? Else 403 ``wrong_cell``."""
        grant = self.grant(authorization)  # hashed once for both checks: this is the claim path
        if (refused := _scope_refusal(grant, authorization, scope)) is not None or grant is None:
            return refused
        bindings = (grant.binding,) if certificate is None else (grant.binding, certificate)
        if (reason := refusal(bindings, cell)) is not None:
            return 403, "wrong_cell", reason
        return None


def client_certificate(request: Request) -> Binding | None:
    """The binding of the request's verified client certificate (mutual TLS); None without one."""
    binding = request.scope.get("state", {}).get(CLIENT_CERTIFICATE)
    return binding if isinstance(binding, Binding) else None


def challenge(status: int, scope: str) -> str:
    """The ``WWW-Authenticate`` value of a 401 (no valid token) or a 403 (``scope`` missing)."""
    if status == 401:
        return 'Bearer realm="topology"'
    return f'Bearer realm="topology", error="insufficient_scope", scope="{scope}"'


def denied(request: Request, authorizer: Authorizer, scope: str, cell: str | None = None) -> JSONResponse | None:
    """The 401/403 answer when the request's bearer token lacks ``scope`` or, given the
    ``cell`` the request acts for, when its token or client certificate may not act for
    that cell (403 ``wrong_cell``); else None."""
    header = request.headers.get("authorization")
    presented = header.encode("latin-1") if header else None
    if cell is None:
        refused = authorizer.check(presented, scope)
    else:
        refused = authorizer.check_cell(presented, scope, cell, client_certificate(request))
    if refused is None:
        return None
    status, code, message = refused
    if code == "wrong_cell":  # the credential is fine, the cell is not: no challenge to answer
        return error(status, code, message)
    return error(status, code, message, headers={"WWW-Authenticate": challenge(status, scope)})


def secured(scope: str) -> dict[str, Any]:
    """The OpenAPI ``security`` of an operation that needs ``scope`` (the scheme: :func:`document_bearer_auth`)."""
    return {"security": [{"bearerAuth": [scope]}]}


def refusals(scope: str) -> dict[int | str, dict[str, Any]]:
    """The documented 401 and 403 of an operation that needs ``scope``."""
    return {
        401: {"model": ErrorDocument, "description": "Missing or unknown bearer token"},
        403: {"model": ErrorDocument, "description": f"The token lacks the {scope} scope (insufficient_scope); or the "
              "request names a cell its token or client certificate is not bound to (wrong_cell)"},
    }


def document_bearer_auth(app: FastAPI) -> None:
    """Declare, in the OpenAPI document, the bearer scheme that :func:`secured` operations name."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        document = build()
        schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearerAuth"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "A token configured in TOPOLOGY_API_TOKENS; routing data needs the snapshot:read scope",
        }
        return document

    app.openapi = openapi  # type: ignore[method-assign]
