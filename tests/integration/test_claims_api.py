"""Claim requests over HTTP on the real stack: the API publishes to Kafka, the
projector process decides, the API answers with the decision (read-your-writes)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import AUTH, CLAIMS_AUTH
from tests.integration.processes import read_api, start, stop, wait_until
from topology_store.producer.publisher import EventPublisher
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import CellRegistered

pytestmark = pytest.mark.integration


def post(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(url, headers=CLAIMS_AUTH, **kwargs)


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, headers=CLAIMS_AUTH, **kwargs)


def delete(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.delete(url, headers=CLAIMS_AUTH, **kwargs)


@pytest.fixture
def stack(topics: Settings, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    # No shedding here: the race below keeps 300 requests waiting on a loaded machine, and these
    # tests are about decisions; admission control has its own (test_claims_overload.py).
    settings = topics.model_copy(update={"lease_tick_interval_s": 0.3, "decision_wait_s": 20.0,
                                         "claims_max_in_flight": 100_000, "claims_max_wait_age_ms": 600_000})
    projector = start(["project"], settings, tmp_path / "projector.log")
    try:
        with read_api(settings, tmp_path / "api.log") as url:
            yield url, settings
    finally:
        assert stop(projector) == 0, (tmp_path / "projector.log").read_text()[-3000:]


def begin(url: str, cell: str, owner: int, claims: list[tuple[str, str]], **extra: object) -> httpx.Response:
    body = {"cell_id": cell, "owner_type": "USER", "owner_id": owner,
            "claims": [{"bucket": b, "value": v} for b, v in claims], **extra}
    return post(f"{url}/v1/claims", json=body, timeout=30)


def test_begin_conflict_commit_rollback_and_idempotency(stack: tuple[str, Settings]) -> None:
    url, settings = stack
    granted = begin(url, "cell-1", 1, [("USERNAME", "Ada"), ("EMAIL", "Ada@Example.com")])
    assert granted.status_code == 201, granted.text
    body = granted.json()
    lease = body["decisions"][0]
    assert body["outcome"] == "applied" and lease["type"] == "LeaseGranted"
    assert "ada@example.com" not in granted.text.lower()  # e-mails travel back only as keyed hashes

    # Another owner wants the same e-mail (spelled differently) plus a free name: all or nothing.
    conflict = begin(url, "cell-2", 7, [("USERNAME", "grace"), ("EMAIL", "ADA@example.com")])
    assert conflict.status_code == 409
    error = conflict.json()["error"]
    assert error["code"] == "conflict" and [c["cell_id"] for c in error["conflicts"]] == ["cell-1"]
    assert get(f"{url}/v1/claims/USERNAME/grace").status_code == 404  # nothing of it was granted

    # Leased claims are reserved but not yet owned in the routing sense.
    assert get(f"{url}/v1/claims/USERNAME/ada").json()["status"] == "LEASED"
    committed = post(f"{url}/v1/leases/{lease['lease_id']}/commit", json={"cell_id": "cell-1"}, timeout=30)
    assert committed.status_code == 200 and committed.json()["decisions"][0]["type"] == "LeaseCommitted"
    assert get(f"{url}/v1/claims/EMAIL/ada@example.com").json()["status"] == "COMMITTED"
    owner = get(f"{url}/v1/owners/USER/1", params={"cell_id": "cell-1"}).json()
    assert sorted(c["bucket"] for c in owner["claims"]) == ["EMAIL", "USERNAME"]

    # The same request id again: the same answer, and no second decision.
    request_id = str(uuid.uuid4())
    first = begin(url, "cell-2", 8, [("NAMESPACE", "grace-org")], request_id=request_id)
    again = begin(url, "cell-2", 8, [("NAMESPACE", "grace-org")], request_id=request_id)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    rolled_back = post(f"{url}/v1/leases/{first.json()['decisions'][0]['lease_id']}/rollback",
                             json={"cell_id": "cell-2"}, timeout=30)
    assert rolled_back.status_code == 200
    assert get(f"{url}/v1/claims/NAMESPACE/grace-org").status_code == 404
    assert get(f"{url}/v1/requests/{request_id}").json()["outcome"] == "applied"

    wrong_cell = post(f"{url}/v1/leases/{lease['lease_id']}/rollback", json={"cell_id": "cell-9"}, timeout=30)
    assert wrong_cell.status_code == 409 and wrong_cell.json()["error"]["code"] == "wrong_cell"

    destroyed = delete(f"{url}/v1/claims/USERNAME/ada",
                             params={"cell_id": "cell-1", "owner_type": "USER", "owner_id": 1}, timeout=30)
    assert destroyed.status_code == 200 and destroyed.json()["decisions"][0]["type"] == "ClaimsDestroyed"
    assert get(f"{url}/v1/claims/USERNAME/ada").status_code == 404

    with psycopg.connect(settings.libpq_url) as conn:
        decided = conn.execute("SELECT count(*) FROM processed_events WHERE event_id = %s", (request_id,)).fetchone()
        outbox = conn.execute("SELECT count(*) FROM topology_outbox").fetchone()
        clear = conn.execute("SELECT count(*) FROM claims WHERE value ILIKE '%%example.com%%'").fetchone()
    assert decided == (1,)
    assert outbox is not None and outbox[0] >= 6  # every decision is on its way to the decision log
    assert clear == (0,)


@pytest.mark.both_brokers
def test_an_uncommitted_lease_expires_by_log_time_and_frees_its_claims(stack: tuple[str, Settings]) -> None:
    url, _ = stack
    granted = begin(url, "cell-1", 1, [("NAMESPACE", "short-lived")], lease_ttl_ms=1000)
    assert granted.status_code == 201
    lease_id = granted.json()["decisions"][0]["lease_id"]
    wait_until(lambda: get(f"{url}/v1/claims/NAMESPACE/short-lived").status_code == 404, timeout_s=20,
               interval_s=0.1, what="the lease to expire")
    late = post(f"{url}/v1/leases/{lease_id}/commit", json={"cell_id": "cell-1"}, timeout=30)
    assert late.status_code == 409 and late.json()["error"]["code"] == "lease_expired"
    assert begin(url, "cell-2", 5, [("NAMESPACE", "short-lived")]).status_code == 201


RACE_VALUES = 1000  # the figure: about 40 s on two cores


def test_cells_racing_for_the_same_values_get_exactly_one_winner_each(stack: tuple[str, Settings]) -> None:
    url, settings = stack
    values = [f"race-{n}" for n in range(RACE_VALUES)]
    cells = ["cell-1", "cell-2", "cell-3"]

    async def race() -> list[httpx.Response]:
        # 300 requests in flight at any moment, the cells' requests for one value side by
        # side. (Thousands queued inside httpx's pool made the client itself the bottleneck:
        # its queue is scanned per request, and the server sat idle.)
        in_flight = asyncio.Semaphore(300)
        # Idle sockets are dropped well before uvicorn's 5 s keep-alive timeout: reusing one
        # the server is closing at that instant fails the POST with a ReadError.
        async with httpx.AsyncClient(timeout=60, headers=CLAIMS_AUTH,
                                     limits=httpx.Limits(max_connections=300, keepalive_expiry=1)) as client:

            async def claim(cell: str, n: int, value: str) -> httpx.Response:
                async with in_flight:
                    return await client.post(f"{url}/v1/claims", json={
                        "cell_id": cell, "owner_type": "GROUP", "owner_id": n,
                        "claims": [{"bucket": "NAMESPACE", "value": value}],
                        # The race is about uniqueness, not expiry: no winner's lease may end
                        # while the race is still being decided on a loaded machine.
                        "lease_ttl_ms": 3_600_000})

            return await asyncio.gather(*(claim(cell, n, value) for n, value in enumerate(values) for cell in cells))

    started = time.monotonic()
    responses = asyncio.run(race())
    assert time.monotonic() - started < 300  # a hang guard, not a benchmark: about 40-80 s on two cores
    by_value: dict[str, list[httpx.Response]] = {}
    for response in responses:
        assert response.status_code in (201, 409), response.text
        value = response.request.read().decode()
        by_value.setdefault(next(v for v in values if f'"{v}"' in value), []).append(response)
    for value, answers in by_value.items():
        winners = [a for a in answers if a.status_code == 201]
        assert len(winners) == 1, value
        winner_cell = winners[0].json()["decisions"][0]["cell_id"]
        for loser in (a for a in answers if a.status_code == 409):
            assert [c["cell_id"] for c in loser.json()["error"]["conflicts"]] == [winner_cell]


def test_claim_calls_need_a_token_with_the_claims_scopes(stack: tuple[str, Settings]) -> None:
    url, _ = stack
    body = {"cell_id": "cell-1", "owner_type": "USER", "owner_id": 1, "claims": [{"bucket": "USERNAME", "value": "x"}]}
    anonymous = httpx.post(f"{url}/v1/claims", json=body, timeout=30)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthenticated"
    router_token = httpx.post(f"{url}/v1/claims", json=body, headers=AUTH, timeout=30)
    assert router_token.status_code == 403 and "claims:write" in router_token.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/claims/USERNAME/x", headers=AUTH).status_code == 403
    assert httpx.get(f"{url}/v1/owners/USER/1", params={"cell_id": "cell-1"}).status_code == 401


async def register(settings: Settings, cell_id: str) -> None:
    async with EventPublisher(settings) as publisher:
        await publisher.publish(CellRegistered(source="ops", cell_id=cell_id, address=f"https://{cell_id}.example.com",
                                               session_prefix=cell_id, region="eu"))


def test_classify_login_finds_the_cell_of_a_username_or_email(stack: tuple[str, Settings]) -> None:
    url, settings = stack
    granted = begin(url, "cell-2", 9, [("USERNAME", "Grace"), ("EMAIL", "grace@example.com")])
    lease_id = granted.json()["decisions"][0]["lease_id"]
    leased = httpx.get(f"{url}/v1/classify", params={"type": "LOGIN", "value": "grace"}, headers=AUTH)
    assert leased.status_code == 404  # a leased login does not route yet
    assert post(f"{url}/v1/leases/{lease_id}/commit", json={"cell_id": "cell-2"}, timeout=30).status_code == 200
    unknown_cell = httpx.get(f"{url}/v1/classify", params={"type": "LOGIN", "value": "grace"}, headers=AUTH)
    assert unknown_cell.status_code == 404 and "cell-2" in unknown_cell.json()["error"]["message"]

    asyncio.run(register(settings, "cell-2"))
    wait_until(lambda: httpx.get(f"{url}/v1/cells/cell-2", headers=AUTH).status_code == 200, timeout_s=20,
               what="cell-2 in the snapshot")
    by_email = httpx.get(f"{url}/v1/classify", params={"type": "LOGIN", "value": "Grace@Example.com"}, headers=AUTH)
    assert by_email.status_code == 200
    assert by_email.json()["cell"]["address"] == "https://cell-2.example.com"
    assert by_email.json()["type"] == "LOGIN"


def test_audit_history_over_http_needs_audit_read_and_hides_emails(stack: tuple[str, Settings]) -> None:
    url, _ = stack
    granted = begin(url, "cell-1", 3, [("EMAIL", "Lin@Example.com")])
    assert granted.status_code == 201
    params = {"type": "EMAIL", "value": "lin@example.com"}
    assert httpx.get(f"{url}/v1/audit/history", params=params, headers=AUTH).status_code == 403
    history = get(f"{url}/v1/audit/history", params=params)
    assert history.status_code == 200
    events = history.json()["events"]
    assert [e["event_type"] for e in events] == ["ClaimsRequested"]
    assert events[0]["outcome"] == "applied" and events[0]["decisions"][0]["type"] == "LeaseGranted"
    assert "lin@example.com" not in history.text.lower()  # no audit:pii scope: hashes only
    assert history.json()["truncated"] is False
    # A second event on the key; a page of one says there is more.
    lease_id = granted.json()["decisions"][0]["lease_id"]
    assert post(f"{url}/v1/leases/{lease_id}/commit", json={"cell_id": "cell-1"}, timeout=30).status_code == 200
    page = get(f"{url}/v1/audit/history", params={**params, "limit": "1"})
    assert page.status_code == 200 and page.json()["truncated"] is True
    assert [e["event_type"] for e in page.json()["events"]] == ["ClaimsRequested"]
