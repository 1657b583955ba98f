"""Change-log coverage for snapshot deltas: one row per version the log holds completely.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "routing_versions",
        sa.Column("version", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("committed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        comment="versions whose routing changes are all in routing_changes; deltas start at min(version) - 1",
    )
    op.create_index("routing_versions_committed_at_idx", "routing_versions", ["committed_at"])


def downgrade() -> None:
    op.drop_table("routing_versions")
