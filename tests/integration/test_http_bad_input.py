"""Bad input at every door of the read API, over real HTTP: each answer is a 4xx with
``{"error": {"code", "message"}}`` naming the problem (checked against the error
document's schema in the served OpenAPI document), never a 500 or a stack trace;
bodies, pages, values and long-polls are bounded; types are strict (no boolean or
string for an integer, one spelling of a UUID); control characters in any query value
are refused on every path, the snapshot's fast paths included; a 405's Allow is what the
document lists; a PostgreSQL outage is a 503 with Retry-After; the OpenAPI document says
all of it, and every error status it documents answers the error document."""

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
import jsonschema_rs
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

# The error document as the served OpenAPI document states it (the app builds the same
# document without starting: create_app is what ``topology serve`` runs).
_DOCUMENT = create_app(Settings()).openapi()


def schema_validator(ref: str) -> jsonschema_rs.Validator:
    """A validator of the document's schema ``ref`` (``#/components/schemas/...``)."""
    return jsonschema_rs.validator_for({"$ref": ref, "components": _DOCUMENT["components"]})


ERROR_DOCUMENT = schema_validator("#/components/schemas/ErrorDocument")


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
    assert ERROR_DOCUMENT.is_valid(body), body
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
    # Strict types: JSON integers only, one spelling of a UUID, no field the document does not name.
    ({**VALID_BEGIN, "owner_id": False}, "owner_id"),  # was accepted as owner 0
    ({**VALID_BEGIN, "owner_id": True}, "owner_id"),
    ({**VALID_BEGIN, "owner_id": "1"}, "owner_id"),
    ({**VALID_BEGIN, "owner_id": 1.5}, "owner_id"),
    ({**VALID_BEGIN, "lease_ttl_ms": "60000"}, "lease_ttl_ms"),
    ({**VALID_BEGIN, "request_id": "0123456789abcdef0123456789abcdef"}, "request_id"),  # no hyphens
    ({**VALID_BEGIN, "lease_id": "{01234567-89ab-cdef-0123-456789abcdef}"}, "lease_id"),
    ({**VALID_BEGIN, "lease_id": "urn:uuid:01234567-89ab-cdef-0123-456789abcdef"}, "lease_id"),
    ({**VALID_BEGIN, "owner": 1}, "owner"),  # a typo is not silently ignored
    (with_claims({"bucket": "USERNAME", "value": "ada", "cell_id": "cell-1"}), "cell_id"),
    (with_claims({"value": "ada"}), "bucket"),
    # Per-bucket formats, as the document's patterns say them.
    (with_claims({"bucket": "NAMESPACE", "value": "\u212a"}), "path segment"),  # KELVIN SIGN lower-cases to k
    (with_claims({"bucket": "EMAIL", "value": "HMAC-SHA256:ada@example.com"}), "protected"),
    (with_claims({"bucket": "EMAIL", "value": "a\u0085@example.com"}), "control"),  # C1 NEL
    (with_claims({"bucket": "KEY", "value": "ssh-ed25519 AAAA\tx"}), "control"),
    (with_claims({"bucket": "ORGANIZATION_ID", "value": "9223372036854775808"}), "ORGANIZATION_ID"),
    (with_claims({"bucket": "ORGANIZATION_ID", "value": "007"}), "ORGANIZATION_ID"),
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
    failures = [line for body, mention in BAD_BODIES for line in failed(lambda body=body, mention=mention: assert_error(
        httpx.post(f"{api}/v1/claims", json=body, headers=CLAIMS_AUTH, timeout=10),
        400, "invalid_request", mention), body)]
    assert not failures, "\n".join(failures)


UNREADABLE_BODIES: list[tuple[bytes, str, str]] = [
    (b'{"cell_id": "cell-1",', "application/json", "JSON"),
    (b'{"cell_id": "\xff"}', "application/json", "body"),  # not UTF-8
    (b"[" * 2000 + b"]" * 2000, "application/json", "body"),  # deeper than the JSON parser recurses
    ((b'{"cell_id": "cell-1", "owner_type": "USER", "owner_id": 1, "claims": [{"bucket": "KEY", '
      b'"value": "\\ud800"}]}'), "application/json", "value"),  # a lone surrogate
    (json.dumps(VALID_BEGIN).encode(), "text/plain", "body"),
]


