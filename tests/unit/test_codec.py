"""The wire format: CRC-64-AVRO fingerprints, Avro single-object encoding, and
schema evolution through writer schemas known by fingerprint."""

from __future__ import annotations

import copy
import io
import json
import struct
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint as fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from topology_store.schemas.codec import HEADER_SIZE, MAGIC, DecodeError, EventCodec
from topology_store.schemas.models import (
    EVENT_MODELS,
    PROTECTED_PREFIX,
    CellRegistered,
    CellState,
    CellStateChanged,
    CellUpdated,
    ClaimBucket,
    ClaimCreated,
    ClaimRef,
    ClaimReleased,
    ClaimsCommitted,
    ClaimsDestroyed,
    ClaimsDestroyRequested,
    ClaimsRequested,
    Conflict,
    Event,
    EventInputError,
    LeaseCommitRequested,
    LeaseCommitted,
    LeaseExpiryTick,
    LeaseGranted,
    LeaseReleased,
    LeaseRollbackRequested,
    OwnerTransferred,
    OwnerTransferRequested,
    OwnerType,
    RecordMetadata,
    RejectionReason,
    ReleaseCause,
    RequestRejected,
    SequenceRangeGranted,
    SequenceRangeRequested,
    parse_event,
)
from topology_store.schemas.registry import (
    EVENT_TYPES,
    HISTORY_DIR,
    EventSchema,
    SchemaRegistry,
    UnknownEventType,
    crc64_avro,
    fingerprint_bytes,
    load_registry,
)

# Published in the Avro specification's test data (share/test/data/schema-tests.txt)
# and in SchemaNormalization's tests: the 64-bit Rabin fingerprint of the schema "null".
AVRO_NULL_FINGERPRINT = 7195948357588979594

OCCURRED = datetime(2024, 5, 17, 9, 30, 15, 123000, tzinfo=UTC)
LEASE_ID = uuid.UUID("6f1c2b7e-6a0f-4d7e-9d3c-1c9a8e6d2b10")
REQUEST_ID = uuid.UUID("0b1e6f44-3c2a-4b8e-a1d2-7f6e5d4c3b2a")
PROTECTED = PROTECTED_PREFIX + "0123456789abcdef" * 4
# Every bucket, the new ones included, and a protected e-mail.
REFS = (
    ClaimRef(bucket=ClaimBucket.NAMESPACE, value="gitlab-org"),
    ClaimRef(bucket=ClaimBucket.USERNAME, value="alice"),
    ClaimRef(bucket=ClaimBucket.EMAIL, value=PROTECTED),
    ClaimRef(bucket=ClaimBucket.KEY, value="SHA256:AbCdEf"),
    ClaimRef(bucket=ClaimBucket.PACKAGE, value="@Scope/Pkg"),
    ClaimRef(bucket=ClaimBucket.IMAGE, value="registry.example.com/group/app"),
    ClaimRef(bucket=ClaimBucket.ORGANIZATION_ID, value="9223372036854775807"),
    # GitLab's buckets (adr/0022), one with a record's metadata.
    ClaimRef(bucket=ClaimBucket.ROUTE, value="gitlab-org/gitlab", metadata=RecordMetadata(
        owner_type=OwnerType.NAMESPACE, owner_id=2**63 - 1, source_type="RAILS_TABLE_ROUTES",
        source_id=b"\x00" * 7 + b"\xff", user_data=b"\x00\x01")),
    ClaimRef(bucket=ClaimBucket.ORGANIZATION_PATH, value="acme"),
    ClaimRef(bucket=ClaimBucket.REDIRECT_ROUTE, value="old-group/old-project"),
    ClaimRef(bucket=ClaimBucket.PROJECT_ID, value="278964"),
    ClaimRef(bucket=ClaimBucket.NAMESPACE_ID, value="9970"),
    ClaimRef(bucket=ClaimBucket.GPG_KEY, value="-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQINBF\n-----END PGP PUBLIC KEY BLOCK-----"),
    ClaimRef(bucket=ClaimBucket.SSH_KEY, value="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMq alice@example.com"),
    ClaimRef(bucket=ClaimBucket.USER_ID, value="1"),
    ClaimRef(bucket=ClaimBucket.SERVICE_DESK_CUSTOM_EMAIL, value="support@acme.example"),
    ClaimRef(bucket=ClaimBucket.GPG_KEY_FINGERPRINT, value="5fb4c5d2e1a0b3c4d5e6f708192a3b4c5d6e7f80"),
    ClaimRef(bucket=ClaimBucket.SSH_KEY_FINGERPRINT, value="SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8"),
    ClaimRef(bucket=ClaimBucket.SNIPPET_ID, value="42"),
    ClaimRef(bucket=ClaimBucket.PAGES_DOMAIN, value="docs.acme.example"),
    ClaimRef(bucket=ClaimBucket.PAGES_UNIQUE_DOMAIN, value="acme-docs-1a2b3c.gitlab.io"),
)


