"""The pydantic edge models: canonical claim values and event parsing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from topology_store.schemas.models import (
    EVENT_MODELS,
    MAX_CLAIMS_PER_REQUEST,
    MAX_LEASE_TTL_MS,
    MAX_SEQUENCE_RANGE,
    EMAIL_BUCKETS,
    ID_BUCKETS,
    KEY_BUCKETS,
    PROTECTED_PREFIX,
    SENSITIVE_BUCKETS,
    CellRegistered,
    CellState,
    CellStateChanged,
    CellUpdated,
    ClaimBucket,
    ClaimCreated,
    ClaimRef,
    ClaimReleased,
    ClaimsDestroyRequested,
    ClaimsRequested,
    Conflict,
    Event,
    EventInputError,
    LeaseCommitRequested,
    LeaseExpiryTick,
    LeaseGranted,
    LeaseReleased,
    LeaseRollbackRequested,
    OwnerTransferRequested,
    OwnerType,
    RejectionReason,
    ReleaseCause,
    RequestRejected,
    SequenceRangeRequested,
    canonical_claim_value,
    parse_event,
    protect_value,
    stored_claim_value,
)

PROTECTED_A = PROTECTED_PREFIX + "a" * 64

# --- canonical_claim_value -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("bucket", "value", "expected"),
    [
        (ClaimBucket.NAMESPACE, "GitLab-Org", "gitlab-org"),
        (ClaimBucket.NAMESPACE, "gitlab-org", "gitlab-org"),
        (ClaimBucket.NAMESPACE, "_under.score-9", "_under.score-9"),
        (ClaimBucket.USERNAME, "Alice_B", "alice_b"),
        (ClaimBucket.USERNAME, "0day", "0day"),
        (ClaimBucket.EMAIL, "Alice.Smith@Example.COM", "alice.smith@example.com"),
        (ClaimBucket.KEY, "SHA256:AbCdEf+/=", "SHA256:AbCdEf+/="),
        (ClaimBucket.KEY, "-.leading/and/slash", "-.leading/and/slash"),
        (ClaimBucket.PACKAGE, "@Scope/My.Package", "@Scope/My.Package"),
        (ClaimBucket.PACKAGE, "Has Inner Space", "Has Inner Space"),
        (ClaimBucket.IMAGE, "Registry.Example.com/Group/App", "registry.example.com/group/app"),
        (ClaimBucket.IMAGE, "0_a.b-c/d", "0_a.b-c/d"),
        (ClaimBucket.ORGANIZATION_ID, "1", "1"),
        (ClaimBucket.ORGANIZATION_ID, "9223372036854775807", "9223372036854775807"),
        (ClaimBucket.EMAIL, PROTECTED_A, PROTECTED_A),
    ],
)
def test_canonical_value(bucket: ClaimBucket, value: str, expected: str) -> None:
    assert canonical_claim_value(bucket, value) == expected


@pytest.mark.parametrize("bucket", [ClaimBucket.NAMESPACE, ClaimBucket.USERNAME, ClaimBucket.EMAIL])
def test_case_insensitive_buckets_map_case_variants_to_one_value(bucket: ClaimBucket) -> None:
    base = "someone@example.com" if bucket is ClaimBucket.EMAIL else "someone"
    variants = {base, base.upper(), base.title(), base.swapcase()}
    assert {canonical_claim_value(bucket, v) for v in variants} == {base}


@pytest.mark.parametrize("bucket", [ClaimBucket.KEY, ClaimBucket.PACKAGE])
def test_key_and_package_buckets_are_case_sensitive(bucket: ClaimBucket) -> None:
    assert canonical_claim_value(bucket, "abc") != canonical_claim_value(bucket, "ABC")


def test_image_bucket_is_case_insensitive() -> None:
    assert canonical_claim_value(ClaimBucket.IMAGE, "Group/App") == canonical_claim_value(ClaimBucket.IMAGE, "group/APP")


@pytest.mark.parametrize("value", ["/leading-slash", ".dot", "-dash", "has space", "a:tag", "a@sha", "ümlaut", "a+b"])
def test_image_bucket_rejects_other_characters(value: str) -> None:
    with pytest.raises(ValueError, match="IMAGE must be"):
        canonical_claim_value(ClaimBucket.IMAGE, value)


@pytest.mark.parametrize("value", ["0", "01", "-1", "+1", "1.5", "1e3", "abc", "12345678901234567890", "１"])
def test_organization_id_must_be_a_positive_integer(value: str) -> None:
    with pytest.raises(ValueError, match="ORGANIZATION_ID must be a positive integer"):
        canonical_claim_value(ClaimBucket.ORGANIZATION_ID, value)


@pytest.mark.parametrize(
    "value",
    [PROTECTED_PREFIX + "A" * 64, PROTECTED_PREFIX + "a" * 63, PROTECTED_PREFIX + "a" * 65, PROTECTED_PREFIX + "g" * 64,
     PROTECTED_PREFIX],
)
def test_malformed_protected_email_is_rejected(value: str) -> None:
    with pytest.raises(ValueError, match="protected EMAIL"):
        canonical_claim_value(ClaimBucket.EMAIL, value)


@pytest.mark.parametrize("bucket", [ClaimBucket.NAMESPACE, ClaimBucket.USERNAME, ClaimBucket.IMAGE])
def test_protected_form_is_only_for_sensitive_buckets(bucket: ClaimBucket) -> None:
    # Only EMAIL may arrive pre-hashed; elsewhere the ':' breaks the bucket's own rule.
    with pytest.raises(ValueError):
        canonical_claim_value(bucket, PROTECTED_A)


# --- protect_value -------------------------------------------------------------------------

# RFC 4231, test case 1: HMAC-SHA256 with key 0x0b * 20 over "Hi There".
RFC4231_KEY = b"\x0b" * 20
RFC4231_MAC = "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"


def test_protect_value_is_hmac_sha256_of_the_canonical_value() -> None:
    assert protect_value(ClaimBucket.EMAIL, "Hi There", RFC4231_KEY) == PROTECTED_PREFIX + RFC4231_MAC
    assert protect_value("EMAIL", "Hi There", RFC4231_KEY) == PROTECTED_PREFIX + RFC4231_MAC


def test_protected_email_is_a_valid_protected_value() -> None:
    protected = protect_value(ClaimBucket.EMAIL, "alice@example.com", b"secret")
    assert canonical_claim_value(ClaimBucket.EMAIL, protected) == protected
    assert "alice" not in protected and "example" not in protected


def test_protect_value_depends_on_secret_and_value() -> None:
    one = protect_value(ClaimBucket.EMAIL, "alice@example.com", b"secret-1")
    assert one == protect_value(ClaimBucket.EMAIL, "alice@example.com", b"secret-1")
    assert one != protect_value(ClaimBucket.EMAIL, "alice@example.com", b"secret-2")
    assert one != protect_value(ClaimBucket.EMAIL, "bob@example.com", b"secret-1")


def test_protect_value_keeps_an_already_protected_value() -> None:
    assert protect_value(ClaimBucket.EMAIL, PROTECTED_A, b"secret") == PROTECTED_A


@pytest.mark.parametrize("bucket", [b for b in ClaimBucket if b.value not in SENSITIVE_BUCKETS])
def test_protect_value_keeps_non_sensitive_buckets_clear(bucket: ClaimBucket) -> None:
    assert protect_value(bucket, "1", b"secret") == "1"


def test_sensitive_buckets_are_the_emails_and_the_public_keys() -> None:
    assert SENSITIVE_BUCKETS == {"EMAIL", "SERVICE_DESK_CUSTOM_EMAIL", "GPG_KEY", "SSH_KEY"}


@pytest.mark.parametrize("bucket", [ClaimBucket.GPG_KEY, ClaimBucket.SSH_KEY])
def test_a_public_key_is_always_stored_as_its_hash(bucket: ClaimBucket) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMq alice@example.com"
    stored = stored_claim_value(bucket, key, b"secret")
    assert stored.startswith(PROTECTED_PREFIX) and "alice" not in stored
    # A key has no protected form: one that looks protected is hashed too, never kept as given.
    assert protect_value(bucket, PROTECTED_A, b"secret") != PROTECTED_A
    assert canonical_claim_value(bucket, "x" * 16_384) == "x" * 16_384
    with pytest.raises(ValueError, match="at most 16384"):
        canonical_claim_value(bucket, "x" * 16_385)


@pytest.mark.parametrize(("bucket", "value", "canonical"), [
    (ClaimBucket.ROUTE, "GitLab-Org/GitLab", "gitlab-org/gitlab"),
    (ClaimBucket.REDIRECT_ROUTE, "Old", "old"),
    (ClaimBucket.ORGANIZATION_PATH, "ACME", "acme"),
    (ClaimBucket.PROJECT_ID, "278964", "278964"),
    (ClaimBucket.GPG_KEY_FINGERPRINT, "5FB4C5D2E1A0B3C4", "5fb4c5d2e1a0b3c4"),
    (ClaimBucket.SSH_KEY_FINGERPRINT, "SHA256:AbC", "SHA256:AbC"),
    (ClaimBucket.PAGES_DOMAIN, "Docs.Example.COM", "docs.example.com"),
    (ClaimBucket.SERVICE_DESK_CUSTOM_EMAIL, "Support@Example.com", "support@example.com"),
])
def test_gitlab_buckets_canonical_forms(bucket: ClaimBucket, value: str, canonical: str) -> None:
    assert canonical_claim_value(bucket, value) == canonical


@pytest.mark.parametrize(("bucket", "value"), [
    (ClaimBucket.ROUTE, "top-level-only"),  # a one-segment route is a NAMESPACE
    (ClaimBucket.ROUTE, "a//b"),
    (ClaimBucket.ROUTE, "a/b/"),
    (ClaimBucket.PROJECT_ID, "0"),
    (ClaimBucket.USER_ID, "9223372036854775808"),
    (ClaimBucket.GPG_KEY_FINGERPRINT, "xyz"),
    (ClaimBucket.PAGES_DOMAIN, "-bad.example"),
    (ClaimBucket.PAGES_DOMAIN, "a..b"),
])
def test_gitlab_buckets_refuse(bucket: ClaimBucket, value: str) -> None:
    with pytest.raises(ValueError):
        canonical_claim_value(bucket, value)


@pytest.mark.parametrize("bucket", [ClaimBucket.NAMESPACE, ClaimBucket.USERNAME])
@pytest.mark.parametrize(
    "value",
    ["gitlab-org/gitlab", "/root", "root/", "-dash", ".dot", "has space", "ümlaut", "a+b", "a@b"],
)
def test_path_segment_buckets_reject(bucket: ClaimBucket, value: str) -> None:
    with pytest.raises(ValueError, match="path segment"):
        canonical_claim_value(bucket, value)


@pytest.mark.parametrize("bucket", list(ClaimBucket))
@pytest.mark.parametrize("value", ["", " ", " padded", "padded ", "\tpadded", "padded\n"])
def test_every_bucket_rejects_empty_or_whitespace_surrounded(bucket: ClaimBucket, value: str) -> None:
    with pytest.raises(ValueError, match="non-empty without surrounding whitespace"):
        canonical_claim_value(bucket, value)


@pytest.mark.parametrize("bucket", [b for b in ClaimBucket if b.value not in ID_BUCKETS | KEY_BUCKETS
                                    and b is not ClaimBucket.GPG_KEY_FINGERPRINT])
def test_length_limit_is_255(bucket: ClaimBucket) -> None:
    def of_length(n: int) -> str:
        if bucket.value in EMAIL_BUCKETS:
            return "a" * (n - len("@b")) + "@b"
        if bucket is ClaimBucket.ROUTE:
            return "a/" + "a" * (n - 2)
        return "a" * n

    assert canonical_claim_value(bucket, of_length(255)) == of_length(255)
    with pytest.raises(ValueError, match="at most 255"):
        canonical_claim_value(bucket, of_length(256))


def test_organization_id_is_at_most_19_digits() -> None:
    assert canonical_claim_value(ClaimBucket.ORGANIZATION_ID, "1" * 19) == "1" * 19
    with pytest.raises(ValueError, match="positive integer"):
        canonical_claim_value(ClaimBucket.ORGANIZATION_ID, "1" * 20)


@pytest.mark.parametrize("value", ["no-at-sign", "two@@example.com", "a@b@c", "@example.com", "local@", "a b@c"])
def test_email_must_look_like_local_at_domain(value: str) -> None:
    with pytest.raises(ValueError, match="local@domain"):
        canonical_claim_value(ClaimBucket.EMAIL, value)


# --- parse_event ---------------------------------------------------------------------------


def _claim_input(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": "ClaimCreated",
        "source": "cell-1",
        "bucket": "NAMESPACE",
        "value": "GitLab-Org",
        "cell_id": "cell-1",
        "owner_type": "GROUP",
        "owner_id": 1,
    }
    data.update(overrides)
    return data


def test_parse_event_builds_the_named_model_with_canonical_value() -> None:
    event = parse_event(_claim_input())
    assert isinstance(event, ClaimCreated)
    assert event.bucket is ClaimBucket.NAMESPACE
    assert event.owner_type is OwnerType.GROUP
    assert event.value == "gitlab-org"
    assert isinstance(event.event_id, uuid.UUID)
    assert event.occurred_at.tzinfo is not None


LEASE = "6f1c2b7e-6a0f-4d7e-9d3c-1c9a8e6d2b10"
REQUEST = "0b1e6f44-3c2a-4b8e-a1d2-7f6e5d4c3b2a"
REFS = [{"bucket": "NAMESPACE", "value": "GitLab-Org"}, {"bucket": "EMAIL", "value": "A@B.C"}]
OWNER = {"cell_id": "c1", "owner_type": "GROUP", "owner_id": 1}

SAMPLES: dict[str, dict[str, Any]] = {
    "CellRegistered": {"cell_id": "c1", "address": "https://c1", "session_prefix": "c1_", "region": "r"},
    "CellUpdated": {"cell_id": "c1", "weight": 0},
    "CellStateChanged": {"cell_id": "c1", "state": "ACTIVE"},
    "ClaimCreated": {k: v for k, v in _claim_input().items() if k not in ("type", "source")},
    "ClaimReleased": {k: v for k, v in _claim_input().items() if k not in ("type", "source")},
    "ClaimsRequested": {**OWNER, "claims": REFS},
    "LeaseCommitRequested": {"lease_id": LEASE, "cell_id": "c1"},
    "LeaseRollbackRequested": {"lease_id": LEASE, "cell_id": "c1"},
    "ClaimsDestroyRequested": {**OWNER, "claims": REFS},
    "OwnerTransferRequested": {"owner_type": "USER", "owner_id": 3, "from_cell_id": "c1", "to_cell_id": "c2"},
    "SequenceRangeRequested": {"cell_id": "c1", "sequence_name": "projects.id", "size": 1000},
    "LeaseExpiryTick": {},
    "LeaseGranted": {"request_id": REQUEST, "lease_id": LEASE, **OWNER, "claims": REFS,
                     "expires_at": "2024-05-17T09:30:15Z"},
    "LeaseCommitted": {"request_id": REQUEST, "lease_id": LEASE, **OWNER, "claims": REFS},
    "LeaseReleased": {"lease_id": LEASE, **OWNER, "claims": REFS, "cause": "EXPIRED"},
    "ClaimsCommitted": {"request_id": REQUEST, **OWNER, "claims": REFS},
    "ClaimsDestroyed": {"request_id": REQUEST, **OWNER, "claims": REFS},
    "OwnerTransferred": {"request_id": REQUEST, "owner_type": "USER", "owner_id": 3, "from_cell_id": "c1",
                         "to_cell_id": "c2", "to_owner_id": 3, "claims": REFS},
    "SequenceRangeGranted": {"request_id": REQUEST, "cell_id": "c1", "sequence_name": "projects.id", "start": 1,
                             "end": 1001},
    "RequestRejected": {"request_id": REQUEST, "request_type": "ClaimsRequested", "reason": "CONFLICT",
                        "message": "m", "conflicts": [{"bucket": "NAMESPACE", "value": "a", "cell_id": "c2"}]},
}


def test_there_is_a_sample_of_every_event_type() -> None:
    assert set(SAMPLES) == set(EVENT_MODELS)
    assert len(EVENT_MODELS) == 20


@pytest.mark.parametrize("event_type", sorted(EVENT_MODELS))
def test_parse_event_with_explicit_type(event_type: str) -> None:
    event = parse_event({"source": "s", **SAMPLES[event_type]}, event_type)
    assert type(event) is EVENT_MODELS[event_type]
    assert event.source == "s"


@pytest.mark.parametrize("event_type", sorted(t for t, sample in SAMPLES.items() if "claims" in sample))
def test_claim_lists_are_tuples_of_canonical_refs(event_type: str) -> None:
    event = parse_event({"source": "s", **SAMPLES[event_type]}, event_type)
    claims = getattr(event, "claims")
    assert claims == (ClaimRef(bucket=ClaimBucket.NAMESPACE, value="gitlab-org"),
                      ClaimRef(bucket=ClaimBucket.EMAIL, value="a@b.c"))
    assert isinstance(claims, tuple)
    assert [c.key for c in claims] == [("NAMESPACE", "gitlab-org"), ("EMAIL", "a@b.c")]


def test_missing_type() -> None:
    data = _claim_input()
    del data["type"]
    with pytest.raises(EventInputError, match="type: missing"):
        parse_event(data)


def test_unknown_type() -> None:
    with pytest.raises(EventInputError, match="unknown event type 'ClaimStolen'") as info:
        parse_event(_claim_input(type="ClaimStolen"))
    for name in EVENT_MODELS:
        assert name in str(info.value)


def test_not_a_mapping() -> None:
    with pytest.raises(EventInputError, match="JSON object"):
        parse_event(["ClaimCreated"])  # type: ignore[arg-type]


def test_parse_event_does_not_mutate_its_input() -> None:
    data = _claim_input()
    before = dict(data)
    parse_event(data)
    assert data == before


def test_errors_name_every_offending_field() -> None:
    with pytest.raises(EventInputError) as info:
        parse_event(_claim_input(source="", cell_id="Not_A_Cell", owner_id=-1))
    message = str(info.value)
    assert message.startswith("ClaimCreated: ")
    for field in ("source", "cell_id", "owner_id"):
        assert field in message
    assert {error["loc"] for error in info.value.errors} == {("source",), ("cell_id",), ("owner_id",)}
    # Fields that were fine are not blamed.
    for fine in ("bucket", "owner_type", "value"):
        assert f"{fine}:" not in message


def test_invalid_claim_value_is_reported_on_value() -> None:
    with pytest.raises(EventInputError, match="value: .*path segment") as info:
        parse_event(_claim_input(value="gitlab-org/gitlab"))
    assert [error["loc"] for error in info.value.errors] == [("value",)]


def test_invalid_bucket_is_reported_without_a_value_error() -> None:
    with pytest.raises(EventInputError) as info:
        parse_event(_claim_input(bucket="PATH", value="a/b"))
    assert [error["loc"] for error in info.value.errors] == [("bucket",)]


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(EventInputError) as info:
        parse_event({"type": "CellRegistered", "source": "s", "cell_id": "c1"})
    message = str(info.value)
    for field in ("address", "session_prefix", "region"):
        assert field in message


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(EventInputError, match="colour"):
        parse_event(_claim_input(colour="blue"))


@pytest.mark.parametrize("symbol", ["UNKNOWN", "active", "RETIRED"])
def test_state_outside_the_python_enum_is_rejected(symbol: str) -> None:
    with pytest.raises(EventInputError, match="state"):
        parse_event({"type": "CellStateChanged", "source": "s", "cell_id": "c1", "state": symbol})


@pytest.mark.parametrize("field", ["bucket", "owner_type"])
def test_unknown_symbol_in_claim_enums_is_rejected(field: str) -> None:
    with pytest.raises(EventInputError, match=field):
        parse_event(_claim_input(**{field: "UNKNOWN"}))


def test_cell_updated_without_changes_is_rejected() -> None:
    with pytest.raises(EventInputError, match="at least one of address, region, weight"):
        parse_event({"type": "CellUpdated", "source": "s", "cell_id": "c1"})
    with pytest.raises(EventInputError, match="at least one"):
        parse_event({"type": "CellUpdated", "source": "s", "cell_id": "c1", "address": None, "region": None})


@pytest.mark.parametrize("change", [{"weight": 0}, {"region": "eu"}, {"address": "http://x"}])
def test_cell_updated_with_one_change_is_accepted(change: dict[str, Any]) -> None:
    event = parse_event({"type": "CellUpdated", "source": "s", "cell_id": "c1", **change})
    assert isinstance(event, CellUpdated)
    for key, value in change.items():
        assert getattr(event, key) == value


def test_weight_must_be_a_non_negative_avro_int() -> None:
    with pytest.raises(ValidationError, match="weight"):
        CellUpdated(source="s", cell_id="c1", weight=-1)
    with pytest.raises(ValidationError, match="weight"):
        CellUpdated(source="s", cell_id="c1", weight=2**31)
    assert CellUpdated(source="s", cell_id="c1", weight=2**31 - 1).weight == 2**31 - 1


def test_occurred_at_is_truncated_to_milliseconds() -> None:
    event = parse_event(_claim_input(occurred_at="2024-05-17T09:30:15.123999+00:00"))
    assert event.occurred_at == datetime(2024, 5, 17, 9, 30, 15, 123000, tzinfo=UTC)
    direct = CellStateChanged(
        source="s",
        cell_id="c1",
        state=CellState.ACTIVE,
        occurred_at=datetime(2024, 5, 17, 9, 30, 15, 999999, tzinfo=timezone(timedelta(hours=2))),
    )
    assert direct.occurred_at.microsecond == 999000
    assert direct.occurred_at.second == 15  # truncated, never rounded up
    assert direct.occurred_at.utcoffset() == timedelta(hours=2)


def test_default_occurred_at_is_millisecond_precise_and_aware() -> None:
    event = CellStateChanged(source="s", cell_id="c1", state=CellState.ACTIVE)
    assert event.occurred_at.microsecond % 1000 == 0
    assert event.occurred_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize("naive", ["2024-05-17T09:30:15", datetime(2024, 5, 17, 9, 30, 15)])
def test_occurred_at_must_be_timezone_aware(naive: Any) -> None:
    with pytest.raises(EventInputError, match="occurred_at"):
        parse_event(_claim_input(occurred_at=naive))


def test_events_are_frozen() -> None:
    event = parse_event(_claim_input())
    with pytest.raises(ValueError):
        event.value = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "event",
    [
        CellRegistered(source="s", cell_id="cell-7", address="https://c7", session_prefix="c7", region="r"),
        CellUpdated(source="s", cell_id="cell-7", weight=1),
        CellStateChanged(source="s", cell_id="cell-7", state=CellState.ACTIVE),
    ],
    ids=lambda e: e.EVENT_TYPE,
)
def test_partition_key_of_cell_events_is_cell_id(event: CellRegistered | CellUpdated | CellStateChanged) -> None:
    assert event.partition_key == "cell-7"


@pytest.mark.parametrize("model", [ClaimCreated, ClaimReleased])
@pytest.mark.parametrize(
    ("bucket", "value", "key"),
    [
        (ClaimBucket.NAMESPACE, "GitLab-Org", "NAMESPACE:gitlab-org"),
        (ClaimBucket.USERNAME, "Alice", "USERNAME:alice"),
        (ClaimBucket.EMAIL, "A@B.C", "EMAIL:a@b.c"),
        (ClaimBucket.KEY, "SHA256:Ab", "KEY:SHA256:Ab"),
    ],
)
def test_partition_key_of_claims_is_bucket_and_canonical_value(
    model: type[ClaimCreated] | type[ClaimReleased], bucket: ClaimBucket, value: str, key: str
) -> None:
    event = model(source="s", bucket=bucket, value=value, cell_id="c1", owner_type=OwnerType.USER, owner_id=5)
    assert event.partition_key == key


def test_case_variants_of_a_claim_share_a_partition_key() -> None:
    upper = parse_event(_claim_input(value="GITLAB-ORG"))
    lower = parse_event(_claim_input(value="gitlab-org", type="ClaimReleased"))
    assert upper.partition_key == lower.partition_key == "NAMESPACE:gitlab-org"


def test_to_avro_keeps_uuids_and_enum_members_as_they_are() -> None:
    event = parse_event(_claim_input())
    record = event.to_avro()
    assert record["event_id"] == event.event_id and isinstance(record["event_id"], uuid.UUID)
    assert record["bucket"] is ClaimBucket.NAMESPACE and record["bucket"] == "NAMESPACE"
    assert record["owner_type"] is OwnerType.GROUP
    assert record["occurred_at"] == event.occurred_at
    assert list(record) == list(type(event).model_fields)


def test_to_avro_of_nested_records_is_plain_mappings() -> None:
    event = LeaseReleased(
        source="decider",
        lease_id=uuid.UUID(LEASE),
        cell_id="c1",
        owner_type=OwnerType.USER,
        owner_id=1,
        claims=(ClaimRef(bucket=ClaimBucket.KEY, value="K"),),
        cause=ReleaseCause.EXPIRED,
    )
    record = event.to_avro()
    assert record["request_id"] is None
    assert [dict(c) for c in record["claims"]] == [{"bucket": ClaimBucket.KEY, "value": "K", "metadata": None}]
    assert record["cause"] is ReleaseCause.EXPIRED


# --- the claim commands and decisions --------------------------------------------------------


def _request(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "ClaimsRequested", "source": "c1", **OWNER, "claims": REFS}
    data.update(overrides)
    return data


def test_claims_requested_defaults() -> None:
    event = parse_event(_request())
    assert isinstance(event, ClaimsRequested)
    assert event.lease_ttl_ms == 60_000
    assert isinstance(event.lease_id, uuid.UUID)
    another = parse_event(_request())
    assert isinstance(another, ClaimsRequested)
    assert another.lease_id != event.lease_id  # a fresh lease per request
    assert event.partition_key == str(event.lease_id)


@pytest.mark.parametrize("model_type", ["ClaimsRequested", "ClaimsDestroyRequested"])
def test_a_request_names_each_claim_once(model_type: str) -> None:
    # Case variants are one claim: the duplicate is found after canonicalisation.
    claims = [{"bucket": "NAMESPACE", "value": "Org"}, {"bucket": "NAMESPACE", "value": "org"}]
    with pytest.raises(EventInputError, match="each \\(bucket, value\\) once"):
        parse_event(_request(type=model_type, claims=claims))


def test_same_value_in_two_buckets_is_two_claims() -> None:
    claims = [{"bucket": "NAMESPACE", "value": "alice"}, {"bucket": "USERNAME", "value": "alice"}]
    event = parse_event(_request(claims=claims))
    assert isinstance(event, ClaimsRequested)
    assert len(event.claims) == 2


@pytest.mark.parametrize("count", [0, MAX_CLAIMS_PER_REQUEST + 1])
def test_claim_count_is_bounded(count: int) -> None:
    claims = [{"bucket": "KEY", "value": f"k{n}"} for n in range(count)]
    with pytest.raises(EventInputError, match="claims"):
        parse_event(_request(claims=claims))


def test_claim_count_limit_is_inclusive() -> None:
    claims = [{"bucket": "KEY", "value": f"k{n}"} for n in range(MAX_CLAIMS_PER_REQUEST)]
    event = parse_event(_request(claims=claims))
    assert isinstance(event, ClaimsRequested)
    assert len(event.claims) == MAX_CLAIMS_PER_REQUEST


def test_invalid_nested_claim_value_is_located() -> None:
    claims = [{"bucket": "NAMESPACE", "value": "ok"}, {"bucket": "NAMESPACE", "value": "a/b"}]
    with pytest.raises(EventInputError, match="claims.1.value") as info:
        parse_event(_request(claims=claims))
    assert [error["loc"] for error in info.value.errors] == [("claims", 1, "value")]


@pytest.mark.parametrize(("ttl", "ok"), [(999, False), (1000, True), (MAX_LEASE_TTL_MS, True),
                                         (MAX_LEASE_TTL_MS + 1, False)])
def test_lease_ttl_bounds(ttl: int, ok: bool) -> None:
    if ok:
        event = parse_event(_request(lease_ttl_ms=ttl))
        assert isinstance(event, ClaimsRequested) and event.lease_ttl_ms == ttl
    else:
        with pytest.raises(EventInputError, match="lease_ttl_ms"):
            parse_event(_request(lease_ttl_ms=ttl))


def test_transfer_needs_two_different_cells() -> None:
    with pytest.raises(EventInputError, match="to_cell_id must differ"):
        parse_event({"type": "OwnerTransferRequested", "source": "s", "owner_type": "USER", "owner_id": 1,
                     "from_cell_id": "c1", "to_cell_id": "c1"})


def test_transfer_to_owner_id_is_optional() -> None:
    event = parse_event({"source": "s", **SAMPLES["OwnerTransferRequested"]}, "OwnerTransferRequested")
    assert isinstance(event, OwnerTransferRequested)
    assert event.to_owner_id is None
    assert event.partition_key == "c1/USER/3"


@pytest.mark.parametrize(("size", "ok"), [(0, False), (1, True), (MAX_SEQUENCE_RANGE, True),
                                          (MAX_SEQUENCE_RANGE + 1, False)])
def test_sequence_range_size_bounds(size: int, ok: bool) -> None:
    data = {"type": "SequenceRangeRequested", "source": "s", "cell_id": "c1", "sequence_name": "ids", "size": size}
    if ok:
        assert isinstance(parse_event(data), SequenceRangeRequested)
    else:
        with pytest.raises(EventInputError, match="size"):
            parse_event(data)


@pytest.mark.parametrize("name", ["", "Upper", "has space", "a/b", "x" * 129])
def test_sequence_name_pattern(name: str) -> None:
    with pytest.raises(EventInputError, match="sequence_name"):
        parse_event({"type": "SequenceRangeRequested", "source": "s", "cell_id": "c1", "sequence_name": name,
                     "size": 1})


@pytest.mark.parametrize(
    ("event", "key"),
    [
        (LeaseCommitRequested(source="s", lease_id=uuid.UUID(LEASE), cell_id="c1"), LEASE),
        (LeaseRollbackRequested(source="s", lease_id=uuid.UUID(LEASE), cell_id="c1"), LEASE),
        (ClaimsDestroyRequested(source="s", cell_id="c1", owner_type=OwnerType.PROJECT, owner_id=9,
                                claims=(ClaimRef(bucket=ClaimBucket.KEY, value="k"),)), "c1/PROJECT/9"),
        (SequenceRangeRequested(source="s", cell_id="c1", sequence_name="ids", size=1), "ids"),
        (LeaseExpiryTick(source="s"), "tick"),
        (LeaseReleased(source="s", lease_id=uuid.UUID(LEASE), cell_id="c1", owner_type=OwnerType.USER, owner_id=1,
                       claims=(), cause=ReleaseCause.ROLLBACK), LEASE),
        (RequestRejected(source="s", request_id=uuid.UUID(REQUEST), request_type="X",
                         reason=RejectionReason.INVALID, message="m"), REQUEST),
    ],
    ids=lambda v: v.EVENT_TYPE if isinstance(v, Event) else "",
)
def test_partition_keys_of_claim_commands_and_decisions(event: Event, key: str) -> None:
    assert event.partition_key == key


@pytest.mark.parametrize("field", ["reason", "cause"])
def test_unknown_symbol_of_decision_enums_is_rejected(field: str) -> None:
    event_type = "RequestRejected" if field == "reason" else "LeaseReleased"
    with pytest.raises(EventInputError, match=field):
        parse_event({"source": "s", **SAMPLES[event_type], field: "UNKNOWN"}, event_type)


@pytest.mark.parametrize("bucket", ["UNKNOWN", "PATH"])
def test_unknown_bucket_in_nested_claim_is_rejected(bucket: str) -> None:
    with pytest.raises(EventInputError, match="claims.0.bucket"):
        parse_event(_request(claims=[{"bucket": bucket, "value": "x"}]))


def test_rejection_conflicts_default_to_empty() -> None:
    event = RequestRejected(source="s", request_id=uuid.UUID(REQUEST), request_type="X",
                            reason=RejectionReason.INVALID, message="m")
    assert event.conflicts == ()
    conflict = Conflict(bucket=ClaimBucket.EMAIL, value=PROTECTED_A, cell_id="c2")
    assert RequestRejected(source="s", request_id=uuid.UUID(REQUEST), request_type="X",
                           reason=RejectionReason.CONFLICT, message="m", conflicts=(conflict,)).conflicts == (conflict,)


def test_lease_granted_needs_an_aware_expiry() -> None:
    data = {"source": "s", **SAMPLES["LeaseGranted"], "expires_at": "2024-05-17T09:30:15"}
    with pytest.raises(EventInputError, match="expires_at"):
        parse_event(data, "LeaseGranted")
    event = parse_event({"source": "s", **SAMPLES["LeaseGranted"]}, "LeaseGranted")
    assert isinstance(event, LeaseGranted)
    assert event.expires_at == datetime(2024, 5, 17, 9, 30, 15, tzinfo=UTC)
