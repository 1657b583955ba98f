"""Bad input at every door of the read API, over real HTTP: each answer is a 4xx with
``{"error": {"code", "message"}}`` naming the problem, never a 500 or a stack trace;
bodies, pages, values and long-polls are bounded; a PostgreSQL outage is a 503 with
Retry-After; the OpenAPI document says all of it."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from psycopg import sql

from tests.conftest import AUTH, CLAIMS_AUTH
from tests.integration.processes import read_api, wait_until
from tests.integration.test_outages import own_postgres, postgres_start, postgres_stop  # noqa: F401 - a fixture
from tests.integration.test_read_api import CELL, claim, commit
from topology_store.projector.migrate import upgrade_to_head
from topology_store.query_api.app import create_app
from topology_store.runtime.settings import Settings

pytestmark = pytest.mark.integration

BODY_LIMIT = 8192


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """The read API (no projector: everything here is refused before anything is published)."""
    limited = settings.model_copy(update={"api_max_body_bytes": BODY_LIMIT})
    commit(limited, [CELL, claim("gitlab-org")])
    with read_api(limited, tmp_path / "api.log") as url:
        yield url
    log = (tmp_path / "api.log").read_text(errors="replace")
    assert "Traceback" not in log and "unhandled" not in log, log[-5000:]


def assert_error(response: httpx.Response, status: int, code: str, *mentions: str) -> dict[str, Any]:
    """A JSON error of this status and code whose message names each of ``mentions``."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    for mention in mentions:
        assert mention in body["error"]["message"], (mention, body)
    assert "Traceback" not in response.text
    return body["error"]  # type: ignore[no-any-return]


VALID_BEGIN = {"cell_id": "cell-1", "owner_type": "USER", "owner_id": 1,
               "claims": [{"bucket": "USERNAME", "value": "ada"}]}


def with_claims(*claims: dict[str, Any]) -> dict[str, Any]:
    return {**VALID_BEGIN, "claims": list(claims)}


BAD_BODIES: list[tuple[Any, str]] = [
    ({**VALID_BEGIN, "cell_id": "Cell_1"}, "cell_id"),  # not a DNS label
    ({**VALID_BEGIN, "cell_id": "c" * 64}, "cell_id"),
    ({**VALID_BEGIN, "owner_type": "ROBOT"}, "owner_type"),
    ({**VALID_BEGIN, "owner_id": 2**63}, "owner_id"),  # beyond a PostgreSQL bigint
    ({**VALID_BEGIN, "owner_id": -1}, "owner_id"),
    ({**VALID_BEGIN, "lease_ttl_ms": 10**12}, "lease_ttl_ms"),
    ({**VALID_BEGIN, "claims": []}, "claims"),
    ({**VALID_BEGIN, "request_id": "not-a-uuid"}, "request_id"),
    (with_claims(*({"bucket": "KEY", "value": f"k{n}"} for n in range(101))), "claims"),
    (with_claims({"bucket": "PLANET", "value": "earth"}), "bucket"),
    (with_claims({"bucket": "KEY", "value": "k" * 256}), "value"),
    (with_claims({"bucket": "NAMESPACE", "value": "a/b"}), "path segment"),
    (with_claims({"bucket": "EMAIL", "value": "not-an-email"}), "local@domain"),
    (with_claims({"bucket": "USERNAME", "value": "ada\x00"}), "NUL"),
    (with_claims({"bucket": "USERNAME", "value": "ada"}, {"bucket": "USERNAME", "value": "ADA"}), "once"),
    ({k: v for k, v in VALID_BEGIN.items() if k != "cell_id"}, "cell_id"),
    ([VALID_BEGIN], "body"),  # an array, not an object
]


def failed(check: Callable[[], object], case: object) -> list[str]:
    """[] when ``check`` passes, else one line naming the case: every case of a table is
    tried against one server and the failures are reported together."""
    try:
        check()
    except AssertionError as exc:
        return [f"{case!r}: {exc}"]
    return []


def test_claim_bodies_that_break_a_rule_are_400_naming_the_field(api: str) -> None:
    failures = [line for body, mention in BAD_BODIES for line in failed(lambda: assert_error(
        httpx.post(f"{api}/v1/claims", json=body, headers=CLAIMS_AUTH, timeout=10),
        400, "invalid_request", mention), body)]
    assert not failures, "\n".join(failures)


