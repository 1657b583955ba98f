"""``GET /v1/audit/history``: every event that touched a key, for auditors.

Needs the ``audit:read`` scope; e-mails appear in clear only for tokens that also
hold ``audit:pii`` — everyone else sees the keyed hash.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from projector.audit import audit_key, key_history
from query_api.claims_api import ClaimsService, denied
from query_api.models import ErrorDocument

AUDIT_READ = "audit:read"
AUDIT_PII = "audit:pii"


def audit_router() -> APIRouter:
    router = APIRouter(tags=["audit"])

    @router.get(
        "/v1/audit/history",
        responses={400: {"model": ErrorDocument}, 401: {"model": ErrorDocument}, 403: {"model": ErrorDocument}},
        summary="Every event that touched a key, in log order, with what the projector decided",
    )
    async def history(
        request: Request,
        type: str = Query(..., description="ROUTE, CELL, LEASE, OWNER or a claim bucket"),  # noqa: A002
        value: str = Query(..., max_length=1024),
    ) -> JSONResponse:
        service: ClaimsService = request.app.state.claims
        if refused := denied(request, service.authorizer, AUDIT_READ):
            return refused
        header = request.headers.get("authorization")
        pii = service.authorizer.check(header.encode("latin-1") if header else None, AUDIT_PII) is None
        try:
            kind, key = audit_key(type, value, service.settings.claim_secret)
        except (ValueError, ValidationError) as exc:
            return JSONResponse({"error": {"code": "bad_key", "message": str(exc).splitlines()[0]}}, status_code=400)
        async with service.engine.connect() as conn:
            entries = await key_history(conn, kind, key, service.settings.claim_secret, pii=pii)
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
            for e in entries
        ]
        return JSONResponse({"kind": kind, "key": key, "events": body})

    return router
