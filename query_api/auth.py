"""Bearer tokens with scopes for the read API (adr/0009).

Tokens come from ``TOPOLOGY_API_TOKENS`` (a JSON object ``token -> [scopes]``) and/or
the JSON file named by ``TOPOLOGY_API_TOKENS_FILE``. Only their SHA-256 digests are
kept in memory; a presented token is hashed and compared with every configured
digest by ``hmac.compare_digest`` (no early exit), so the time taken does not
depend on how much of a token matched. Tokens never appear in logs, errors or
reprs.

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

from topology_store.query_api.documents import ErrorDocument
from topology_store.query_api.errors import error
from topology_store.runtime.settings import Settings


class TokenConfigError(ValueError):
    """The token configuration is malformed (the message never contains a token)."""


def parse_tokens(raw: str, source: str) -> dict[str, frozenset[str]]:
    if not raw.strip():
        return {}
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TokenConfigError(f"{source}: not JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(document, dict):
        raise TokenConfigError(f"{source}: must be a JSON object of token -> list of scopes")
    tokens: dict[str, frozenset[str]] = {}
    for number, (token, scopes) in enumerate(document.items(), start=1):
        if not isinstance(token, str) or len(token) < 8:
            raise TokenConfigError(f"{source}: token #{number} is shorter than 8 characters")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise TokenConfigError(f"{source}: token #{number}: scopes must be a list of strings")
        tokens[token] = frozenset(scopes)
    return tokens


@dataclass(frozen=True)
class Authorizer:
    """Verifies ``Authorization: Bearer <token>`` against the configured tokens."""

    _entries: tuple[tuple[bytes, frozenset[str]], ...] = field(repr=False)

    @classmethod
    def from_tokens(cls, tokens: dict[str, frozenset[str]]) -> Authorizer:
        return cls(tuple((hashlib.sha256(t.encode()).digest(), scopes) for t, scopes in tokens.items()))

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

    def scopes(self, authorization: bytes | None) -> frozenset[str] | None:
        """The scopes of the presented token; None when it is missing or unknown."""
        if not authorization or authorization[:7].lower() != b"bearer ":
            return None
        presented = hashlib.sha256(authorization[7:].strip()).digest()
        found: frozenset[str] | None = None
        for digest, scopes in self._entries:
            if hmac.compare_digest(digest, presented):
                found = scopes
        return found

    def check(self, authorization: bytes | None, scope: str) -> tuple[int, str, str] | None:
        """None when allowed; else (status, code, message) of the error to answer."""
        scopes = self.scopes(authorization)
        if scopes is None:
            if not authorization:
                return 401, "unauthenticated", "a bearer token is required (Authorization: Bearer <token>)"
            return 401, "invalid_token", "the bearer token is not valid"
        if scope not in scopes:
            return 403, "insufficient_scope", f"the token lacks the {scope} scope"
        return None


def challenge(status: int, scope: str) -> str:
    """The ``WWW-Authenticate`` value of a 401 (no valid token) or a 403 (``scope`` missing)."""
    if status == 401:
        return 'Bearer realm="topology"'
    return f'Bearer realm="topology", error="insufficient_scope", scope="{scope}"'


def denied(request: Request, authorizer: Authorizer, scope: str) -> JSONResponse | None:
    """The 401/403 answer when the request's bearer token lacks ``scope``; else None."""
    header = request.headers.get("authorization")
    refused = authorizer.check(header.encode("latin-1") if header else None, scope)
    if refused is None:
        return None
    status, code, message = refused
    return error(status, code, message, headers={"WWW-Authenticate": challenge(status, scope)})


def secured(scope: str) -> dict[str, Any]:
    """The OpenAPI ``security`` of an operation that needs ``scope`` (the scheme: :func:`document_bearer_auth`)."""
    return {"security": [{"bearerAuth": [scope]}]}


def refusals(scope: str) -> dict[int | str, dict[str, Any]]:
    """The documented 401 and 403 of an operation that needs ``scope``."""
    return {
        401: {"model": ErrorDocument, "description": "Missing or unknown bearer token"},
        403: {"model": ErrorDocument, "description": f"The token lacks the {scope} scope"},
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
