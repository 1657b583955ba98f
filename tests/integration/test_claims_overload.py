"""Backpressure of the claims doors on the real stack (adr/0018): past a tiny budget a begin is
answered 429 with Retry-After (HTTP) or RESOURCE_EXHAUSTED (gRPC's BeginUpdate) at once and
never published, while a commit is still admitted and decided, so no lease is lost to our own
backlog. Both doors of one ``topology serve`` share the budget."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AUTH, CLAIMS_AUTH, TEST_CLAIMS_TOKEN
from tests.integration.processes import start, stop, wait_until
from tests.integration.test_grpc_api import Door, publish, serve
from topology_store.runtime.settings import Settings
from topology_store.schemas.generated.proto.claims.v1 import messages_pb2, service_pb2, service_pb2_grpc
from topology_store.schemas.models import CellRegistered

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(topics: Settings, tmp_path: Path) -> Iterator[tuple[Door, Settings, int]]:
    # Two decisions awaited at most; the age budget is out of the way (the pause is short).
    settings = topics.model_copy(update={"decision_wait_s": 30.0, "claims_max_in_flight": 2,
                                         "claims_max_wait_age_ms": 60_000})
    # cell-1, GitLab's cell 1 (the number its name ends with), so that BeginUpdate names it.
    asyncio.run(publish(settings, [CellRegistered(source="ops", cell_id="cell-1", address="https://cell-1.example.com",
                                                  session_prefix="cell-1-", region="eu")]))
    projector = start(["project"], settings, tmp_path / "projector.log")
    try:
        with serve(settings, tmp_path / "api.log", cell_ids="{}") as door:
            wait_until(lambda: bool(httpx.get(f"{door.http}/v1/snapshot", headers=AUTH, timeout=2).json()["cells"]),
                       timeout_s=60, what="cell-1 in the snapshot")
            yield door, settings, projector.pid
    finally:
        os.kill(projector.pid, signal.SIGCONT)  # never leave it stopped
        assert stop(projector) == 0, (tmp_path / "projector.log").read_text()[-3000:]


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("topology_api_claim_"):
                key = sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items()))
                found[key] = sample.value
    return found


def begin_body(value: str, request_id: uuid.UUID | None = None) -> dict[str, object]:
    body: dict[str, object] = {"cell_id": "cell-1", "owner_type": "USER", "owner_id": 1,
                               "claims": [{"bucket": "USERNAME", "value": value},
                                          {"bucket": "EMAIL", "value": f"{value}@example.com"}]}
    if request_id is not None:
        body["request_id"] = str(request_id)
    return body


def begin_update(door: Door, value: str) -> tuple[grpc.StatusCode, float]:
    """GitLab's BeginUpdate for a username on cell 1: its status code and how long it took."""
    request = service_pb2.BeginUpdateRequest(cell_id=1, create_records=[messages_pb2.Metadata(
        bucket=messages_pb2.Bucket(type=messages_pb2.Bucket.USERNAMES, value=value),
        subject=messages_pb2.Subject(type=messages_pb2.Subject.USER, id=7),
        source=messages_pb2.Source(type=messages_pb2.Source.RAILS_TABLE_USERS, rails_primary_key_id=(7).to_bytes(8, "big")))])
    started = time.perf_counter()
    with door.channel() as channel:
        try:
            service_pb2_grpc.ClaimServiceStub(channel).BeginUpdate(
                request, metadata=(("authorization", f"Bearer {TEST_CLAIMS_TOKEN}"),), timeout=20)
        except grpc.RpcError as error:
            return error.code(), time.perf_counter() - started
    return grpc.StatusCode.OK, time.perf_counter() - started