def test_unreadable_bodies_are_400(api: str) -> None:
    def check(content: bytes, content_type: str, mention: str) -> None:
        response = httpx.post(f"{api}/v1/claims", content=content, timeout=10,
                              headers={**CLAIMS_AUTH, "Content-Type": content_type})
        code = "bad_request" if response.json()["error"]["code"] == "bad_request" else "invalid_request"
        assert_error(response, 400, code, mention)

    failures = [line for case in UNREADABLE_BODIES for line in failed(lambda case=case: check(*case), case[:2])]
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
    ("/v1/owners/USER/1", {"cell_id": "cell\x001"}, CLAIMS_AUTH, "bad_query", "cell_id"),
    ("/v1/owners/ROBOT/1", {"cell_id": "cell-1"}, CLAIMS_AUTH, "invalid_request", "owner_type"),
    ("/v1/owners/USER/1", {"cell_id": "cell-1", "limit": "0"}, CLAIMS_AUTH, "invalid_request", "limit"),
    ("/v1/owners/USER/1", {"cell_id": "cell-1", "limit": "1001"}, CLAIMS_AUTH, "invalid_request", "limit"),
    ("/v1/owners/USER/1", {"cell_id": "cell-1", "after": "PLANET:x"}, CLAIMS_AUTH, "invalid_request", "after"),
    ("/v1/owners/USER/1", {"cell_id": "cell-1", "after": "KEY:\x00"}, CLAIMS_AUTH, "bad_query", "after"),
    ("/v1/requests/not-a-uuid", {}, CLAIMS_AUTH, "invalid_request", "request_id"),
    ("/v1/audit/history", {"type": "CELL", "value": "cell\x00"}, CLAIMS_AUTH, "bad_query", "value"),
    ("/v1/audit/history", {"type": "OWNER", "value": "x\x00"}, CLAIMS_AUTH, "bad_query", "value"),
    # A value no key of the type can have: 404 (the document cannot tie value's format to type).
    ("/v1/audit/history", {"type": "LEASE", "value": "x"}, CLAIMS_AUTH, "bad_key", "UUID"),
    ("/v1/audit/history", {"type": "CELL", "value": "Cell_1"}, CLAIMS_AUTH, "bad_key", "CELL"),
    ("/v1/audit/history", {"type": "OWNER", "value": "cell-1/ROBOT/1"}, CLAIMS_AUTH, "bad_key", "OWNER"),
    ("/v1/audit/history", {"type": "EMAIL", "value": "nobody"}, CLAIMS_AUTH, "bad_key", "local@domain"),
    ("/v1/audit/history", {"type": "u\u017fername", "value": "ada"}, CLAIMS_AUTH, "bad_type", "USERNAME"),
    ("/v1/audit/history", {"type": "CELL", "value": "x" * 1025}, CLAIMS_AUTH, "invalid_request", "value"),
    ("/v1/audit/history", {"type": "EMAIL", "value": "a@b", "limit": "5000"}, CLAIMS_AUTH, "invalid_request", "limit"),
    ("/v1/audit/history", {"value": "x"}, CLAIMS_AUTH, "invalid_request", "type"),
    ("/v1/classify", {"type": "LOGIN", "value": "ada\x00"}, AUTH, "bad_query", "value"),
    ("/v1/classify", {"type": "LOG\u0131N", "value": "ada"}, AUTH, "bad_type", "LOGIN"),  # dotless i upper-cases to I
    ("/v1/snapshot", {"wait": "forever"}, AUTH, "bad_parameter", "wait"),
    ("/v1/snapshot", {"wait": "\u0663s"}, AUTH, "bad_parameter", "wait"),  # an Arabic-Indic 3
    ("/v1/snapshot", {"since": "9" * 5000}, AUTH, "bad_parameter", "since"),
    ("/v1/snapshot", {"since": str(2**63)}, AUTH, "bad_parameter", "since"),
    # Integers in paths and queries are decimal digits, nothing else Python's int() reads.
    *(("/v1/snapshot", {"min_version": bad}, AUTH, "bad_parameter", "min_version") for bad in ("+1", " 1", "1_0", "1.0")),
    *(("/v1/owners/USER/1", {"cell_id": "cell-1", "limit": bad}, CLAIMS_AUTH, "invalid_request", "limit")
      for bad in ("+1", " 1", "1_0", "1.0", "\u0663")),
    ("/v1/owners/USER/+1", {"cell_id": "cell-1"}, CLAIMS_AUTH, "invalid_request", "owner_id"),
    ("/v1/requests/0123456789abcdef0123456789abcdef", {}, CLAIMS_AUTH, "invalid_request", "request_id"),
    ("/v1/claims/u\u017fername/ada", {}, CLAIMS_AUTH, "bad_bucket", "USERNAME"),  # long s upper-cases to S
    # A value its bucket cannot hold names no claim.
    ("/v1/claims/EMAIL/nobody", {}, CLAIMS_AUTH, "claim_not_found", "local@domain"),
    ("/v1/claims/NAMESPACE/a%2Fb", {}, CLAIMS_AUTH, "claim_not_found", "path segment"),
]

