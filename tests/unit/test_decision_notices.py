"""Decisions travelling in the projector's NOTIFY (runtime/database.py, query_api/decisions.py,
adr/0018): payloads stay under PostgreSQL's limit, a decision too large for one is looked up
instead, and the waiter answers from a notification without a query."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from topology_store.query_api.decisions import DecisionWaiter
from topology_store.runtime.database import (
    NOTIFY_PAYLOAD_LIMIT,
    DecisionRow,
    decode_decision_notice,
    encode_decision_notices,
)


def row(detail_bytes: int = 200, reason: str | None = None, outcome: str = "applied") -> DecisionRow:
    detail = json.dumps([{"type": "LeaseGranted", "note": "x" * detail_bytes, "name": "Jürgen"}])
    return (uuid.uuid4(), "ClaimsRequested", outcome, reason, detail, None if reason else uuid.uuid4().bytes * 2)


def test_a_batch_round_trips_and_every_payload_stays_under_the_limit() -> None:
    rows = [row(detail_bytes=n * 37 % 900, reason="CONFLICT: \"a\" held" if n % 3 else None) for n in range(200)]
    payloads = encode_decision_notices(rows)
    assert len(payloads) > 1 and "" not in payloads
    assert all(len(p.encode("utf-8")) <= NOTIFY_PAYLOAD_LIMIT for p in payloads)
    decoded = [d for p in payloads for d in (decode_decision_notice(p) or [])]
    assert decoded == [(i, t, o, r, json.loads(d or "null"), g) for i, t, o, r, d, g in rows]


def test_a_decision_too_large_for_a_payload_is_left_to_a_lookup() -> None:
    small, huge = row(), row(detail_bytes=NOTIFY_PAYLOAD_LIMIT)
    payloads = encode_decision_notices([small, huge])
    assert payloads[-1] == ""  # the empty payload: look the requests up
    carried = [d[0] for p in payloads if p for d in decode_decision_notice(p) or []]
    assert carried == [small[0]]
    assert encode_decision_notices([]) == [""]  # nothing to carry (all duplicates): look up
    assert decode_decision_notice("") is None


def test_garbage_is_refused() -> None:
    for payload in ("{", "[1]", '[["not-a-uuid","a","b",null,null,null]]', "7",
                    '[["9a4c5fe8-0d3e-4c8e-9a53-5b1f4b3c7f11","a","b",null,null,"zz"]]'):
        with pytest.raises(ValueError, match="not a decision notice"):
            decode_decision_notice(payload)


async def test_the_waiter_answers_from_the_notification_and_asks_for_a_lookup_when_it_cannot() -> None:
    # The engine is never connected: every answer below comes from a payload.
    engine = create_async_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    waiter = DecisionWaiter(engine, "postgresql://nobody@127.0.0.1:1/none")
    mine, other, huge = row(), row(reason="CONFLICT", outcome="rejected"), row(detail_bytes=NOTIFY_PAYLOAD_LIMIT)
    waiting = asyncio.create_task(waiter.wait(mine[0], 5, check_first=False))
    waiting_huge = asyncio.create_task(waiter.wait(huge[0], 0.2, check_first=False))
    await asyncio.sleep(0)
    payloads = encode_decision_notices([other, mine, huge])
    assert [waiter.resolve_notice(p) for p in payloads] == [True, False]  # the last one: look up
    decision = await waiting
    assert decision is not None
    assert (decision.request_id, decision.request_type, decision.outcome, decision.reason) == mine[:4]
    assert decision.decisions == json.loads(mine[4] or "null")
    assert decision.digest == mine[5]  # a reused request id is still told apart (adr/0017)
    assert await waiting_huge is None  # not carried: only a lookup (or the poll) answers it
    assert waiter.waiting == 0
    assert waiter.resolve_notice("garbage") is False
    await engine.dispose()
