"""The migrated database is exactly what ``projector/tables.py`` describes."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, pool

from topology_store.projector.migrate import SchemaNotMigrated, check_at_head, upgrade_to_head
from topology_store.projector.tables import metadata
from topology_store.runtime.settings import Settings

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