NOT_FOUND_CODES = {"not_found", "claim_not_found", "bad_key"}


def test_bad_paths_and_query_values_are_4xx_naming_the_problem(api: str) -> None:
    def check(path: str, params: dict[str, str], headers: dict[str, str], code: str, mention: str) -> None:
        response = httpx.get(f"{api}{path}", params=params, headers=headers, timeout=10)
        assert_error(response, 404 if code in NOT_FOUND_CODES else 400, code, mention)

    failures = [line for case in BAD_REQUESTS for line in failed(lambda case=case: check(*case), case[:2])]
    assert len(BAD_REQUESTS) > 20 and not failures, "\n".join(failures)


def test_destroy_and_lease_calls_refuse_bad_input_before_publishing(api: str) -> None:
    base = {"cell_id": "cell-1", "owner_type": "USER", "owner_id": "1"}
    # A value the bucket cannot hold names no claim: 404, nothing published.
    destroy = httpx.delete(f"{api}/v1/claims/USERNAME/a%2Fb", params=base, headers=CLAIMS_AUTH, timeout=10)
    assert_error(destroy, 404, "claim_not_found", "path segment")
    as_text = httpx.delete(f"{api}/v1/claims/USERNAME/ada", params={**base, "owner_id": "+1"}, headers=CLAIMS_AUTH,
                           timeout=10)
    assert_error(as_text, 400, "invalid_request", "owner_id")
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
    assert wrong_method.headers["allow"] == "POST"
    assert_error(httpx.post(f"{api}/v1/claims", json=VALID_BEGIN, headers=AUTH, timeout=10),
                 403, "insufficient_scope", "claims:write")


def test_the_openapi_document_declares_every_error_with_the_error_document(api: str) -> None:
    document = httpx.get(f"{api}/openapi.json", timeout=10).json()
    refs = {"#/components/schemas/ErrorDocument", "#/components/schemas/GoneDocument"}
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


# --- the contract: Allow, control characters, error documents ------------------------------------

EXAMPLE_PATH_VALUES = {"bucket": "NAMESPACE", "value": "gitlab-org", "lease_id": "0" * 8 + "-0000-0000-0000-" + "0" * 12,
                       "request_id": "0" * 8 + "-0000-0000-0000-" + "0" * 12, "owner_type": "GROUP",
                       "owner_id": "42", "cell_id": "cell-1"}
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def concrete(path: str) -> str:
    """A path of the document with a valid value in each parameter."""
    for name, value in EXAMPLE_PATH_VALUES.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, path
    return path