def example_events() -> list[Event]:
    """One example of every event type, with every optional field exercised somewhere."""
    return [
        CellRegistered(
            source="provisioner",
            occurred_at=OCCURRED,
            trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
            cell_id="cell-1",
            address="https://cell-1.example.com",
            session_prefix="cell1_",
            region="eu-west-1",
        ),
        CellUpdated(source="provisioner", occurred_at=OCCURRED, cell_id="cell-1", weight=7),
        CellUpdated(
            source="provisioner",
            occurred_at=OCCURRED,
            cell_id="cell-1",
            address="https://cell-1b.example.com",
            region="us-east-1",
        ),
        CellStateChanged(
            source="operator", occurred_at=OCCURRED, cell_id="cell-1", state=CellState.ACTIVE, reason="ready"
        ),
        ClaimCreated(
            source="cell-1",
            occurred_at=OCCURRED,
            bucket=ClaimBucket.NAMESPACE,
            value="gitlab-org",
            cell_id="cell-1",
            owner_type=OwnerType.GROUP,
            owner_id=1,
        ),
        ClaimReleased(
            source="cell-2",
            occurred_at=OCCURRED,
            bucket=ClaimBucket.KEY,
            value="SHA256:AbCdEf",
            cell_id="cell-2",
            owner_type=OwnerType.USER,
            owner_id=2**63 - 1,
        ),
        ClaimsRequested(
            source="cell-1",
            occurred_at=OCCURRED,
            lease_id=LEASE_ID,
            cell_id="cell-1",
            owner_type=OwnerType.ORGANIZATION,
            owner_id=0,
            claims=REFS,
            destroy_claims=(ClaimRef(bucket=ClaimBucket.ROUTE, value="gitlab-org/old-name"),),
            lease_ttl_ms=24 * 3600 * 1000,
        ),
        LeaseCommitRequested(source="cell-1", occurred_at=OCCURRED, lease_id=LEASE_ID, cell_id="cell-1"),
        LeaseRollbackRequested(
            source="cell-1", occurred_at=OCCURRED, trace_id="abc", lease_id=LEASE_ID, cell_id="cell-1"
        ),
        ClaimsDestroyRequested(
            source="cell-1",
            occurred_at=OCCURRED,
            cell_id="cell-1",
            owner_type=OwnerType.PROJECT,
            owner_id=5,
            claims=REFS[:1],
        ),
        OwnerTransferRequested(
            source="operator",
            occurred_at=OCCURRED,
            owner_type=OwnerType.GROUP,
            owner_id=1,
            from_cell_id="cell-1",
            to_cell_id="cell-2",
        ),
        OwnerTransferRequested(
            source="operator",
            occurred_at=OCCURRED,
            owner_type=OwnerType.GROUP,
            owner_id=1,
            from_cell_id="cell-1",
            to_cell_id="cell-2",
            to_owner_id=2**63 - 1,
        ),
        SequenceRangeRequested(
            source="cell-1", occurred_at=OCCURRED, cell_id="cell-1", sequence_name="projects.id", size=2**40
        ),
        LeaseExpiryTick(source="decider", occurred_at=OCCURRED),
        LeaseGranted(
            source="decider",
            occurred_at=OCCURRED,
            request_id=REQUEST_ID,
            lease_id=LEASE_ID,
            cell_id="cell-1",
            owner_type=OwnerType.USER,
            owner_id=7,
            claims=REFS,
            expires_at=OCCURRED + timedelta(minutes=1),
        ),
        LeaseGranted(  # every claim already held by the owner: an empty lease
            source="decider",
            occurred_at=OCCURRED,
            request_id=REQUEST_ID,
            lease_id=LEASE_ID,
            cell_id="cell-1",
            owner_type=OwnerType.USER,
            owner_id=7,
            claims=(),
            expires_at=OCCURRED,
        ),
        LeaseCommitted(
            source="decider",
            occurred_at=OCCURRED,
            request_id=REQUEST_ID,
            lease_id=LEASE_ID,
            cell_id="cell-1",
            owner_type=OwnerType.USER,
            owner_id=7,
            claims=REFS[2:4],
        ),
        LeaseReleased(  # rolled back: answers a request
            source="decider",
            occurred_at=OCCURRED,
            request_id=REQUEST_ID,
            lease_id=LEASE_ID,
            cell_id="cell-1",
            owner_type=OwnerType.USER,
            owner_id=7,
            claims=REFS,
            cause=ReleaseCause.ROLLBACK,
        ),
        LeaseReleased(  # expired: no request asked for it
            source="decider",
            occurred_at=OCCURRED,
            lease_id=LEASE_ID,
            cell_id="cell-1",
            owner_type=OwnerType.USER,
            owner_id=7,
            claims=REFS[:1],
            cause=ReleaseCause.EXPIRED,
        ),
        ClaimsCommitted(
            source="decider",
            occurred_at=OCCURRED,
            request_id=REQUEST_ID,
            cell_id="cell-3",
            owner_type=OwnerType.GROUP,
            owner_id=1,
            claims=REFS[:1],
        ),
        ClaimsDestroyed(
            source="decider",
            occurred_at=OCCURRED,
            request_id=REQUEST_ID,
            cell_id="cell-3",
            owner_type=OwnerType.GROUP,
            owner_id=1,
            claims=REFS[4:],
        ),
        OwnerTransferred(
            source="decider",
            occurred_at=OCCURRED,
            request_id=REQUEST_ID,
            owner_type=OwnerType.GROUP,
            owner_id=1,
            from_cell_id="cell-1",
            to_cell_id="cell-2",
            to_owner_id=11,
            claims=REFS,
        ),
        SequenceRangeGranted(
            source="decider",
            occurred_at=OCCURRED,
            request_id=REQUEST_ID,
            cell_id="cell-1",
            sequence_name="projects.id",
            start=1,
            end=2**63 - 1,
        ),
        RequestRejected(
            source="decider",
            occurred_at=OCCURRED,
            request_id=REQUEST_ID,
            request_type="ClaimsRequested",
            reason=RejectionReason.CONFLICT,
            message="2 of 7 claims are held by another owner",
            conflicts=(
                Conflict(bucket=ClaimBucket.NAMESPACE, value="gitlab-org", cell_id="cell-2"),
                Conflict(bucket=ClaimBucket.EMAIL, value=PROTECTED, cell_id="cell-3"),
            ),
        ),
        RequestRejected(
            source="decider",
            occurred_at=OCCURRED,
            request_id=REQUEST_ID,
            request_type="LeaseCommitRequested",
            reason=RejectionReason.EXHAUSTED,
            message="",
        ),
    ]


