"""The outbox contract as shipped, and the relay's mapping of a row to a Kafka record
(no servers: what needs PostgreSQL or Kafka is in tests/integration/test_relay.py)."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from topology_store.cli.main import build_parser
from topology_store.producer.emit import parse_lines
from topology_store.producer.outbox import OUTBOX_CHANNEL, outbox_ddl
from topology_store.producer.relay import (
    MAX_ERROR_CHARS,
    InvalidJsonRow,
    OutboxRelay,
    OutboxRow,
    encode_json_row,
    encode_json_rows,
    libpq_url,
)
from topology_store.producer.relay_metrics import RelayMetrics
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EVENT_TYPE_HEADER, EventCodec
from topology_store.schemas.models import (
    EVENT_MODELS,
    CellRegistered,
    ClaimBucket,
    ClaimCreated,
    OwnerType,
    canonical_claim_value,
)


def row_for(event: CellRegistered | ClaimCreated, headers: dict[str, object] | None = None) -> OutboxRow:
    payload = EventCodec().encode(event.EVENT_TYPE, event.to_avro())
    return OutboxRow(id=1, event_type=event.EVENT_TYPE, partition_key=event.partition_key, payload=payload,
                     headers=headers or {})


def test_the_ddl_ships_in_the_package_with_what_the_relay_relies_on() -> None:
    ddl = outbox_ddl()
    assert "CREATE TABLE IF NOT EXISTS topology_outbox" in ddl
    for column in ("id", "event_id", "event_type", "partition_key", "payload", "headers", "created_at", "published_at"):
        assert re.search(rf"^\s+{column}\s", ddl, re.MULTILINE), column
    # Per-key order depends on these three: ids drawn one at a time, under the key's lock.
    assert "CACHE 1" in ddl
    assert "pg_advisory_xact_lock" in ddl
    assert "BEFORE INSERT ON topology_outbox" in ddl
    assert f"pg_notify('{OUTBOX_CHANNEL}'" in ddl
    assert "WHERE published_at IS NULL" in ddl  # the relay's partial index


def test_a_row_becomes_a_record_routed_and_keyed_like_the_publisher_would() -> None:
    settings = Settings(cells_topic="t.cells", claims_topic="t.claims")
    claim = ClaimCreated(source="cell-1", bucket=ClaimBucket.EMAIL, value="Ada@Example.com", cell_id="cell-1",
                         owner_type=OwnerType.USER, owner_id=1)
    cell = CellRegistered(source="ops", cell_id="cell-7", address="https://c7.example.com", session_prefix="c7",
                          region="eu")

    claim_record = row_for(claim).record(settings)
    cell_record = row_for(cell).record(settings)

    assert claim_record.topic == "t.claims" and cell_record.topic == "t.cells"
    assert claim_record.key == claim.partition_key.encode() and cell_record.key == b"cell-7"
    assert claim_record.value == row_for(claim).payload  # bytes pass through untouched
    assert claim_record.headers == ((EVENT_TYPE_HEADER, b"ClaimCreated"),)


def test_extra_headers_are_utf8_text_and_cannot_override_the_event_type() -> None:
    settings = Settings()
    claim = ClaimCreated(source="c", bucket=ClaimBucket.NAMESPACE, value="x", cell_id="cell-1",
                         owner_type=OwnerType.GROUP, owner_id=1)
    record = row_for(claim, {"traceparent": "00-abc-01", EVENT_TYPE_HEADER: "Forged", "attempt": 2,
                             "name": "Zoë"}).record(settings)
    headers = dict(record.headers)
    assert record.headers[0] == (EVENT_TYPE_HEADER, b"ClaimCreated")
    assert [name for name, _ in record.headers].count(EVENT_TYPE_HEADER) == 1
    assert headers["traceparent"] == b"00-abc-01"
    assert headers["attempt"] == b"2"
    assert headers["name"] == "Zoë".encode()


def test_relay_settings_survive_the_environment_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    # Child processes get every setting as str(value) (tests/conftest.py: settings_env).
    defaults = Settings()
    for name in ("relay_source_url", "relay_batch_size", "relay_poll_interval_s", "relay_delete_published",
                 "relay_metrics_port"):
        monkeypatch.setenv(f"TOPOLOGY_{name.upper()}", str(getattr(defaults, name)))
    assert Settings().model_dump() == defaults.model_dump()
    monkeypatch.setenv("TOPOLOGY_RELAY_DELETE_PUBLISHED", "true")
    monkeypatch.setenv("TOPOLOGY_RELAY_SOURCE_URL", "postgresql://app@db/monolith")
    configured = Settings()
    assert configured.relay_delete_published is True
    assert OutboxRelay(configured).source_url == "postgresql://app@db/monolith"


def test_a_relay_needs_a_source() -> None:
    with pytest.raises(ValueError, match="--source"):
        OutboxRelay(Settings(relay_source_url=""))
    relay = OutboxRelay(Settings(), "postgresql+psycopg://u@h/db", delete_published=True)
    assert relay.source_url == libpq_url("postgresql+psycopg://u@h/db") == "postgresql://u@h/db"
    assert relay.delete_published is True


def test_the_relay_command_line() -> None:
    args = build_parser().parse_args(["relay", "--source", "postgresql://h/db", "--delete-published"])
    assert (args.command, args.source, args.delete_published, args.init_schema) == (
        "relay", "postgresql://h/db", True, False)
    assert build_parser().parse_args(["relay", "--init-schema"]).init_schema is True


def test_relay_metrics_live_on_a_registry_of_their_own() -> None:
    first, second = RelayMetrics(), RelayMetrics()  # a second one must not clash with the first
    first.published.labels("ClaimCreated").inc(3)
    first.outbox_depth.set(7)
    assert first.registry.get_sample_value("topology_relay_published_total", {"event_type": "ClaimCreated"}) == 3
    assert first.registry.get_sample_value("topology_relay_outbox_depth") == 7
    assert second.registry.get_sample_value("topology_relay_outbox_depth") == 0
    names = {metric.name for metric in first.registry.collect()}
    assert {"topology_relay_outbox_depth", "topology_relay_oldest_unpublished_age_seconds",
            "topology_relay_published", "topology_relay_publish_errors"} <= names


# --- JSON rows (payload_json) --------------------------------------------------------------------

ROW_EVENT_ID = uuid.UUID("6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f")
ROW_CREATED = datetime(2026, 12, 3, 10, 0, 0, 123456, tzinfo=UTC)


def json_row(fields: object, event_type: str = "ClaimCreated", key: str = "NAMESPACE:gitlab-org",
             row_id: int = 1) -> OutboxRow:
    return OutboxRow(id=row_id, event_type=event_type, partition_key=key, payload=None, headers={},
                     payload_json=fields, event_id=ROW_EVENT_ID, created_at=ROW_CREATED)


def claim_fields(**update: object) -> dict[str, object]:
    return {"source": "cell-1", "bucket": "NAMESPACE", "value": "GitLab-Org", "cell_id": "cell-1",
            "owner_type": "GROUP", "owner_id": 9970, **update}


def test_a_json_row_encodes_to_the_bytes_topology_emit_would_publish() -> None:
    codec = EventCodec()
    fields = claim_fields(event_id=str(ROW_EVENT_ID), occurred_at="2026-12-03T09:00:00Z", trace_id="abc")
    (emitted,), errors = parse_lines([json.dumps({"type": "ClaimCreated", **fields})])
    assert errors == []
    assert encode_json_row(json_row(fields), codec) == codec.encode("ClaimCreated", emitted.to_avro())
    # The row's event_id and created_at stand in for fields left out; "type" may be given if it agrees.
    defaulted = codec.decode(encode_json_row(json_row({"type": "ClaimCreated", **claim_fields()}), codec)).payload
    assert defaulted["event_id"] == ROW_EVENT_ID
    assert defaulted["occurred_at"] == ROW_CREATED.replace(microsecond=123000)
    assert defaulted["value"] == "gitlab-org"


@pytest.mark.parametrize(("fields", "event_type", "key", "message"), [
    (claim_fields(colour="red"), "ClaimCreated", "NAMESPACE:gitlab-org", "colour: Extra inputs"),
    (claim_fields(owner_id="many"), "ClaimCreated", "NAMESPACE:gitlab-org", "owner_id"),
    (claim_fields(), "ClaimStolen", "NAMESPACE:gitlab-org", "unknown event type 'ClaimStolen'"),
    (claim_fields(cell_id="Cell One"), "ClaimCreated", "NAMESPACE:gitlab-org", "cell_id"),
    (claim_fields(bucket="PLANET"), "ClaimCreated", "NAMESPACE:gitlab-org", "bucket"),
    ({"type": "ClaimReleased", **claim_fields()}, "ClaimCreated", "NAMESPACE:gitlab-org", "contradicts"),
    (claim_fields(event_id=str(uuid.uuid4())), "ClaimCreated", "NAMESPACE:gitlab-org", "not the row's event_id"),
    (claim_fields(), "ClaimCreated", "NAMESPACE:GitLab-Org", "partition_key"),  # not the canonical key
    ([claim_fields()], "ClaimCreated", "NAMESPACE:gitlab-org", "must be a JSON object"),
])
def test_an_invalid_json_row_is_refused_with_a_reason(fields: object, event_type: str, key: str,
                                                      message: str) -> None:
    with pytest.raises(InvalidJsonRow, match=re.escape(message)):
        encode_json_row(json_row(fields, event_type, key), EventCodec())


def test_a_batch_splits_into_rows_to_publish_in_id_order_and_held_rows() -> None:
    codec = EventCodec()
    encoded = row_for(ClaimCreated(source="c", bucket=ClaimBucket.NAMESPACE, value="gitlab-org", cell_id="cell-1",
                                   owner_type=OwnerType.GROUP, owner_id=1))
    rows = [json_row(claim_fields(), row_id=1), json_row(claim_fields(owner_id=-1), row_id=2),
            OutboxRow(3, encoded.event_type, encoded.partition_key, encoded.payload, {}),
            json_row({"x": "y" * 5000}, row_id=4), json_row(claim_fields(owner_id=2), row_id=5)]
    ready, failed = encode_json_rows(rows, codec)
    assert [row.id for row in ready] == [1, 3, 5]
    assert all(row.payload is not None for row in ready) and ready[1].payload == encoded.payload
    assert [row.id for row, _ in failed] == [2, 4]
    assert all(len(error) <= MAX_ERROR_CHARS for _, error in failed)
    with pytest.raises(ValueError, match="encode_json_row"):
        rows[0].record(Settings())  # an unencoded JSON row can never reach the broker


def test_the_ddl_has_the_json_columns_and_upgrades_an_older_table() -> None:
    ddl = outbox_ddl()
    for column in ("payload_json", "failed_at", "error"):
        assert re.search(rf"^\s+{column}\s", ddl, re.MULTILINE), column
        assert f"ADD COLUMN IF NOT EXISTS {column}" in ddl
    assert "ALTER COLUMN payload DROP NOT NULL" in ddl
    assert "num_nonnulls(payload, payload_json) = 1" in ddl
    metrics = RelayMetrics()
    metrics.invalid_rows.inc(2)
    metrics.failed_rows.set(2)
    assert metrics.registry.get_sample_value("topology_relay_invalid_rows_total") == 2
    assert metrics.registry.get_sample_value("topology_relay_failed_rows") == 2


# --- docs/outbox-from-rails.md: the Ruby example against the contract ------------------------------

RAILS_DOC = Path(__file__).resolve().parents[2] / "docs" / "outbox-from-rails.md"


def _closing(text: str, opening: int) -> int:
    """Index of the bracket closing the one at ``opening``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack: list[str] = []
    for index in range(opening, len(text)):
        if text[index] in pairs:
            stack.append(pairs[text[index]])
        elif stack and text[index] == stack[-1]:
            stack.pop()
            if not stack:
                return index
    raise AssertionError(f"unbalanced bracket at {opening}")