def test_a_405_allows_exactly_the_methods_the_document_lists_for_the_path(api: str) -> None:
    document = httpx.get(f"{api}/openapi.json", timeout=10).json()
    failures = []
    for path, item in document["paths"].items():
        documented = sorted(method.upper() for method in item if method.upper() in METHODS)
        for method in METHODS:
            if method in documented:
                continue
            response = httpx.request(method, f"{api}{concrete(path)}", headers=CLAIMS_AUTH, timeout=10)
            if response.status_code != 405 or response.headers.get("allow") != ", ".join(documented):
                failures.append(f"{method} {path}: {response.status_code} Allow: {response.headers.get('allow')} "
                                f"(the document lists {documented})")
            elif method != "HEAD":
                assert_error(response, 405, "method_not_allowed")
    assert len(document["paths"]) >= 14 and not failures, "\n".join(failures)


# Percent-encoded as sent: a carriage return, a line feed, NUL, a tab, DEL and C1's NEL (U+0085).
CONTROL_VALUES = ["1%0D", "%0D1", "1%0A", "1%00", "1%09", "1%7F", "1%C2%85"]


def test_control_characters_in_any_query_value_are_400_on_every_path(api: str) -> None:
    document = httpx.get(f"{api}/openapi.json", timeout=10).json()
    failures = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            declared = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"]
            for name in [*declared, "undeclared"]:
                for value in CONTROL_VALUES[:2] if name == "undeclared" else CONTROL_VALUES:
                    token = AUTH if path.startswith(("/v1/snapshot", "/v1/classify", "/v1/cells")) else CLAIMS_AUTH
                    response = httpx.request(method.upper(), f"{api}{concrete(path)}?{name}={value}", headers=token,
                                             timeout=10)
                    try:
                        assert_error(response, 400, "bad_query", name)
                    except AssertionError as exc:
                        failures.append(f"{method.upper()} {path}?{name}={value}: {exc}")
    name_itself = httpx.get(f"{api}/v1/cells?wa%0Dit=1", headers=AUTH, timeout=10)
    assert_error(name_itself, 400, "bad_query", "query parameter name")
    assert not failures, "\n".join(failures[:40])


def keep_alive_exchanges(url: str, requests: list[bytes], timeout_s: float = 5) -> list[tuple[int, bytes]]:
    """HTTP/1.1 requests one after the other on one kept-alive connection (what the uvicorn
    fast path answers, when it may): (status, body) of each."""
    parts = urlsplit(url)
    answers = []
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        received = b""
        for request in requests:
            sock.sendall(request)
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            head, _, received = received.partition(b"\r\n\r\n")
            length = int(next((line.split(b":", 1)[1] for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), b"0"))
            while len(received) < length:
                received += sock.recv(65536)
            answers.append((int(head.split(b" ", 2)[1]), received[:length]))
            received = received[length:]
    return answers


def test_a_wait_with_a_carriage_return_is_refused_at_once_not_held(api: str) -> None:
    """The long-poll of an unchanged snapshot, the request a router repeats, on a kept-alive
    HTTP/1.1 connection with If-None-Match of the current version: without a query the
    uvicorn fast path answers 304; with a control character in the query, every door
    refuses it at once (60 s would be TOPOLOGY_API_MAX_WAIT_S here)."""
    current = httpx.get(f"{api}/v1/snapshot", headers=AUTH, timeout=10).headers["etag"].encode()

    def request(query: bytes) -> bytes:
        return (b"GET /v1/snapshot" + query + b" HTTP/1.1\r\nHost: api\r\nAuthorization: "
                + AUTH["Authorization"].encode() + b"\r\nIf-None-Match: " + current + b"\r\n\r\n")

    queries = [b"?wait=1%0D", b"?wait=30s%0D%0A", b"?since=1%0D&wait=30s", b"?wait=%C2%8530s", b"?%0Dwait=1"]
    started = time.monotonic()
    answers = keep_alive_exchanges(api, [request(b""), *map(request, queries), request(b"")])
    assert time.monotonic() - started < 3
    assert answers[0][0] == answers[-1][0] == 304  # the fast path's answer, before and after
    for query, (status, body) in zip(queries, answers[1:-1], strict=True):
        assert status == 400 and json.loads(body)["error"]["code"] == "bad_query", (query, status, body)
        assert ERROR_DOCUMENT.is_valid(json.loads(body))
    held = httpx.get(f"{api}/v1/snapshot", params={"wait": "1"}, headers={**AUTH, "If-None-Match": current},
                     timeout=10)
    assert held.status_code == 304  # the same wait without the control character is a long-poll


