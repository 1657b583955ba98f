"""``POST /v1/classify``'s body and answer (query_api/gitlab_api.py) without a server: protobuf's
JSON mapping read both ways, unknown fields dropped, the answer written as grpc-gateway writes
it, and the OpenAPI request schema agreeing with the server on every sample: a body the
document calls valid is answered (or 404), one it calls invalid is never answered 200."""

from __future__ import annotations

import sys
from typing import Any

import grpc
import jsonschema_rs
import orjson
import pytest

from tests.unit.test_grpc_classify import NUMBERS, TABLES
from topology_store.query_api.gitlab_api import CLASSIFY_REQUEST_SCHEMA, parse_request, response_json
from topology_store.schemas.generated.proto import classify_service_pb2 as pb
from topology_store.schemas.generated.proto.types.v1.claim_pb2 import Claim
from topology_store.service.gitlab_classify import Refusal, classify

VALIDATOR = jsonschema_rs.validator_for(CLASSIFY_REQUEST_SCHEMA)
SPACES = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
ANSWERED = {"OK", grpc.StatusCode.NOT_FOUND.name}  # 200, or 404: never a 400 for a valid body


def outcome(body: Any) -> str:
    """What the server ends with for ``body``: OK or the refusal's gRPC code."""
    try:
        return "OK" if classify(parse_request(orjson.dumps(body)), TABLES, NUMBERS) else "?"
    except Refusal as refusal:
        return refusal.code.name


def test_both_spellings_numbers_and_null_read_alike() -> None:
    camel = parse_request(b'{"claims": [{"projectId": "7"}, {"pagesUniqueDomain": "x"}], "value": null}')
    snake = parse_request(b'{"claims": [{"project_id": 7}, {"pages_unique_domain": "x"}]}')
    assert camel == snake == pb.ClassifyRequest(claims=[Claim(project_id=7), Claim(pages_unique_domain="x")])
    assert parse_request(b'{"type": 3, "value": "2"}') == parse_request(b'{"type": "CELL_ID", "value": "2"}')
    assert parse_request(b'{"type": 2.0}').type == pb.SESSION_PREFIX  # an integral number is the number


def test_unknown_fields_are_dropped_extension_keys_too() -> None:
    assert parse_request(b'{"type": "FIRST_CELL", "target": "web", "[ext.x]": 1, "Type": 2}') == \
        pb.ClassifyRequest(type=pb.FIRST_CELL)
    assert parse_request(b'{"claims": [{"route": "a", "note": {}, "[x]": 1}]}') == \
        pb.ClassifyRequest(claims=[Claim(route="a")])


@pytest.mark.parametrize(("body", "fragment"), [
    (b"", "not JSON"), (b"[1]", "JSON object"), (b'{"type": "BOGUS"}', "unknown classify type 'BOGUS'"),
    (b'{"type": 1.5}', "classify type"), (b'{"type": false}', "classify type"), (b'{"type": {}}', "classify type"),
    (b'{"value": 5}', "value"), (b'{"claims": [{"route": "a", "email": "b"}]}', "oneof"),
    (b'{"claims": [{"projectId": "seven"}]}', "projectId"),
])
def test_a_body_protobuf_cannot_read_is_invalid_argument(body: bytes, fragment: str) -> None:
    with pytest.raises(Refusal) as refused:
        parse_request(body)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and fragment in refused.value.message


def test_the_answer_is_written_as_grpc_gateway_writes_it() -> None:
    answer = pb.ClassifyResponse(action=pb.PROXY, proxy=pb.ProxyInfo(address="cell-2.example.com:443"))
    assert orjson.loads(response_json(answer)) == \
        {"action": "PROXY", "proxy": {"address": "cell-2.example.com:443"}, "matchedClaim": None}
    answer.matched_claim.route = "gitlab-org"
    assert orjson.loads(response_json(answer))["matchedClaim"] == {"route": "gitlab-org"}


def samples() -> list[Any]:
    """Bodies near every edge the document draws."""
    values: list[Any] = ["", "x", "c2-abc", "2", "007", "0", "-2", "1.0", "99999999999999999999", "9" * 18, "/", "//",
                         "/gitlab-org", "gitlab-org/x", " ", None, 5, "x" * 4097, "c2-" + "x" * 4093]
    values += [space for space in SPACES] + [f"{space}2{space}" for space in SPACES] + [f"/{space}" for space in SPACES]
    bodies: list[Any] = [[], "x", {}, {"type": None}, {"claims": []}, {"claims": None}, {"type": 99}, {"type": 1.5}]
    for kind in ("FIRST_CELL", "SESSION_PREFIX", "CELL_ID", "UNSPECIFIED", 0, 1, 2, 3, "BOGUS", None):
        for value in values:
            bodies.append({"type": kind, "value": value})
            bodies.append({"type": kind, "value": value, "claims": [{"route": "gitlab-org"}]})
            bodies.append({"type": kind, "claims": [{"route": value}]})
        bodies.append({"type": kind})
    for claim in ({"route": "ghost"}, {"projectId": "7"}, {"project_id": 7}, {}, {"route": None},
                  {"route": "a", "username": "b"}, {"route": "a", "extra": 1}, {"username": "root"}):
        bodies.append({"claims": [claim]})
        bodies.append({"claims": [{"route": "gitlab-org"}, claim]})
        bodies.append({"claims": [claim, {"route": "gitlab-org"}], "value": ""})
    return bodies


def test_the_document_says_exactly_which_bodies_are_answered() -> None:
    valid = invalid = 0
    for body in samples():
        result = outcome(body)
        if VALIDATOR.is_valid(body):
            valid += 1
            assert result in ANSWERED, (body, result)  # the fuzzer: a valid request is not refused
        else:
            invalid += 1
            assert result != "OK", (body, result)  # the fuzzer: an invalid request is not answered
    assert valid > 100 and invalid > 100  # not vacuous: both sides of the line sampled