def _hash_keys(text: str) -> list[str]:
    """The top-level ``key:`` names of a Ruby argument list or hash literal (no nesting)."""
    keys, depth = [], 0
    for match in re.finditer(r"[(){}\[\]]|(?<![:\w])(\w+):(?!:)", text):
        token = match.group(0)
        if token in "({[":
            depth += 1
        elif token in ")}]":
            depth -= 1
        elif depth == 0:
            keys.append(match.group(1))
    return keys


def buckets_kept_as_given() -> set[str]:
    """The buckets whose canonical form keeps a mixed-case value (a bucket taking none of
    the probes, digits only, has no case to keep)."""
    kept = set()
    for bucket in ClaimBucket:
        for probe in ("Ab1", "Ab1@Example.com", "Ab/1"):
            try:
                canonical = canonical_claim_value(bucket, probe)
            except ValueError:
                continue
            if canonical == probe:
                kept.add(bucket.value)
            break
    return kept


def outbox_columns() -> set[str]:
    table = outbox_ddl().split("CREATE TABLE IF NOT EXISTS topology_outbox (", 1)[1].split(");", 1)[0]
    return set(re.findall(r"^    ([a-z_]+)\s+(?:bigint|uuid|text|bytea|jsonb|timestamptz)", table, re.MULTILINE))