def _encode(event: Event, codec: EventCodec | None = None) -> bytes:
    return (codec or EventCodec()).encode(event.EVENT_TYPE, event.to_avro())


def _schema_from_raw(raw: dict[str, Any]) -> EventSchema:
    """What ``schemas.registry._load`` builds from a file, built in memory."""
    parsed = fastavro.parse_schema(copy.deepcopy(raw), named_schemas={})
    return EventSchema(event_type=raw["name"], parsed=parsed, fingerprint=fingerprint_bytes(parsed), raw=raw)


def _single_schema_codec(schema: EventSchema) -> EventCodec:
    """A codec that writes with ``schema``: a producer built against another schema version."""
    return EventCodec(SchemaRegistry(readers={schema.event_type: schema}, writers={schema.fingerprint: schema}))


def _registry_with_writers(*extra: EventSchema) -> SchemaRegistry:
    current = load_registry()
    writers = dict(current.writers)
    for schema in extra:
        writers[schema.fingerprint] = schema
    return SchemaRegistry(readers=dict(current.readers), writers=writers)


def _current_raw(event_type: str) -> dict[str, Any]:
    return copy.deepcopy(load_registry().readers[event_type].raw)


# --- CRC-64-AVRO ---------------------------------------------------------------------------


def test_crc64_of_null_schema_matches_avro_published_vector() -> None:
    canonical = to_parsing_canonical_form(fastavro.parse_schema("null"))
    assert canonical == '"null"'
    assert crc64_avro(canonical.encode("utf-8")) == AVRO_NULL_FINGERPRINT


