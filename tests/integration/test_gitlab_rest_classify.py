"""``POST /v1/classify`` (GitLab's Classify over REST, what its HTTP Router calls; adr/0021)
on the real stack: events on the broker, a ``topology project`` child, one ``topology serve``
child with both doors. Every request goes to both doors of the same process, and the REST
answer must be the gRPC answer in protobuf's JSON mapping (or its refusal, with the status
GitLab's grpc-gateway gives that code)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from tests.conftest import AUTH, TEST_CLAIMS_TOKEN, TEST_TOKEN_NO_SCOPE
from tests.integration import test_grpc_api
from tests.integration.processes import wait_until
from tests.integration.test_grpc_api import BAD_CLASSIFY, READ, Claim, ClassifyRequest, Door, publish
from topology_store.runtime.settings import Settings
from topology_store.schemas.generated.proto import classify_service_pb2, classify_service_pb2_grpc
from topology_store.schemas.models import CellState, CellStateChanged

pytestmark = pytest.mark.integration

stack = test_grpc_api.stack  # the gRPC door's stack: both doors in one topology serve

Type = classify_service_pb2
# Every classify type GitLab's enum has, answered and refused, and claims.
REQUESTS = [
    ClassifyRequest(type=Type.FIRST_CELL),
    ClassifyRequest(type=Type.FIRST_CELL, value="ignored"),
    ClassifyRequest(type=Type.SESSION_PREFIX, value="cell-2-a1b2c3"),
    ClassifyRequest(type=Type.SESSION_PREFIX, value="legacy-0f0f"),
    ClassifyRequest(type=Type.SESSION_PREFIX, value="zzz-1"),
    ClassifyRequest(type=Type.CELL_ID, value="1"),
    ClassifyRequest(type=Type.CELL_ID, value="2"),
    ClassifyRequest(type=Type.CELL_ID, value="9"),
    ClassifyRequest(type=Type.CELL_ID, value="3"),  # ambiguous: cell-3 and blue-3
    ClassifyRequest(claims=[Claim(route="nobody/x"), Claim(route="GitLab-Org/gitlab/-/issues")]),
    ClassifyRequest(claims=[Claim(route="orphaned")]),
    ClassifyRequest(claims=[Claim(route="nobody")]),
    *(request for request, _ in BAD_CLASSIFY[:-1]),  # the last one is long: below
    ClassifyRequest(type=Type.SESSION_PREFIX, value="x" * 5000),
]
# The HTTP status of each code: grpc-gateway's, but UNIMPLEMENTED 400 (GitLab: 501) and
# FAILED_PRECONDITION 409 (GitLab: 400), adr/0021.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 400,
}


def grpc_answer(door: Door, request: ClassifyRequest) -> tuple[int, Any]:
    """(the HTTP status GitLab's gateway would give, the JSON body or the refusal's message)."""
    with door.channel() as channel:
        try:
            answer = classify_service_pb2_grpc.ClassifyServiceStub(channel).Classify(request, metadata=READ, timeout=5)
        except grpc.RpcError as error:
            return HTTP_STATUS[error.code()], error.details()
    # grpc-gateway writes an unset message field as null (EmitUnpopulated)
    return 200, {"matchedClaim": None, **json_format.MessageToDict(answer)}


def rest(door: Door, body: str | bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{door.http}/v1/classify", content=body, timeout=5,
                      headers={"Content-Type": "application/json", **AUTH, **(headers or {})})


def rest_answer(door: Door, body: str | bytes) -> tuple[int, Any]:
    response = rest(door, body)
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    return response.status_code, document if response.status_code == 200 else document["error"]["message"]


def snapshot_version(door: Door) -> int:
    return int(httpx.get(f"{door.http}/v1/snapshot", headers=AUTH, timeout=5).headers["x-topology-version"])


def test_every_classify_answers_over_rest_what_grpc_answers(stack: Door) -> None:
    seen = set()
    for request in REQUESTS:
        expected = grpc_answer(stack, request)
        # GitLab's router writes protobuf's JSON mapping: lowerCamelCase, enums by name.
        assert rest_answer(stack, json_format.MessageToJson(request)) == expected, request
        seen.add(expected[0])
    assert seen == {200, 400, 404, 409}  # not vacuous: answers and every kind of refusal compared
    # Claims other than routes: gRPC looks them up among the committed claims (GitLab's mail
    # router asks by project id); REST answers routes only, saying so (adr/0022).
    for request in (ClassifyRequest(claims=[Claim(project_id=7)]), ClassifyRequest(claims=[Claim(username="root")])):
        assert grpc_answer(stack, request) == (404, "no cell owns any of the claims")
        status, message = rest_answer(stack, json_format.MessageToJson(request))
        assert status == 400 and "not served on this door" in message

    # The answers themselves, as GitLab's router reads them.
    status, first = rest_answer(stack, '{"type": "FIRST_CELL"}')
    assert (status, first) == (200, {"action": "PROXY", "proxy": {"address": "legacy.example.com:443"},
                                     "matchedClaim": None})
    _, by_route = rest_answer(stack, '{"claims": [{"route": "gitlab-org/gitlab"}]}')
    assert by_route == {"action": "PROXY", "proxy": {"address": "cell-2.example.com:8443"},
                        "matchedClaim": {"route": "gitlab-org"}}

    # Our own GET /v1/classify is still there, in our document.
    ours = httpx.get(f"{stack.http}/v1/classify", params={"type": "SESSION_PREFIX", "value": "cell-2-a1b2c3"},
                     headers=AUTH, timeout=5)
    assert ours.status_code == 200 and ours.json()["cell"]["cell_id"] == "cell-2"


def test_first_cell_falls_back_past_a_decommissioned_cell_on_both_doors(stack: Door, topics: Settings) -> None:
    before = rest_answer(stack, '{"type": "FIRST_CELL"}')
    assert before[1]["proxy"]["address"] == "legacy.example.com:443"
    asyncio.run(publish(topics, [CellStateChanged(source="ops", cell_id="legacy", state=state)
                                 for state in (CellState.DRAINING, CellState.DECOMMISSIONED)]))

    def moved() -> bool:
        return rest_answer(stack, '{"type": "FIRST_CELL"}')[1]["proxy"]["address"] != "legacy.example.com:443"

    wait_until(moved, timeout_s=60, interval_s=0.2, what="FIRST_CELL past the decommissioned legacy cell")
    # cell-2 is the next numbered cell (3 is ambiguous, "nonumber" has none); gRPC agrees.
    expected = (200, {"action": "PROXY", "proxy": {"address": "cell-2.example.com:8443"}, "matchedClaim": None})
    assert rest_answer(stack, '{"type": "FIRST_CELL"}') == expected
    assert grpc_answer(stack, ClassifyRequest(type=Type.FIRST_CELL)) == expected


def test_camel_case_snake_case_numbers_and_unknown_fields_read_as_protobuf_reads_them(stack: Door) -> None:
    unserved = rest_answer(stack, '{"claims": [{"projectId": "7"}]}')
    assert unserved[0] == 400 and "project_id" in unserved[1] and "not served" in unserved[1]
    # The proto's own names and lowerCamelCase read alike; int64 as a string or a number.
    assert rest_answer(stack, '{"claims": [{"project_id": 7}]}') == unserved
    assert rest_answer(stack, '{"claims": [{"namespaceId": "12"}]}')[0] == \
        rest_answer(stack, '{"claims": [{"namespace_id": 12}]}')[0] == 400
    by_number = rest_answer(stack, '{"type": 3, "value": "2"}')  # CELL_ID by its number
    assert by_number == rest_answer(stack, '{"type": "CELL_ID", "value": "2"}')
    assert by_number[1]["proxy"]["address"] == "cell-2.example.com:8443"
    # Unknown fields are ignored (grpc-gateway's DiscardUnknown): a newer router still works.
    assert rest_answer(stack, '{"type": "FIRST_CELL", "target": "web"}')[0] == 200
    assert rest_answer(stack, '{"type": "FIRST_CELL", "[ext]": 1}')[0] == 200  # not read as an extension
    assert rest_answer(stack, '{"claims": [{"route": "acme", "note": "x"}]}')[0] == 200
    # null is a field's default, as in protobuf's JSON mapping.
    assert rest_answer(stack, '{"type": "FIRST_CELL", "value": null, "claims": null}')[0] == 200
    # Any content type is read as JSON, as grpc-gateway's default marshaler does.
    plain = rest(stack, '{"type": "FIRST_CELL"}', headers={"Content-Type": "text/plain"})
    assert plain.status_code == 200


BAD_BODIES = [
    (b"", "not JSON"),
    (b"{", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[]", "must be a JSON object"),
    (b'"FIRST_CELL"', "must be a JSON object"),
    (b'{"type": "BOGUS"}', "unknown classify type 'BOGUS'"),
    (b'{"type": "first_cell"}', "unknown classify type 'first_cell'"),
    (b'{"type": 1.5}', "classify type"),
    (b'{"type": true}', "classify type"),
    (b'{"type": 99}', "unknown classify type 99"),
    (b'{"type": "SESSION_PREFIX", "value": 5}', "value"),
    (b'{"claims": "gitlab-org"}', "claims"),
    (b'{"claims": [null]}', "claims"),
    (b'{"claims": [{"route": "a", "username": "b"}]}', "oneof"),
    (b'{"claims": [{"projectId": "99999999999999999999"}]}', "out of range"),
    (b"[" * 5000 + b"]" * 5000, "not JSON"),
]


def test_bad_input_is_400_with_the_error_document(stack: Door) -> None:
    for body, fragment in BAD_BODIES:
        response = rest(stack, body)
        assert response.status_code == 400, (body[:80], response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.headers["cache-control"] == "no-store"  # a refusal is never kept
        error = response.json()["error"]
        assert error["code"] == "invalid_argument" and fragment in error["message"], (body[:80], error)
    assert "Traceback" not in stack.log.read_text()


def test_classify_needs_a_token_with_snapshot_read(stack: Door) -> None:
    body = '{"type": "FIRST_CELL"}'
    none = httpx.post(f"{stack.http}/v1/classify", content=body, timeout=5)
    assert none.status_code == 401 and none.json()["error"]["code"] == "unauthenticated"
    assert none.headers["www-authenticate"].startswith("Bearer")
    for token in (TEST_TOKEN_NO_SCOPE, TEST_CLAIMS_TOKEN):
        refused = rest(stack, body, headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope", refused.text
    assert rest(stack, body).status_code == 200


def test_answers_carry_cache_headers_a_cdn_worker_can_use(stack: Door) -> None:
    answered = rest(stack, '{"type": "SESSION_PREFIX", "value": "cell-2-a1b2c3"}')
    assert answered.status_code == 200
    assert answered.headers["cache-control"] == "public, max-age=30"  # TOPOLOGY_CLASSIFY_MAX_AGE_S's default
    assert int(answered.headers["x-topology-version"]) == snapshot_version(stack)
    assert answered.headers["content-type"] == "application/json"
    assert "set-cookie" not in answered.headers  # Cloudflare's cache keeps no answer with a cookie
    for body in ('{"type": "SESSION_PREFIX", "value": "zzz-1"}', '{"claims": [{"username": "root"}]}'):
        refused = rest(stack, body)
        assert refused.status_code in (404, 400) and refused.headers["cache-control"] == "no-store"