def test_every_documented_error_answer_is_declared_as_the_error_document() -> None:
    """Statically: each 4xx/5xx of every operation is the error document, or one whose
    instances are error documents too (410's GoneDocument adds fields beside code and message)."""
    documented = [(path, method, status, response) for path, item in _DOCUMENT["paths"].items()
                  for method, operation in item.items() for status, response in operation["responses"].items()
                  if status[0] in "45"]
    assert len(documented) > 60
    for path, method, status, response in documented:
        assert set(response["content"]) == {"application/json"}, (path, method, status)
        ref = response["content"]["application/json"]["schema"]["$ref"]
        gone = {"error": {"code": "delta_unavailable", "message": "m", "oldest_since": 1, "version": 2}}
        sample = gone if ref.endswith("/GoneDocument") else {"error": {"code": "c", "message": "m"}}
        assert schema_validator(ref).is_valid(sample) and ERROR_DOCUMENT.is_valid(sample), (path, method, status)
        for not_an_error in ({"error": {"code": "c"}}, {"message": "m"}, {"error": {"code": 1, "message": "m"}}):
            assert not schema_validator(ref).is_valid(not_an_error), (path, method, status, not_an_error)


@pytest.fixture
def undecided_api(topics: Settings, tmp_path: Path) -> Iterator[str]:
    """The read API on real topics and no projector: every claim request is published and
    never decided (504 after a short wait)."""
    quick = topics.model_copy(update={"decision_wait_s": 0.5, "api_max_body_bytes": BODY_LIMIT})
    commit(quick, [CELL, claim("gitlab-org")])
    with read_api(quick, tmp_path / "api.log") as url:
        yield url


