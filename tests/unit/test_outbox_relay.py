"""The outbox contract as shipped, and the relay's mapping of a row to a Kafka record
(no servers: what needs PostgreSQL or Kafka is in tests/integration/test_relay.py)."""

from __future__ import annotations

import re

import pytest

from topology_store.cli.main import build_parser
from topology_store.producer.outbox import OUTBOX_CHANNEL, outbox_ddl
from topology_store.producer.relay import OutboxRelay, OutboxRow, libpq_url
from topology_store.producer.relay_metrics import RelayMetrics
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EVENT_TYPE_HEADER, EventCodec
from topology_store.schemas.models import CellRegistered, ClaimBucket, ClaimCreated, OwnerType


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