def test_fingerprint_bytes_of_null_schema_is_little_endian_vector() -> None:
    assert fingerprint_bytes(fastavro.parse_schema("null")) == struct.pack("<Q", AVRO_NULL_FINGERPRINT)
    assert fingerprint_bytes(fastavro.parse_schema("null")).hex() == "8a8f25cce724dd63"


def test_crc64_of_empty_input_is_the_empty_fingerprint() -> None:
    assert crc64_avro(b"") == 0xC15D213AA4D7A795


@pytest.mark.parametrize(
    "canonical",
    [
        '"null"',
        '"boolean"',
        '"long"',
        '"string"',
        '{"type":"array","items":"int"}',
        '{"name":"foo","type":"fixed","size":16}',
        '{"name":"E","type":"enum","symbols":["A","B"]}',
        "é ü 中文",
    ],
)
def test_crc64_agrees_with_fastavro_on_samples(canonical: str) -> None:
    ours = struct.pack("<Q", crc64_avro(canonical.encode("utf-8"))).hex()
    assert ours == fastavro_fingerprint(canonical, "CRC-64-AVRO")


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_registry_fingerprint_agrees_with_fastavro(event_type: str) -> None:
    schema = load_registry().readers[event_type]
    canonical = to_parsing_canonical_form(schema.parsed)
    assert schema.fingerprint.hex() == fastavro_fingerprint(canonical, "CRC-64-AVRO")
    assert len(schema.fingerprint) == 8


def test_registry_knows_every_event_type_and_fingerprints_are_distinct() -> None:
    registry = load_registry()
    assert set(EVENT_TYPES) == set(EVENT_MODELS)
    assert len(EVENT_TYPES) == 20
    fingerprints = [schema.fingerprint for schema in registry.readers.values()]
    assert len(set(fingerprints)) == len(fingerprints)
    for schema in registry.readers.values():
        assert registry.writers[schema.fingerprint] is schema


def test_registry_reader_of_unknown_type_raises() -> None:
    with pytest.raises(UnknownEventType):
        load_registry().reader("CellExploded")


# --- byte layout ---------------------------------------------------------------------------


def test_encoded_bytes_layout_marker_fingerprint_body() -> None:
    event = example_events()[4]  # ClaimCreated
    data = _encode(event)
    schema = load_registry().readers["ClaimCreated"]

    assert MAGIC == b"\xc3\x01"
    assert HEADER_SIZE == 10
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == schema.fingerprint

    body = io.BytesIO(data[10:])
    record = fastavro.schemaless_reader(body, schema.parsed, None)
    assert body.tell() == len(data) - 10  # the body is exactly one record
    assert record == {
        "event_id": event.event_id,
        "occurred_at": OCCURRED,
        "source": "cell-1",
        "trace_id": None,
        "bucket": "NAMESPACE",
        "value": "gitlab-org",
        "cell_id": "cell-1",
        "owner_type": "GROUP",
        "owner_id": 1,
    }


def test_encoded_body_is_plain_avro_binary() -> None:
    event = example_events()[3]  # CellStateChanged
    data = _encode(event)
    schema = load_registry().readers["CellStateChanged"]
    expected_body = io.BytesIO()
    fastavro.schemaless_writer(expected_body, schema.parsed, event.to_avro())
    assert data[HEADER_SIZE:] == expected_body.getvalue()


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("event", example_events(), ids=lambda e: e.EVENT_TYPE)
def test_round_trip_through_codec_and_parse_event(event: Event) -> None:
    codec = EventCodec()
    decoded = codec.decode(_encode(event, codec))
    assert decoded.event_type == event.EVENT_TYPE
    restored = parse_event(decoded.payload, decoded.event_type)
    assert type(restored) is type(event)
    assert restored == event


def test_every_event_type_has_a_round_trip_example() -> None:
    assert {event.EVENT_TYPE for event in example_events()} == set(EVENT_TYPES)


