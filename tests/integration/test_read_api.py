"""The read API over real HTTP (uvicorn in a child process) on a real database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH, CLAIMS_AUTH
from tests.integration.processes import read_api, wait_until
from topology_store.core.fold import PositionedEvent
from topology_store.projector.store import PartitionAdvance, ProjectionStore
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import CellRegistered, ClaimBucket, ClaimCreated, Event, OwnerType, protect_value

pytestmark = pytest.mark.integration


def commit(settings: Settings, events: list[Event], topic: str = "t", start: int = 0) -> None:
    """Project events straight through the store (the Kafka side is tested elsewhere)."""

    async def run() -> None:
        engine = create_engine(settings.sqlalchemy_url)
        store = ProjectionStore(engine, settings.claim_secret)
        try:
            await store.stored_offsets([(topic, 0)])
            positioned = [PositionedEvent(e, topic, 0, start + n) for n, e in enumerate(events)]
            await store.commit_batch(positioned, [], {(topic, 0): PartitionAdvance(start, start + len(events))})
        finally:
            await engine.dispose()

    asyncio.run(run())


def get(url: str, headers: dict[str, str] | None = None, **kwargs: object) -> httpx.Response:
    """GET with the test router's bearer token (routing data is not public)."""
    return httpx.get(url, headers={**AUTH, **(headers or {})}, **kwargs)  # type: ignore[arg-type]


CELL = CellRegistered(source="ops", cell_id="cell-1", address="https://c1.example.com", session_prefix="c1", region="eu")


def claim(value: str, bucket: ClaimBucket = ClaimBucket.NAMESPACE) -> ClaimCreated:
    return ClaimCreated(source="cell-1", bucket=bucket, value=value, cell_id="cell-1",
                        owner_type=OwnerType.GROUP, owner_id=42)


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[str]:
    commit(settings, [CELL, claim("gitlab-org"), claim("someone@example.com", ClaimBucket.EMAIL)])
    with read_api(settings, tmp_path / "api.log") as url:
        yield url


def test_snapshot_carries_one_version_with_etag_and_freshness(api: str) -> None:
    response = get(f"{api}/v1/snapshot", headers={"Accept-Encoding": "identity"})
    assert response.status_code == 200
    body = response.json()
    assert body["version"] == 1
    # The tag names the representation (uncompressed JSON at version 1), strong.
    assert response.headers["ETag"] == '"1-json"' and response.headers["X-Topology-Version"] == "1"
    assert response.headers["Vary"] == "Accept, Accept-Encoding"
    assert float(response.headers["X-Topology-Age-Seconds"]) >= 0
    assert body["namespaces"] == {"gitlab-org": "cell-1"}  # only NAMESPACE claims route
    assert [c["cell_id"] for c in body["cells"]] == ["cell-1"]
    assert body["cells"][0]["state"] == "PROVISIONING"


@pytest.mark.parametrize("header", ['"1"', 'W/"1"', '"0", "1"', "*", '"1-json"', 'W/"1-msgpack+zstd"',
                                    '"0-json", W/"1-json+gzip"'])
def test_if_none_match_with_the_current_version_answers_304(api: str, header: str) -> None:
    # Any tag naming version 1 (the bare version of older servers, any representation's tag).
    response = get(f"{api}/v1/snapshot", headers={"If-None-Match": header, "Accept-Encoding": "identity"})
    assert response.status_code == 304 and response.content == b""
    assert response.headers["ETag"] == '"1-json"'
    compressed = get(f"{api}/v1/snapshot", headers={"If-None-Match": header, "Accept": "application/msgpack",
                                                      "Accept-Encoding": "zstd"})
    assert compressed.status_code == 304 and compressed.headers["ETag"] == 'W/"1-msgpack+zstd"'


def test_an_older_etag_gets_the_full_snapshot(api: str) -> None:
    response = get(f"{api}/v1/snapshot", headers={"If-None-Match": '"0"'})
    assert response.status_code == 200 and response.json()["version"] == 1


def test_a_commit_reaches_the_snapshot_by_notify_well_before_the_poll(api: str, settings: Settings) -> None:
    slow_poll = settings.snapshot_poll_interval_s
    started = time.monotonic()
    commit(settings, [claim("new-group")], start=3)
    wait_until(lambda: get(f"{api}/v1/snapshot").json()["version"] == 2, timeout_s=10, interval_s=0.01,
               what="version 2")
    assert "new-group" in get(f"{api}/v1/snapshot").json()["namespaces"]
    assert time.monotonic() - started < 10 * slow_poll


def test_cells_and_cell_lookup(api: str) -> None:
    cells = get(f"{api}/v1/cells")
    assert cells.status_code == 200 and cells.json()["version"] == 1
    assert cells.json()["cells"][0]["address"] == "https://c1.example.com"
    assert get(f"{api}/v1/cells/cell-1").json()["session_prefix"] == "c1"
    missing = get(f"{api}/v1/cells/cell-9")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "cell_not_found", "message": "no cell 'cell-9'"}}


def test_claim_lookup_canonicalizes_and_explains_errors(api: str) -> None:
    found = get(f"{api}/v1/claims/NAMESPACE/GitLab-Org", headers=CLAIMS_AUTH)
    assert found.status_code == 200
    assert found.json()["cell_id"] == "cell-1" and found.json()["owner_id"] == 42
    email = get(f"{api}/v1/claims/email/Someone@Example.com", headers=CLAIMS_AUTH).json()
    assert email["value"] == protect_value("EMAIL", "someone@example.com", Settings().claim_secret)
    assert "someone" not in email["value"]  # never stored or served in clear
    absent = get(f"{api}/v1/claims/NAMESPACE/nobody", headers=CLAIMS_AUTH)
    assert absent.status_code == 404 and absent.json()["error"]["code"] == "claim_not_found"
    bad_bucket = get(f"{api}/v1/claims/PLANET/earth", headers=CLAIMS_AUTH)
    assert bad_bucket.status_code == 400 and "NAMESPACE" in bad_bucket.json()["error"]["message"]
    # A value its bucket cannot hold names no claim (the document cannot tie it to the bucket).
    impossible = get(f"{api}/v1/claims/NAMESPACE/a/b", headers=CLAIMS_AUTH)
    assert impossible.status_code == 404 and impossible.json()["error"]["code"] == "claim_not_found"
    assert "path segment" in impossible.json()["error"]["message"]


def test_health_readiness_metrics_and_openapi(api: str) -> None:
    assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api}/readyz")
    assert ready.status_code == 200 and ready.json()["version"] == 1
    get(f"{api}/v1/snapshot")
    metrics = httpx.get(f"{api}/metrics").text
    assert 'topology_api_requests_total{route="/v1/snapshot",status="200"}' in metrics
    assert "topology_api_snapshot_version 1.0" in metrics
    openapi = httpx.get(f"{api}/openapi.json").json()
    assert {"/v1/snapshot", "/v1/cells", "/v1/cells/{cell_id}", "/v1/claims/{bucket}/{value}", "/readyz"} <= set(
        openapi["paths"]
    )
    assert "304" in openapi["paths"]["/v1/snapshot"]["get"]["responses"]