ZERO = EXAMPLE_PATH_VALUES["lease_id"]
# (method, path, request): one request that provokes each documented error status on this stack.
PROVOKED: dict[tuple[str, str, str], tuple[str, dict[str, Any]]] = {
    ("POST", "/v1/claims", "400"): ("/v1/claims", {"json": {**VALID_BEGIN, "owner_id": False}}),
    ("POST", "/v1/claims", "401"): ("/v1/claims", {"json": VALID_BEGIN, "headers": {}}),
    ("POST", "/v1/claims", "403"): ("/v1/claims", {"json": VALID_BEGIN, "headers": AUTH}),
    ("POST", "/v1/claims", "413"): ("/v1/claims", {"json": with_claims({"bucket": "KEY", "value": "k" * BODY_LIMIT})}),
    ("POST", "/v1/claims", "504"): ("/v1/claims", {"json": VALID_BEGIN}),
    ("POST", "/v1/leases/{lease_id}/commit", "400"): (f"/v1/leases/{ZERO}/commit", {"json": {"cell_id": "CELL"}}),
    ("POST", "/v1/leases/{lease_id}/commit", "504"): (f"/v1/leases/{ZERO}/commit", {"json": {"cell_id": "cell-1"}}),
    ("POST", "/v1/leases/{lease_id}/rollback", "413"): (f"/v1/leases/{ZERO}/rollback",
                                                       {"json": {"cell_id": "c" * BODY_LIMIT}}),
    ("POST", "/v1/leases/{lease_id}/rollback", "504"): (f"/v1/leases/{ZERO}/rollback", {"json": {"cell_id": "cell-1"}}),
    ("DELETE", "/v1/claims/{bucket}/{value}", "404"): ("/v1/claims/NAMESPACE/a%2Fb", {"params": {
        "cell_id": "cell-1", "owner_type": "GROUP", "owner_id": "42"}}),
    ("DELETE", "/v1/claims/{bucket}/{value}", "504"): ("/v1/claims/NAMESPACE/gitlab-org", {"params": {
        "cell_id": "cell-1", "owner_type": "GROUP", "owner_id": "42"}}),
    ("GET", "/v1/claims/{bucket}/{value}", "400"): ("/v1/claims/PLANET/earth", {}),
    ("GET", "/v1/claims/{bucket}/{value}", "404"): ("/v1/claims/NAMESPACE/nobody", {}),
    ("GET", "/v1/requests/{request_id}", "404"): (f"/v1/requests/{ZERO}", {}),
    ("GET", "/v1/owners/{owner_type}/{owner_id}", "404"): ("/v1/owners/USER/7", {"params": {"cell_id": "cell-1"}}),
    ("GET", "/v1/audit/history", "400"): ("/v1/audit/history", {"params": {"type": "PLANET", "value": "x"}}),
    ("GET", "/v1/audit/history", "404"): ("/v1/audit/history", {"params": {"type": "LEASE", "value": "x"}}),
    ("GET", "/v1/audit/history", "403"): ("/v1/audit/history", {"params": {"type": "CELL", "value": "cell-1"},
                                                                "headers": AUTH}),
    ("GET", "/v1/cells", "401"): ("/v1/cells", {"headers": {"Authorization": "Bearer not-a-token"}}),
    ("GET", "/v1/cells/{cell_id}", "400"): ("/v1/cells/Not_A_Label", {"headers": AUTH}),
    ("GET", "/v1/cells/{cell_id}", "403"): ("/v1/cells/cell-1", {}),
    ("GET", "/v1/cells/{cell_id}", "404"): ("/v1/cells/cell-9", {"headers": AUTH}),
    ("GET", "/v1/snapshot", "400"): ("/v1/snapshot", {"params": {"since": "-1"}, "headers": AUTH}),
    ("GET", "/v1/snapshot", "406"): ("/v1/snapshot", {"headers": {**AUTH, "Accept": "text/html"}}),
    ("GET", "/v1/classify", "400"): ("/v1/classify", {"params": {"type": "PLANET", "value": "x"}, "headers": AUTH}),
    ("GET", "/v1/classify", "404"): ("/v1/classify", {"params": {"type": "ROUTE", "value": "nobody"},
                                                      "headers": AUTH}),
}


def test_documented_error_statuses_answer_the_error_document(undecided_api: str) -> None:
    """Dynamically, one of each kind above (the fuzz test checks every answer it provokes
    against the document, test_http_fuzz.py; outages, conflicts, 410 and 429 have tests of
    their own that check the same error shape)."""
    documented = {(method.upper(), path, status) for path, item in _DOCUMENT["paths"].items()
                  for method, operation in item.items() for status in operation["responses"] if status[0] in "45"}
    assert set(PROVOKED) <= documented
    failures = []
    for (method, template, status), (path, options) in PROVOKED.items():
        options = {"headers": CLAIMS_AUTH, **options}
        response = httpx.request(method, f"{undecided_api}{path}", timeout=30, **options)
        schema = _DOCUMENT["paths"][template][method.lower()]["responses"][status]["content"]["application/json"]
        if str(response.status_code) != status or not schema_validator(schema["schema"]["$ref"]).is_valid(
                response.json()) or not ERROR_DOCUMENT.is_valid(response.json()):
            failures.append(f"{method} {template} {status}: {response.status_code} {response.text[:300]}")
    assert not failures, "\n".join(failures)
    pending = httpx.post(f"{undecided_api}/v1/claims", json=VALID_BEGIN, headers=CLAIMS_AUTH, timeout=30).json()
    assert pending["error"]["code"] == "decision_pending" and pending["error"]["request_id"] in pending["error"]["message"]