def test_the_rails_example_writes_columns_and_fields_that_exist() -> None:
    doc = RAILS_DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```ruby\n(.*?)```", doc, re.DOTALL)
    example = next(block for block in blocks if "TopologyOutboxEvent.create!" in block)
    assert 'self.table_name = "topology_outbox"' in example

    call = example.index("TopologyOutboxEvent.create!(") + len("TopologyOutboxEvent.create!")
    arguments = example[call + 1 : _closing(example, call)]
    columns = _hash_keys(arguments)
    assert set(columns) <= outbox_columns(), set(columns) - outbox_columns()
    # What the writer must give (NOT NULL without a default), and never what belongs to others.
    assert {"event_id", "event_type", "partition_key", "payload_json"} <= set(columns)
    assert not {"id", "payload", "published_at", "failed_at", "error"} & set(columns)

    event_type = re.search(r'event_type: "(\w+)"', arguments)
    assert event_type is not None
    model = EVENT_MODELS[event_type.group(1)]
    payload = arguments.index("payload_json:")
    opening = arguments.index("{", payload)
    fields = set(_hash_keys(arguments[opening + 1 : _closing(arguments, opening)]))
    assert fields <= set(model.model_fields), fields - set(model.model_fields)
    required = {name for name, field in model.model_fields.items() if field.is_required()}
    assert required <= fields, required - fields

    # Its canonical spelling for the key: the buckets it keeps as given are the store's.
    sensitive = re.search(r"%w\[([A-Z_ ]+)\]", example)
    assert sensitive is not None
    assert set(sensitive.group(1).split()) == buckets_kept_as_given()
    bucket = re.search(r'bucket = "(\w+)"', example)
    assert bucket is not None and bucket.group(1) in {b.value for b in ClaimBucket}
    assert 'partition_key: "#{bucket}:#{value}"' in arguments
