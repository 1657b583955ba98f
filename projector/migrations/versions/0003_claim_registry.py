"""Claim registry: claim status and leases, sequence ranges, decision detail, decision outbox.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from importlib.resources import files

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The outbox contract ships as plain SQL so any language's migrations can apply
# it; the topology store's own decisions go through the same outbox.
OUTBOX_SQL = files("topology_store.producer").joinpath("outbox.sql")


def upgrade() -> None:
    op.add_column("claims", sa.Column("status", sa.Text(), nullable=False, server_default="COMMITTED"))
    op.add_column("claims", sa.Column("lease_id", sa.Uuid()))
    op.create_index("claims_owner_idx", "claims", ["cell_id", "owner_type", "owner_id"])
    op.create_table(
        "leases",
        sa.Column("lease_id", sa.Uuid(), primary_key=True),
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("cell_id", sa.Text(), nullable=False),
        sa.Column("owner_type", sa.Text(), nullable=False),
        sa.Column("owner_id", sa.BigInteger(), nullable=False),
        sa.Column("claims", postgresql.JSONB(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("cause", sa.Text()),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )
    op.create_index("leases_open_expiry_idx", "leases", ["expires_at"], postgresql_where=sa.text("status = 'OPEN'"))
    op.create_table(
        "sequence_ranges",
        sa.Column("sequence_name", sa.Text(), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("end", sa.BigInteger(), nullable=False),
        sa.Column("cell_id", sa.Text(), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("sequence_name", "start"),
        sa.CheckConstraint('"end" > start', name="sequence_ranges_not_empty"),
    )
    op.add_column(
        "processed_events",
        sa.Column("detail", postgresql.JSONB(), comment="decision events of a claim request, for answers and audit"),
    )
    op.execute(OUTBOX_SQL.read_text(encoding="utf-8"))


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS topology_outbox CASCADE")
    op.execute("DROP FUNCTION IF EXISTS topology_outbox_notify, topology_outbox_before_insert, topology_outbox_lock_key")
    op.drop_column("processed_events", "detail")
    op.drop_table("sequence_ranges")
    op.drop_table("leases")
    op.drop_index("claims_owner_idx", "claims")
    op.drop_column("claims", "lease_id")
    op.drop_column("claims", "status")
