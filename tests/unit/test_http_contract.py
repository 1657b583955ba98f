"""The read API's declared formats and the server's checks are one rule (query_api/contract.py,
schemas/models.py): what a bucket's pattern accepts, the server accepts, and nothing else
(besides what the descriptions state: 255 characters once lower-cased, lone surrogates);
integers and UUIDs are strict; the document's bounds are exact integers; every string a
client sends has a declared format."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from topology_store.query_api.app import create_app
from topology_store.query_api.contract import (
    OwnerIdBody,
    Uuid,
    door_claim_value,
    exact_bounds,
    parse_bucket,
    parse_param_int,
    parse_version,
)
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import (
    CONTROL_CHARACTERS,
    MAX_BIGINT,
    ClaimBucket,
    _decimal_at_most,
    canonical_claim_value,
    claim_value_pattern,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.filter_too_much])


def accepted(check: Any, *args: Any) -> bool:
    try:
        check(*args)
    except ValueError:
        return False
    return True


def describable_exception(value: str) -> bool:
    """What JSON Schema cannot say, stated in the descriptions instead."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True  # a lone surrogate
    return len(value.lower()) > 255


# Text around the formats' edges: ASCII, whitespace of every kind, controls, '@', the
# protected prefix, letters that change length or leave ASCII when lower-cased.
EDGY = st.lists(st.sampled_from([*"aZ09_.-/@: \t\n\x00\x1c\x85\xa0\u2028\u212a\u0130é", "hmac-sha256:"]),
                max_size=12).map("".join) | st.text(max_size=12)


@pytest.mark.parametrize("bucket", list(ClaimBucket))
@FAST
@given(data=st.data())
def test_a_value_the_door_pattern_generates_is_accepted(bucket: ClaimBucket, data: st.DataObject) -> None:
    value = data.draw(st.from_regex(claim_value_pattern(bucket, CONTROL_CHARACTERS), fullmatch=True))
    assume(len(value) <= 255 and not describable_exception(value))
    assert canonical_claim_value(bucket, door_claim_value(bucket, value)) == door_claim_value(bucket, value)


@pytest.mark.parametrize("bucket", list(ClaimBucket))
@FAST
@given(value=EDGY)
def test_the_door_accepts_exactly_what_its_pattern_matches(bucket: ClaimBucket, value: str) -> None:
    assume(not describable_exception(value))
    matches = re.fullmatch(claim_value_pattern(bucket, CONTROL_CHARACTERS), value) is not None
    assert accepted(door_claim_value, bucket, value) == (matches and len(value) <= 255), repr(value)


@pytest.mark.parametrize("bucket", list(ClaimBucket))
@FAST
@given(value=EDGY)
def test_events_accept_exactly_what_their_pattern_matches(bucket: ClaimBucket, value: str) -> None:
    assume(not describable_exception(value))
    matches = re.fullmatch(claim_value_pattern(bucket), value) is not None
    assert accepted(canonical_claim_value, bucket, value) == (matches and len(value) <= 255), repr(value)


def test_the_patterns_need_no_engine_specific_syntax() -> None:
    """ECMA-262 (OpenAPI) and Python read them alike: no \\s \\d \\w, no lookaround, no \\Z."""
    for bucket in ClaimBucket:
        for pattern in (claim_value_pattern(bucket), claim_value_pattern(bucket, CONTROL_CHARACTERS)):
            assert not re.search(r"\\[sdwSDWZAb]|\(\?", pattern), (bucket, pattern)
            assert pattern.startswith("^") and pattern.endswith("$")


def test_an_email_spelled_like_the_protected_form_in_any_case_is_never_kept_in_clear() -> None:
    for value in ("HMAC-SHA256:ada@example.com", "hmac-sha256:ada@example.com", "Hmac-Sha256:" + "a" * 64):
        with pytest.raises(ValueError, match="protected"):
            canonical_claim_value(ClaimBucket.EMAIL, value)
    assert canonical_claim_value(ClaimBucket.EMAIL, "hmac-sha25@example.com") == "hmac-sha25@example.com"