UNREADABLE_BODIES: list[tuple[bytes, str, str]] = [
    (b'{"cell_id": "cell-1",', "application/json", "JSON"),
    (b'{"cell_id": "\xff"}', "application/json", "body"),  # not UTF-8
    (b"[" * 2000 + b"]" * 2000, "application/json", "body"),  # deeper than the JSON parser recurses
    (b'{"cell_id": "cell-1", "owner_type": "USER", "owner_id": 1, "claims": [{"bucket": "KEY", '
     b'"value": "\\ud800"}]}', "application/json", "value"),  # a lone surrogate
    (json.dumps(VALID_BEGIN).encode(), "text/plain", "body"),
]


def test_unreadable_bodies_are_400(api: str) -> None:
    def check(content: bytes, content_type: str, mention: str) -> None:
        response = httpx.post(f"{api}/v1/claims", content=content, timeout=10,
                              headers={**CLAIMS_AUTH, "Content-Type": content_type})
        code = "bad_request" if response.json()["error"]["code"] == "bad_request" else "invalid_request"
        assert_error(response, 400, code, mention)

    failures = [line for case in UNREADABLE_BODIES for line in failed(lambda: check(*case), case[:2])]
    assert not failures, "\n".join(failures)


def raw_exchange(url: str, request: bytes, timeout_s: float = 5) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 exchange on a socket: (status, JSON body). Times out if the server
    waits for more than was sent."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_an_oversize_body_is_413_before_it_is_read(api: str) -> None:
    token = CLAIMS_AUTH["Authorization"].encode()
    # Content-Length far past the limit and no body sent at all: an answer proves nothing was read.
    started = time.monotonic()
    status, body = raw_exchange(api, b"POST /v1/claims HTTP/1.1\r\nHost: api\r\nConnection: close\r\n"
                                b"Authorization: " + token + b"\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 1000000000\r\n\r\n")
    assert time.monotonic() - started < 3
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    assert str(BODY_LIMIT) in body["error"]["message"]
    # Just over the limit, sent whole.
    over = json.dumps(with_claims({"bucket": "KEY", "value": "k" * BODY_LIMIT})).encode()
    assert_error(httpx.post(f"{api}/v1/claims", content=over, timeout=10,
                            headers={**CLAIMS_AUTH, "Content-Type": "application/json"}),
                 413, "payload_too_large", str(BODY_LIMIT))