def test_overload_sheds_begins_at_once_unpublished_and_commits_still_pass(
        stack: tuple[Door, Settings, int]) -> None:
    door, settings, projector_pid = stack
    url = door.http
    auth = CLAIMS_AUTH
    granted = httpx.post(f"{url}/v1/claims", json=begin_body("lease-a"), headers=auth, timeout=30)
    assert granted.status_code == 201, granted.text
    lease_a = granted.json()["decisions"][0]["lease_id"]
    before = metrics(url)
    assert before["topology_api_claim_requests_in_flight"] == 0

    async def overloaded() -> tuple[list[httpx.Response], httpx.Response, float, httpx.Response, dict[str, float],
                                    tuple[grpc.StatusCode, float]]:
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as client:
            # No decision can come while the projector is stopped: two begins fill the budget.
            os.kill(projector_pid, signal.SIGSTOP)
            try:
                waiting = [asyncio.create_task(client.post("/v1/claims", json=begin_body(f"waits-{n}")))
                           for n in range(2)]
                for _ in range(400):
                    if metrics(url)["topology_api_claim_requests_in_flight"] == 2:
                        break
                    await asyncio.sleep(0.025)
                else:
                    raise AssertionError(f"the two begins never showed as in flight: {metrics(url)}")
                started = time.perf_counter()
                shed = await client.post("/v1/claims", json=begin_body("shed", shed_id))
                shed_after = time.perf_counter() - started
                # gRPC's BeginUpdate shares the budget: refused as RESOURCE_EXHAUSTED, just as fast.
                grpc_shed = await asyncio.to_thread(begin_update, door, "grpc-shed")
                # A commit past the budget is admitted: it is published and waits with the others.
                commit = asyncio.create_task(client.post(f"/v1/leases/{lease_a}/commit", json={"cell_id": "cell-1"}))
                for _ in range(400):
                    if metrics(url)["topology_api_claim_requests_in_flight"] == 3:
                        break
                    await asyncio.sleep(0.025)
                else:
                    raise AssertionError(f"the commit was not admitted: {metrics(url)}")
                during = metrics(url)
            finally:
                os.kill(projector_pid, signal.SIGCONT)
            return list(await asyncio.gather(*waiting)), shed, shed_after, await commit, during, grpc_shed

    shed_id = uuid.uuid4()
    waited, shed, shed_after, committed, during, (grpc_code, grpc_after) = asyncio.run(overloaded())

    assert shed.status_code == 429, shed.text
    assert shed.json()["error"]["code"] == "overloaded"
    assert int(shed.headers["Retry-After"]) >= 1
    assert shed_after < 1.0, f"the refusal took {shed_after:.3f}s: it must not wait for anything"
    assert (grpc_code, grpc_after < 1.0) == (grpc.StatusCode.RESOURCE_EXHAUSTED, True), (grpc_code, grpc_after)
    assert during["topology_api_claim_requests_shed_total{reason=in_flight}"] == 2  # the HTTP and the gRPC begin
    assert during["topology_api_claim_oldest_wait_seconds"] > 0
    assert [r.status_code for r in waited] == [201, 201], [r.text for r in waited]
    assert committed.status_code == 200, committed.text  # never lease_expired, never 429
    assert committed.json()["decisions"][0]["type"] == "LeaseCommitted"
    after = metrics(url)
    assert after["topology_api_claim_requests_in_flight"] == 0
    assert after["topology_api_claim_requests_admitted_total"] == before["topology_api_claim_requests_admitted_total"] + 3

    # The shed request was never published: the projector has decided everything sent after
    # it (the commit, then a fresh begin) and holds no trace of it; its values are free.
    later = httpx.post(f"{url}/v1/claims", json=begin_body("later"), headers=auth, timeout=30)
    assert later.status_code == 201
    with psycopg.connect(settings.libpq_url) as conn:
        assert conn.execute("SELECT count(*) FROM processed_events WHERE event_id = %s", (shed_id,)).fetchone() == (0,)
    assert httpx.get(f"{url}/v1/claims/USERNAME/shed", headers=auth, timeout=10).status_code == 404
    assert httpx.get(f"{url}/v1/claims/USERNAME/grpc-shed", headers=auth, timeout=10).status_code == 404
    # The shed BeginUpdate, sent again, is granted.
    assert begin_update(door, "grpc-shed")[0] == grpc.StatusCode.OK
    assert httpx.get(f"{url}/v1/requests/{shed_id}", headers=auth, timeout=10).status_code == 404
    # The same request, sent again once the backlog is gone, is admitted and granted.
    retried = httpx.post(f"{url}/v1/claims", json=begin_body("shed", shed_id), headers=auth, timeout=30)
    assert retried.status_code == 201, retried.text
    wait_until(lambda: httpx.get(f"{url}/v1/claims/USERNAME/lease-a", headers=auth, timeout=10).json()["status"]
               == "COMMITTED", timeout_s=10, what="lease A committed")
