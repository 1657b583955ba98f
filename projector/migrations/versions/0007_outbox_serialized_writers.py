"""The outbox trigger leaves rows alone whose writer drew the id under its own lock.

The projector decides claims under one registry lock and writes thousands of
decisions per batch; a per-row trigger taking a per-key advisory lock each
exhausted PostgreSQL's lock table at large batches ("out of shared memory") and
cost a plpgsql call per row. producer/outbox.sql explains the contract; applying
it again is idempotent by design.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

from importlib.resources import files

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

OUTBOX_SQL = files("topology_store.producer").joinpath("outbox.sql")


def upgrade() -> None:
    op.execute(OUTBOX_SQL.read_text(encoding="utf-8"))


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS topology_outbox_before_insert ON topology_outbox")
    op.execute(
        "CREATE TRIGGER topology_outbox_before_insert BEFORE INSERT ON topology_outbox "
        "FOR EACH ROW EXECUTE FUNCTION topology_outbox_before_insert()"
    )