def test_a_chunked_body_is_cut_off_once_past_the_limit(api: str) -> None:
    chunks = iter([b'{"claims": ["', *([b"x" * 1024] * (BODY_LIMIT // 1024 + 4)), b'"]}'])
    response = httpx.post(f"{api}/v1/claims", content=chunks, timeout=10,
                          headers={**CLAIMS_AUTH, "Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in response.request.headers}  # really chunked
    assert_error(response, 413, "payload_too_large")


BAD_REQUESTS: list[tuple[str, dict[str, str], dict[str, str], str, str]] = [
    ("/v1/claims/NAMESPACE/a%0Ab", {}, CLAIMS_AUTH, "bad_path", "control characters"),
    ("/v1/claims/NAMESPACE/a%00b", {}, CLAIMS_AUTH, "bad_path", "control characters"),
    ("/v1/cells/cell%0A1", {}, AUTH, "bad_path", "control characters"),
    ("/v1/claims/NAMESPACE/" + "a" * 1025, {}, CLAIMS_AUTH, "invalid_request", "value"),
    ("/v1/claims/PLANET/earth", {}, CLAIMS_AUTH, "bad_bucket", "NAMESPACE"),
    ("/v1/cells/Not_A_Label", {}, AUTH, "invalid_request", "cell_id"),
    ("/v1/owners/USER/9223372036854775808", {"cell_id": "cell-1"}, CLAIMS_AUTH, "invalid_request", "owner_id"),
    ("/v1/owners/USER/1", {"cell_id": "cell\x001"}, CLAIMS_AUTH, "invalid_request", "cell_id"),
    ("/v1/owners/ROBOT/1", {"cell_id": "cell-1"}, CLAIMS_AUTH, "invalid_request", "owner_type"),
    ("/v1/owners/USER/1", {"cell_id": "cell-1", "limit": "0"}, CLAIMS_AUTH, "invalid_request", "limit"),
    ("/v1/owners/USER/1", {"cell_id": "cell-1", "limit": "1001"}, CLAIMS_AUTH, "invalid_request", "limit"),
    ("/v1/owners/USER/1", {"cell_id": "cell-1", "after": "PLANET:x"}, CLAIMS_AUTH, "invalid_request", "after"),
    ("/v1/owners/USER/1", {"cell_id": "cell-1", "after": "KEY:\x00"}, CLAIMS_AUTH, "bad_cursor", "after"),
    ("/v1/requests/not-a-uuid", {}, CLAIMS_AUTH, "invalid_request", "request_id"),
    ("/v1/audit/history", {"type": "CELL", "value": "cell\x00"}, CLAIMS_AUTH, "bad_key", "CELL"),
    ("/v1/audit/history", {"type": "OWNER", "value": "x\x00"}, CLAIMS_AUTH, "bad_key", "OWNER"),
    ("/v1/audit/history", {"type": "LEASE", "value": "x"}, CLAIMS_AUTH, "bad_key", "UUID"),
    ("/v1/audit/history", {"type": "CELL", "value": "x" * 1025}, CLAIMS_AUTH, "invalid_request", "value"),
    ("/v1/audit/history", {"type": "EMAIL", "value": "a@b", "limit": "5000"}, CLAIMS_AUTH, "invalid_request", "limit"),
    ("/v1/audit/history", {"value": "x"}, CLAIMS_AUTH, "invalid_request", "type"),
    ("/v1/classify", {"type": "LOGIN", "value": "ada\x00"}, AUTH, "not_found", "login"),
    ("/v1/snapshot", {"wait": "forever"}, AUTH, "bad_parameter", "wait"),
    ("/v1/snapshot", {"since": "9" * 5000}, AUTH, "bad_parameter", "since"),
]


def test_bad_paths_and_query_values_are_4xx_naming_the_problem(api: str) -> None:
    def check(path: str, params: dict[str, str], headers: dict[str, str], code: str, mention: str) -> None:
        response = httpx.get(f"{api}{path}", params=params, headers=headers, timeout=10)
        assert_error(response, 404 if code == "not_found" else 400, code, mention)

    failures = [line for case in BAD_REQUESTS for line in failed(lambda: check(*case), case[:2])]
    assert len(BAD_REQUESTS) > 20 and not failures, "\n".join(failures)


def test_destroy_and_lease_calls_refuse_bad_input_before_publishing(api: str) -> None:
    base = {"cell_id": "cell-1", "owner_type": "USER", "owner_id": "1"}
    destroy = httpx.delete(f"{api}/v1/claims/USERNAME/a%2Fb", params=base, headers=CLAIMS_AUTH, timeout=10)
    assert_error(destroy, 400, "invalid_request", "path segment")
    too_big = httpx.delete(f"{api}/v1/claims/USERNAME/ada", params={**base, "owner_id": str(2**64)},
                           headers=CLAIMS_AUTH, timeout=10)
    assert_error(too_big, 400, "invalid_request", "owner_id")
    lease = httpx.post(f"{api}/v1/leases/not-a-uuid/commit", json={"cell_id": "cell-1"}, headers=CLAIMS_AUTH,
                       timeout=10)
    assert_error(lease, 400, "invalid_request", "lease_id")
    cell = httpx.post(f"{api}/v1/leases/{'0' * 8}-0000-0000-0000-{'0' * 12}/rollback", json={"cell_id": "CELL 1"},
                      headers=CLAIMS_AUTH, timeout=10)
    assert_error(cell, 400, "invalid_request", "cell_id")


def test_unknown_routes_and_methods_answer_json_errors(api: str) -> None:
    assert_error(httpx.get(f"{api}/v2/nothing", timeout=10), 404, "not_found")
    wrong_method = httpx.put(f"{api}/v1/claims", json={}, headers=CLAIMS_AUTH, timeout=10)
    assert_error(wrong_method, 405, "method_not_allowed")
    assert "POST" in wrong_method.headers["allow"]
    assert_error(httpx.post(f"{api}/v1/claims", json=VALID_BEGIN, headers=AUTH, timeout=10),
                 403, "insufficient_scope", "claims:write")


def test_the_openapi_document_declares_every_error_with_the_error_document(api: str) -> None:
    document = httpx.get(f"{api}/openapi.json", timeout=10).json()
    refs = {"#/components/schemas/ErrorDocument", "#/components/schemas/GoneDocument",
            "#/components/schemas/PendingAnswer"}
    operations = [(path, method, op) for path, item in document["paths"].items() for method, op in item.items()]
    assert len(operations) >= 15
    for path, method, operation in operations:
        responses = operation["responses"]
        assert "422" not in responses, (path, method)
        for status, response in responses.items():
            if status[0] in "45":
                schema = response["content"]["application/json"]["schema"]
                assert schema.get("$ref") in refs, (path, method, status, schema)
        if path.startswith("/v1/"):
            assert operation.get("security"), (path, method)
            assert {"401", "403"} <= set(responses), (path, method)
        if operation.get("parameters") or operation.get("requestBody"):
            assert "400" in responses, (path, method)
        if operation.get("requestBody"):
            assert "413" in responses, (path, method)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert "stale" in document["paths"]["/readyz"]["get"]["summary"]
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    for path in ("/v1/claims/{bucket}/{value}", "/v1/owners/{owner_type}/{owner_id}", "/v1/audit/history"):
        assert "503" in document["paths"][path]["get"]["responses"], path


def test_owner_pages_are_bounded_and_follow_on(api: str, settings: Settings) -> None:
    commit(settings, [claim(f"group-{n}") for n in range(5)], start=2)  # after the api fixture's two
    first = httpx.get(f"{api}/v1/owners/GROUP/42", params={"cell_id": "cell-1", "limit": "4"}, headers=CLAIMS_AUTH,
                      timeout=10).json()
    assert [c["value"] for c in first["claims"]] == ["gitlab-org", "group-0", "group-1", "group-2"]
    rest = httpx.get(f"{api}/v1/owners/GROUP/42", params={"cell_id": "cell-1", "limit": "4",
                                                            "after": first["next_after"]},
                     headers=CLAIMS_AUTH, timeout=10).json()
    assert [c["value"] for c in rest["claims"]] == ["group-3", "group-4"] and rest["next_after"] is None


def test_an_unexpected_exception_is_a_json_500_without_its_trace() -> None:
    app: FastAPI = create_app(Settings())

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals at /srv/app.py line 12")

    async def call() -> httpx.Response:
        # The lifespan is not needed by this route; the app is the one `topology serve` runs.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.get("/boom")

    response = asyncio.run(call())
    error = assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert "logged" in error["message"]


def test_a_postgresql_outage_is_503_with_retry_after_on_every_database_route(
    settings: Settings, own_postgres: Any, tmp_path: Path  # noqa: F811 - the fixture imported above
) -> None:
    with psycopg.connect(own_postgres.get_uri("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("topology")))
    own = settings.model_copy(update={"database_url": own_postgres.get_uri("topology")})
    upgrade_to_head(own.sqlalchemy_url)
    commit(own, [CELL, claim("gitlab-org")])
    lookups = [
        ("GET", "/v1/claims/NAMESPACE/gitlab-org", {}, CLAIMS_AUTH),
        ("GET", "/v1/owners/GROUP/42", {"cell_id": "cell-1"}, CLAIMS_AUTH),
        ("GET", f"/v1/requests/{'0' * 8}-0000-0000-0000-{'0' * 12}", {}, CLAIMS_AUTH),
        ("GET", "/v1/audit/history", {"type": "NAMESPACE", "value": "gitlab-org"}, CLAIMS_AUTH),
        ("GET", "/v1/classify", {"type": "LOGIN", "value": "ada"}, AUTH),
        ("POST", "/v1/claims", VALID_BEGIN, CLAIMS_AUTH),  # refused before anything is published
    ]

    def call(method: str, path: str, params: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        if method == "POST":
            return httpx.post(f"{api}{path}", json=params, headers=headers, timeout=30)
        return httpx.get(f"{api}{path}", params=params, headers=headers, timeout=30)

    with read_api(own, tmp_path / "api.log") as api:
        assert call(*lookups[0]).status_code == 200
        postgres_stop(own_postgres)
        try:
            for lookup in lookups:
                response = call(*lookup)
                assert_error(response, 503, "database_unavailable", "PostgreSQL")
                assert int(response.headers["retry-after"]) > 0
            # What is in memory is still served (README "Reliability").
            assert httpx.get(f"{api}/v1/snapshot", headers=AUTH, timeout=10).status_code == 200
            assert httpx.get(f"{api}/readyz", timeout=10).json()["stale"] is True
        finally:
            postgres_start(own_postgres)
        wait_until(lambda: call(*lookups[0]).status_code == 200, timeout_s=30,
                   what="lookups to answer again without a restart")
    log = (tmp_path / "api.log").read_text(errors="replace")
    assert "Traceback" not in log and "unhandled" not in log, log[-5000:]
