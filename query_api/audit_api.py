"""``GET /v1/audit/history``: every event that touched a key, for auditors.

Needs the ``audit:read`` scope; e-mails appear in clear only for tokens that also
hold ``audit:pii`` — everyone else sees the keyed hash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from annotated_types import Ge, Le
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from topology_store.core.audit import audit_key, mask_pii
from topology_store.query_api.auth import denied, secured
from topology_store.query_api.claims_api import ClaimsDoor
from topology_store.query_api.contract import CLAIM_VALUE_FORMATS, PARAM_INTEGER, TEXT_PATTERN
from topology_store.query_api.documents import AuditDocument, ErrorDocument, any_case_pattern
from topology_store.query_api.errors import error
from topology_store.schemas.codec import DecodeError, EventCodec
from topology_store.schemas.models import CellId, ClaimBucket, OwnerType

AUDIT_READ = "audit:read"
AUDIT_PII = "audit:pii"
MAX_HISTORY = 1000
AUDIT_KINDS = ("ROUTE", "CELL", "LEASE", "OWNER", *ClaimBucket)
_VALUE = ("ROUTE: a path (its top-level namespace is looked up); CELL: a cell id; LEASE: a lease id (UUID); OWNER: "
          f"cell/TYPE/id, e.g. cell-1/USER/42; a claim bucket: its value ({CLAIM_VALUE_FORMATS}). A value no key of "
          "the type can have is a 404")

_CELL_ID = TypeAdapter(CellId)
# The audit index's owner key (core/audit.py): cell/TYPE/id.
_OWNER_KEY = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}/(" + "|".join(t.value for t in OwnerType) + r")/[0-9]{1,19}$")


def _check_free_form(kind: str, value: str) -> None:
    """CELL and OWNER keys are looked up as given; refuse what no key can be (a NUL
    would even fail the query) instead of answering an empty history."""
    if kind.upper() == "CELL":
        _CELL_ID.validate_python(value)
    elif kind.upper() == "OWNER" and not _OWNER_KEY.match(value):
        raise ValueError("an OWNER is cell/TYPE/id, e.g. cell-1/USER/42")


def audit_router() -> APIRouter:
    router = APIRouter(tags=["audit"])

    @router.get(
        "/v1/audit/history",
        response_model=AuditDocument,
        responses={400: {"model": ErrorDocument}, 401: {"model": ErrorDocument}, 403: {"model": ErrorDocument},
                   404: {"model": ErrorDocument, "description": "No key of this type can be spelled so (`bad_key`; "
                         "the message says why): the document cannot tie value's format to type"},
                   503: {"model": ErrorDocument}},
        summary="Every event that touched a key, in log order, with what the projector decided (the first "
        "limit of them; truncated says whether more exist)",
        openapi_extra=secured(AUDIT_READ),
    )
    async def history(
        request: Request,
        type: Annotated[str, Query(max_length=32, description="ROUTE, CELL, LEASE, OWNER or a claim bucket (any "
                                   "case)", json_schema_extra={"pattern": any_case_pattern(AUDIT_KINDS)})],
        value: Annotated[str, Query(max_length=1024, description=_VALUE, json_schema_extra={"pattern": TEXT_PATTERN})],
        limit: Annotated[int, Ge(1), Le(MAX_HISTORY), PARAM_INTEGER, Query(description="At most this many events")
                         ] = MAX_HISTORY,
    ) -> JSONResponse:
        service: ClaimsDoor = request.app.state.claims
        if refused := denied(request, service.authorizer, AUDIT_READ):
            return refused
        if not type.isascii() or type.upper() not in AUDIT_KINDS:  # "ſ".upper() == "S"
            return error(400, "bad_type", f"type must be one of {', '.join(AUDIT_KINDS)} (any case)")
        header = request.headers.get("authorization")
        pii = service.authorizer.check(header.encode("latin-1") if header else None, AUDIT_PII) is None
        try:
            _check_free_form(type, value)
            kind, key = audit_key(type, value, service.settings.claim_secret)
        except ValidationError as exc:
            return error(404, "bad_key", f"no {type.upper()} key can be spelled so: {exc.errors()[0]['msg']}")
        except ValueError as exc:
            return error(404, "bad_key", f"no {type.upper()} key can be spelled so: {str(exc).splitlines()[0]}")
        async with service.engine.connect() as conn:
            # One more than asked for: whether there is more is known without loading it.
            entries = await key_history(conn, kind, key, service.settings.claim_secret, pii=pii, limit=limit + 1)
        truncated = len(entries) > limit
        body: list[dict[str, Any]] = [
            {
                "position": {"topic": e.topic, "partition": e.partition, "offset": e.offset},
                "log_time": e.log_time.isoformat() if e.log_time else None,
                "event_type": e.event_type,
                "source": e.source,
                "outcome": e.outcome,
                "reason": e.reason,
                "payload": e.payload,
                "decisions": e.decisions,
            }
            for e in entries[:limit]
        ]
        return JSONResponse({"kind": kind, "key": key, "events": body, "truncated": truncated})

    return router


# --- reading a key's history ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    topic: str
    partition: int
    offset: int
    log_time: datetime | None
    event_type: str
    source: str
    outcome: str
    reason: str | None
    payload: dict[str, object] | None  # decoded from the archived bytes
    decisions: list[dict[str, object]]


async def key_history(
    conn: AsyncConnection, kind: str, key: str, secret: bytes, pii: bool = False, limit: int | None = None
) -> list[HistoryEntry]:
    """Every event that touched the key, in log order; the first ``limit`` only, if given
    (the database stops there: a busy key's whole history is never loaded for a page)."""
    rows = await conn.execute(
        text(
            'SELECT p.topic, p.partition, p."offset", a.log_time, a.value, p.event_type, p.source, p.outcome, '
            "  p.reason, p.detail "
            "FROM event_keys k JOIN processed_events p ON p.event_id = k.event_id "
            'LEFT JOIN event_archive a ON a.topic = p.topic AND a.partition = p.partition AND a."offset" = p."offset" '
            'WHERE k.kind = :kind AND k.key = :key ORDER BY a.log_time NULLS LAST, p.topic, p.partition, p."offset" '
            "LIMIT :limit"
        ),
        {"kind": kind, "key": key, "limit": limit},
    )
    codec = EventCodec()
    entries = []
    for row in rows:
        payload: dict[str, object] | None = None
        if row.value is not None:
            try:
                payload = json.loads(
                    json.dumps(codec.decode(bytes(row.value)).payload, default=str)
                )
            except DecodeError:
                payload = None
        decisions = row.detail or []
        if not pii:
            payload = mask_pii(payload, secret)  # type: ignore[assignment]
        entries.append(
            HistoryEntry(row.topic, row.partition, row.offset, row.log_time, row.event_type, row.source,
                         row.outcome, row.reason, payload, decisions)
        )
    return entries