def test_examples_exercise_every_enum_symbol() -> None:
    events = example_events()
    buckets = {ref.bucket for e in events for ref in getattr(e, "claims", ())}
    assert buckets == set(ClaimBucket)
    assert {e.cause for e in events if isinstance(e, LeaseReleased)} == set(ReleaseCause)
    assert {e.request_id is None for e in events if isinstance(e, LeaseReleased)} == {True, False}
    assert {e.to_owner_id is None for e in events if isinstance(e, OwnerTransferRequested)} == {True, False}


def test_round_trip_keeps_claim_order_and_nested_records() -> None:
    event = example_events()[6]  # ClaimsRequested
    assert isinstance(event, ClaimsRequested)
    codec = EventCodec()
    decoded = codec.decode(_encode(event, codec))
    assert decoded.payload["claims"] == [
        {"bucket": ref.bucket.value, "value": ref.value,
         "metadata": None if ref.metadata is None else ref.metadata.model_dump(mode="python")} for ref in REFS]
    assert decoded.payload["claims"][7]["metadata"]["source_id"] == b"\x00" * 7 + b"\xff"  # Avro bytes, as sent
    assert decoded.payload["lease_id"] == LEASE_ID


def test_round_trip_of_an_empty_array() -> None:
    rejected = RequestRejected(
        source="decider", request_id=REQUEST_ID, request_type="X", reason=RejectionReason.INVALID, message="m"
    )
    codec = EventCodec()
    decoded = codec.decode(_encode(rejected, codec))
    assert decoded.payload["conflicts"] == []
    assert parse_event(decoded.payload, decoded.event_type) == rejected


def test_round_trip_keeps_the_lease_expiry() -> None:
    # expires_at is timestamp-millis on the wire: a replay of the recorded decision
    # must hold the lease until exactly the instant the live decision did.
    granted = LeaseGranted(
        source="decider",
        occurred_at=OCCURRED,
        request_id=REQUEST_ID,
        lease_id=LEASE_ID,
        cell_id="cell-1",
        owner_type=OwnerType.USER,
        owner_id=7,
        claims=REFS[:1],
        expires_at=datetime(2024, 5, 17, 9, 31, 15, 123456, tzinfo=UTC),
    )
    codec = EventCodec()
    decoded = codec.decode(_encode(granted, codec))
    assert parse_event(decoded.payload, decoded.event_type) == granted


