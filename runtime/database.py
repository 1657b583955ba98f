"""The database connection every process opens, and the NOTIFY channels they share.

The projector writes (adr/0002) and NOTIFYs; the read API and the claims door LISTEN.
The channel names live here, below both, so neither imports the other, and so does the
format of the decisions a notification carries (adr/0018): the claims door answers from
the notification without a lookup, and looks up only what did not fit in one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

VERSION_CHANNEL = "topology_version"  # a batch bumped the routing version; payload: the version
# A batch decided claim requests; payload: the decisions (encode_decision_notices), or empty: look them up.
DECISIONS_CHANNEL = "topology_decisions"

# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (in its default build).
NOTIFY_PAYLOAD_LIMIT = 7999

#: One recorded decision as it travels in a notification: request id, request type,
#: outcome, reason, the decision events as JSON text (``processed_events.detail``) and the
#: request's digest (``processed_events.request_digest``, adr/0017).
DecisionRow = tuple[UUID, str, str, str | None, str | None, bytes | None]
DecisionNotice = tuple[UUID, str, str, str | None, list[Any], bytes | None]

# A PostgreSQL host that drops packets (rather than refusing) would otherwise hold a
# connection attempt for the kernel's TCP timeout, minutes, and every request behind it.
CONNECT_TIMEOUT_S = 10


def create_engine(sqlalchemy_url: str, pool_size: int = 5, connect_timeout_s: int = CONNECT_TIMEOUT_S,
                  pre_ping: bool = True) -> AsyncEngine:
    """``pre_ping``: test each connection with a round trip when it leaves the pool, so a
    connection the server dropped is replaced before use. Off for a caller that retries a
    failed transaction anyway (the projector, whose every batch would pay the round trip)."""
    return create_async_engine(
        sqlalchemy_url, pool_size=pool_size, pool_pre_ping=pre_ping, connect_args={"connect_timeout": connect_timeout_s}
    )


def encode_decision_notices(rows: Iterable[DecisionRow], limit: int = NOTIFY_PAYLOAD_LIMIT) -> list[str]:
    """The payloads announcing ``rows``: JSON arrays of ``[id, type, outcome, reason, detail,
    digest in hex]``,
    each under ``limit`` bytes. A row too large for any payload is left out and an empty
    payload added instead, which tells a listener to look its requests up."""
    payloads: list[str] = []
    entries: list[str] = []
    size = 2  # the brackets
    oversize = False
    for request_id, request_type, outcome, reason, detail, digest in rows:
        entry = (f'["{request_id}",{json.dumps(request_type)},{json.dumps(outcome)},{json.dumps(reason)},'
                 f'{detail if detail is not None else "null"},{json.dumps(digest.hex() if digest else None)}]')
        length = len(entry.encode("utf-8"))
        if length + 2 > limit:
            oversize = True
            continue
        if entries and size + 1 + length > limit:
            payloads.append("[" + ",".join(entries) + "]")
            entries, size = [], 2
        size += length + (1 if entries else 0)
        entries.append(entry)
    if entries:
        payloads.append("[" + ",".join(entries) + "]")
    if oversize or not payloads:
        payloads.append("")
    return payloads


def decode_decision_notice(payload: str) -> list[DecisionNotice] | None:
    """The decisions a notification carries; None for an empty payload (look them up).
    Raises ValueError for a payload not in this format."""
    if not payload:
        return None
    try:
        return [(UUID(request_id), request_type, outcome, reason, detail or [],
                 bytes.fromhex(digest) if digest is not None else None)
                for request_id, request_type, outcome, reason, detail, digest in json.loads(payload)]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a decision notice: {exc}") from exc