@pytest.mark.parametrize("limit", [1, 7, 9, 10, 19, 20, 99, 100, 101, 109, 250, 1000, 4321])
def test_decimal_at_most_matches_exactly_one_to_the_limit(limit: int) -> None:
    pattern = re.compile(_decimal_at_most(limit))
    matched = {n for n in range(limit * 10 + 20) if pattern.fullmatch(str(n))}
    assert matched == set(range(1, limit + 1))
    assert not pattern.fullmatch("0" + str(limit)) and not pattern.fullmatch("00")


def test_organization_ids_stop_at_a_bigint() -> None:
    pattern = re.compile(claim_value_pattern(ClaimBucket.ORGANIZATION_ID))
    assert pattern.fullmatch(str(MAX_BIGINT)) and not pattern.fullmatch(str(MAX_BIGINT + 1))
    assert pattern.fullmatch("1") and not pattern.fullmatch("0") and not pattern.fullmatch("9" * 20)


@pytest.mark.parametrize("text", ["0", "7", "-3", "0042", "9" * 19])
def test_parameter_integers_are_decimal_digits(text: str) -> None:
    assert parse_param_int(text) == int(text)


@pytest.mark.parametrize("text", ["", "+1", " 1", "1 ", "1_0", "1.0", "1e3", "0x1", "\u0663", "1\r", "--1", "9" * 21])
def test_anything_else_int_reads_is_not_a_parameter_integer(text: str) -> None:
    with pytest.raises(ValueError):
        parse_param_int(text)


def test_versions_are_bigints() -> None:
    assert parse_version(str(MAX_BIGINT)) == MAX_BIGINT
    for text in ("-1", str(MAX_BIGINT + 1)):
        with pytest.raises(ValueError):
            parse_version(text)


@pytest.mark.parametrize("value", [False, True, "1", 1.5, "", None])
def test_body_integers_are_json_integers(value: object) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(OwnerIdBody).validate_python(value)
    assert TypeAdapter(OwnerIdBody).validate_python(7) == 7


@pytest.mark.parametrize("value", ["0123456789abcdef0123456789abcdef", "{01234567-89ab-cdef-0123-456789abcdef}",
                                   "urn:uuid:01234567-89ab-cdef-0123-456789abcdef",
                                   "01234567-89ab-cdef-0123-456789abcdef\n"])
def test_uuids_have_one_spelling(value: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(Uuid).validate_python(value)
    assert str(TypeAdapter(Uuid).validate_python("01234567-89AB-cdef-0123-456789abcdef")).startswith("01234567-89ab")


def test_buckets_in_a_path_are_ascii_in_any_case() -> None:
    assert parse_bucket("namespace") is ClaimBucket.NAMESPACE
    for text in ("u\u017fername", "PLANET", "NAMESPACE "):
        with pytest.raises(ValueError):
            parse_bucket(text)


def walk(node: Any, where: str = "") -> Any:
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from walk(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from walk(item, f"{where}/{index}")


def test_the_document_states_bounds_as_exact_integers() -> None:
    document = create_app(Settings()).openapi()
    bounds = [(where, key, node[key]) for where, node in walk(document)
              for key in ("minimum", "maximum") if key in node and not where.endswith("/properties")]
    assert bounds and all(isinstance(value, int) for _, _, value in bounds), bounds
    assert ("maximum", MAX_BIGINT) in {(key, value) for _, key, value in bounds}
    with pytest.raises(ValueError, match="exactly"):
        exact_bounds({"maximum": float(2**62 + 2**40)})


def test_every_string_a_client_sends_has_a_declared_format() -> None:
    """Each string parameter and request body field: a pattern, an enum, a const or a format."""
    document = create_app(Settings()).openapi()
    schemas = document["components"]["schemas"]
    strings = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                for where, node in walk(parameter["schema"], f"{method} {path} {parameter['name']}"):
                    if node.get("type") == "string":
                        strings.append((where, node))
    for name in ("BeginRequest", "LeaseAction", *(f"{b.title().replace('_', '')}Claim" for b in ClaimBucket)):
        for where, node in walk(schemas[name.replace("OrganizationIdClaim", "OrganizationIdClaim")], name):
            if node.get("type") == "string":
                strings.append((where, node))
    assert len(strings) > 20
    for where, node in strings:
        assert {"pattern", "enum", "const", "format"} & set(node), where