@pytest.mark.parametrize(
    "occurred_at",
    [
        datetime(2024, 5, 1, 12, 0, 0, 1999, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_round_trip_keeps_the_instant_of_any_timestamp(occurred_at: datetime) -> None:
    event = CellStateChanged(source="operator", occurred_at=occurred_at, cell_id="cell-9", state=CellState.DRAINING)
    codec = EventCodec()
    decoded = codec.decode(_encode(event, codec))
    assert decoded.payload["occurred_at"] == occurred_at.replace(microsecond=occurred_at.microsecond // 1000 * 1000)
    assert decoded.payload["occurred_at"].utcoffset() == timedelta(0)
    assert parse_event(decoded.payload, decoded.event_type) == event


def test_decode_accepts_bytearray_and_memoryview() -> None:
    event = example_events()[0]
    data = _encode(event)
    codec = EventCodec()
    assert codec.decode(bytearray(data)) == codec.decode(data)
    assert codec.decode(memoryview(data)) == codec.decode(data)


def test_encode_of_unknown_event_type_raises() -> None:
    with pytest.raises(UnknownEventType):
        EventCodec().encode("CellExploded", {})


# --- malformed input -----------------------------------------------------------------------


def _valid_bytes() -> bytes:
    return _encode(example_events()[3])


def test_decode_empty_bytes() -> None:
    with pytest.raises(DecodeError, match="marker"):
        EventCodec().decode(b"")


def test_decode_header_only_short() -> None:
    with pytest.raises(DecodeError):
        EventCodec().decode(_valid_bytes()[:HEADER_SIZE - 1])


@pytest.mark.parametrize("marker", [b"\xc3\x02", b"\xc2\x01", b"\x01\xc3", b"\x00\x00"])
def test_decode_wrong_marker(marker: bytes) -> None:
    data = _valid_bytes()
    with pytest.raises(DecodeError, match="marker"):
        EventCodec().decode(marker + data[2:])


def test_decode_unknown_fingerprint() -> None:
    data = _valid_bytes()
    unknown = b"\x00" * 8
    assert unknown not in load_registry().writers
    with pytest.raises(DecodeError, match="unknown writer schema fingerprint 0000000000000000"):
        EventCodec().decode(MAGIC + unknown + data[HEADER_SIZE:])


@pytest.mark.parametrize("event", example_events(), ids=lambda e: e.EVENT_TYPE)
def test_decode_every_truncation_of_the_body(event: Event) -> None:
    data = _encode(event)
    codec = EventCodec()
    for end in range(HEADER_SIZE, len(data)):
        with pytest.raises(DecodeError):
            codec.decode(data[:end])


@pytest.mark.parametrize("trailer", [b"\x00", b"\x02a", b"\xff" * 16])
def test_decode_trailing_bytes(trailer: bytes) -> None:
    with pytest.raises(DecodeError, match="trailing bytes"):
        EventCodec().decode(_valid_bytes() + trailer)


# --- schema evolution ----------------------------------------------------------------------


def _older_cell_state_changed() -> EventSchema:
    raw = _current_raw("CellStateChanged")
    raw["fields"] = [field for field in raw["fields"] if field["name"] != "reason"]
    return _schema_from_raw(raw)


def _newer_cell_state_changed() -> EventSchema:
    raw = _current_raw("CellStateChanged")
    raw["fields"].append({"name": "operator", "type": ["null", "string"], "default": None})
    return _schema_from_raw(raw)


def _cell_state_with_extra_symbol() -> EventSchema:
    raw = _current_raw("CellStateChanged")
    (state_field,) = [field for field in raw["fields"] if field["name"] == "state"]
    symbols = state_field["type"]["symbols"]
    # Inserted in the middle, so symbol indexes differ from the reader's: resolution is by name.
    symbols.insert(symbols.index("DECOMMISSIONED"), "RETIRED")
    return _schema_from_raw(raw)


def _base_record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": str(uuid.UUID("5b0e2a8c-1f7e-4c1a-9d6b-0a1b2c3d4e5f")),
        "occurred_at": OCCURRED,
        "source": "operator",
        "trace_id": None,
        "cell_id": "cell-1",
        "state": "ACTIVE",
    }
    record.update(overrides)
    return record


def test_older_writer_without_reason_gets_reader_default() -> None:
    older = _older_cell_state_changed()
    assert older.fingerprint != load_registry().readers["CellStateChanged"].fingerprint
    data = _single_schema_codec(older).encode("CellStateChanged", _base_record())
    assert data[2:HEADER_SIZE] == older.fingerprint

    decoded = EventCodec(_registry_with_writers(older)).decode(data)

    assert decoded.event_type == "CellStateChanged"
    assert decoded.payload["reason"] == ""
    event = parse_event(decoded.payload, decoded.event_type)
    assert event == CellStateChanged(
        event_id=uuid.UUID("5b0e2a8c-1f7e-4c1a-9d6b-0a1b2c3d4e5f"),
        occurred_at=OCCURRED,
        source="operator",
        cell_id="cell-1",
        state=CellState.ACTIVE,
        reason="",
    )


def test_older_writer_is_unknown_without_its_history_schema() -> None:
    older = _older_cell_state_changed()
    data = _single_schema_codec(older).encode("CellStateChanged", _base_record())
    with pytest.raises(DecodeError, match="unknown writer schema fingerprint"):
        EventCodec().decode(data)


def test_newer_writer_extra_optional_field_is_ignored_by_reader() -> None:
    newer = _newer_cell_state_changed()
    data = _single_schema_codec(newer).encode(
        "CellStateChanged", _base_record(reason="maintenance", operator="alice")
    )

    decoded = EventCodec(_registry_with_writers(newer)).decode(data)

    assert "operator" not in decoded.payload
    assert decoded.payload["reason"] == "maintenance"
    event = parse_event(decoded.payload, decoded.event_type)
    assert isinstance(event, CellStateChanged)
    assert event.reason == "maintenance"
    assert event.state is CellState.ACTIVE


def test_writer_with_extra_enum_symbol_resolves_known_symbols_by_name() -> None:
    extended = _cell_state_with_extra_symbol()
    data = _single_schema_codec(extended).encode("CellStateChanged", _base_record(state="DECOMMISSIONED"))
    decoded = EventCodec(_registry_with_writers(extended)).decode(data)
    assert decoded.payload["state"] == "DECOMMISSIONED"


def test_writer_enum_symbol_unknown_to_reader_resolves_to_unknown_and_is_rejected() -> None:
    extended = _cell_state_with_extra_symbol()
    data = _single_schema_codec(extended).encode("CellStateChanged", _base_record(state="RETIRED"))

    decoded = EventCodec(_registry_with_writers(extended)).decode(data)

    assert decoded.payload["state"] == "UNKNOWN"
    with pytest.raises(EventInputError, match="state"):
        parse_event(decoded.payload, decoded.event_type)


# --- history: writer schemas of earlier versions --------------------------------------------


def _history_schema(file_name: str) -> EventSchema:
    raw = json.loads((HISTORY_DIR / file_name).read_text(encoding="utf-8"))
    return _schema_from_raw(raw)


def _v1_claim_record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": str(uuid.UUID("5b0e2a8c-1f7e-4c1a-9d6b-0a1b2c3d4e5f")),
        "occurred_at": OCCURRED,
        "source": "cell-1",
        "trace_id": "t-1",
        "bucket": "NAMESPACE",
        "value": "gitlab-org",
        "cell_id": "cell-1",
        "owner_type": "GROUP",
        "owner_id": 42,
    }
    record.update(overrides)
    return record


@pytest.mark.parametrize(
    ("file_name", "model"),
    [("ClaimCreated.v1.avsc", ClaimCreated), ("ClaimReleased.v1.avsc", ClaimReleased)],
    ids=["ClaimCreated", "ClaimReleased"],
)
@pytest.mark.parametrize("bucket", ["NAMESPACE", "USERNAME", "EMAIL", "KEY"])
def test_bytes_of_the_v1_writer_decode_to_a_valid_event(
    file_name: str, model: type[ClaimCreated] | type[ClaimReleased], bucket: str
) -> None:
    v1 = _history_schema(file_name)
    current = load_registry().readers[model.EVENT_TYPE]
    assert v1.fingerprint != current.fingerprint
    value = "Alice@Example.com" if bucket == "EMAIL" else "Alice"
    data = _single_schema_codec(v1).encode(model.EVENT_TYPE, _v1_claim_record(bucket=bucket, value=value))
    assert data[2:HEADER_SIZE] == v1.fingerprint  # written as an old producer would

    decoded = EventCodec().decode(data)  # the shipped registry knows the v1 writer

    assert decoded.event_type == model.EVENT_TYPE
    event = parse_event(decoded.payload, decoded.event_type)
    assert event == model(
        event_id=uuid.UUID("5b0e2a8c-1f7e-4c1a-9d6b-0a1b2c3d4e5f"),
        occurred_at=OCCURRED,
        source="cell-1",
        trace_id="t-1",
        bucket=ClaimBucket(bucket),
        value=value if bucket == "KEY" else value.lower(),  # canonical: KEY keeps its case
        cell_id="cell-1",
        owner_type=OwnerType.GROUP,
        owner_id=42,
    )


def test_v1_bytes_are_unknown_without_the_history_schema() -> None:
    v1 = _history_schema("ClaimCreated.v1.avsc")
    data = _single_schema_codec(v1).encode("ClaimCreated", _v1_claim_record())
    current_only = load_registry()
    readers_only = SchemaRegistry(
        readers=dict(current_only.readers), writers={s.fingerprint: s for s in current_only.readers.values()}
    )
    with pytest.raises(DecodeError, match="unknown writer schema fingerprint"):
        EventCodec(readers_only).decode(data)


def test_v1_reader_sees_a_new_bucket_as_unknown_and_rejects_it() -> None:
    # A projector still on v1 reading a PACKAGE claim: resolved to UNKNOWN, then refused.
    v1 = _history_schema("ClaimCreated.v1.avsc")
    current = load_registry().readers["ClaimCreated"]
    event = ClaimCreated(
        source="cell-1", bucket=ClaimBucket.PACKAGE, value="@Scope/Pkg", cell_id="cell-1",
        owner_type=OwnerType.GROUP, owner_id=1,
    )
    data = _encode(event)
    old_projector = EventCodec(SchemaRegistry(readers={"ClaimCreated": v1}, writers={current.fingerprint: current}))
    decoded = old_projector.decode(data)
    assert decoded.payload["bucket"] == "UNKNOWN"
    with pytest.raises(EventInputError, match="bucket"):
        parse_event(decoded.payload, decoded.event_type)
