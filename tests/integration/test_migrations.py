"""The migrated database is exactly what ``projector/tables.py`` describes."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, pool, text

from topology_store.projector.migrate import SchemaNotMigrated, alembic_config, check_at_head, upgrade_to_head
from topology_store.projector.tables import metadata
from topology_store.runtime.settings import Settings
from topology_store.service.gitlab_cells import number_cells

pytestmark = pytest.mark.integration


def test_migrations_match_table_definitions(settings: Settings) -> None:
    engine = create_engine(settings.sqlalchemy_url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, metadata)
    engine.dispose()
    assert differences == []


def test_upgrade_is_idempotent_and_check_passes(settings: Settings) -> None:
    upgrade_to_head(settings.sqlalchemy_url)
    check_at_head(settings.sqlalchemy_url)


def test_check_refuses_an_unmigrated_database(settings: Settings) -> None:
    engine = create_engine(settings.sqlalchemy_url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM alembic_version")
    engine.dispose()
    with pytest.raises(SchemaNotMigrated, match="topology migrate"):
        check_at_head(settings.sqlalchemy_url)


def test_0010_carries_a_lease_s_grant_time_over_from_its_recorded_decision(settings: Settings) -> None:
    # A lease granted before 0010: its grant time comes from its LeaseGranted decision, as
    # recorded with its request; it destroys nothing (leases could only create then).
    config = alembic_config(settings.sqlalchemy_url)
    command.downgrade(config, "0009")
    lease, request = uuid.uuid4(), uuid.uuid4()
    granted = "2026-11-30T10:00:00.123000+00:00"
    engine = create_engine(settings.sqlalchemy_url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO leases (lease_id, request_id, cell_id, owner_type, owner_id, claims, expires_at, status, "
            "version) VALUES (:lease, :request, 'cell-1', 'GROUP', 1, '[[\"NAMESPACE\", \"old\"]]', "
            "'2026-11-30T10:01:00Z', 'OPEN', 1)"), {"lease": lease, "request": request})
        conn.execute(text(
            "INSERT INTO processed_events (event_id, event_type, topic, partition, \"offset\", outcome, version, "
            "source, detail, occurred_at) VALUES (:request, 'ClaimsRequested', 't', 0, 0, 'applied', 1, 'cell-1', "
            "CAST(:detail AS jsonb), now())"),
            {"request": request, "detail": json.dumps([{"type": "LeaseGranted", "occurred_at": granted,
                                                        "lease_id": str(lease)}])})
    try:
        upgrade_to_head(settings.sqlalchemy_url)
        with engine.connect() as conn:
            row = conn.execute(text("SELECT granted_at, destroy_claims FROM leases WHERE lease_id = :lease"),
                               {"lease": lease}).one()
        assert row.granted_at == datetime.fromisoformat(granted)
        assert row.destroy_claims == []
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM leases WHERE lease_id = :lease"), {"lease": lease})
            conn.execute(text("DELETE FROM processed_events WHERE event_id = :request"), {"request": request})
        engine.dispose()
        upgrade_to_head(settings.sqlalchemy_url)


CELL_ROW = ("INSERT INTO cells (cell_id, address, session_prefix, region, weight, state, state_reason, version) "
            "VALUES (%s, 'https://x.example.com', %s, 'eu', 0, 'ACTIVE', '', 1)")


def test_0011_leaves_existing_cells_numbered_as_before(settings: Settings) -> None:
    """0011 writes no number (adr/0021): existing cells keep the number the doors derive (the
    digits a name ends with, or TOPOLOGY_GRPC_CELL_IDS), and the projection stays what a replay
    of the log gives; the column only takes unique positive numbers."""
    config = alembic_config(settings.sqlalchemy_url)
    command.downgrade(config, "0011-1")
    names = ["cell-1", "7", "us-3", "ap-3", "cell-x"]
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        for n, name in enumerate(names):
            conn.execute(CELL_ROW, (name, f"p{n}"))
    command.upgrade(config, "0011")
    with psycopg.connect(settings.libpq_url) as conn:
        assert dict(conn.execute("SELECT cell_id, number FROM cells").fetchall()) == dict.fromkeys(names)
        # The doors still number them as before: unambiguous digits only.
        numbers = number_cells(names, {})
        assert numbers.by_name == {"cell-1": 1, "7": 7}
        conn.execute("UPDATE cells SET number = 1 WHERE cell_id = 'cell-1'")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("UPDATE cells SET number = 1 WHERE cell_id = 'cell-x'")
    with psycopg.connect(settings.libpq_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE cells SET number = 0 WHERE cell_id = 'cell-x'")
    upgrade_to_head(settings.sqlalchemy_url)
