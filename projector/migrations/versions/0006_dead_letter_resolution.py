"""Dead letters get a life cycle: open, resolved (re-driven) or discarded, never deleted.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dead_letters", sa.Column("status", sa.Text(), nullable=False, server_default="open"))
    op.add_column("dead_letters", sa.Column("resolved_at", sa.DateTime(timezone=True)))
    op.add_column("dead_letters", sa.Column("resolved_by", sa.Text()))
    op.add_column(
        "dead_letters",
        sa.Column("resolution", sa.Text(), comment="discard reason, or the decision a re-drive reached"),
    )
    op.add_column("dead_letters", sa.Column("event_id", sa.Uuid(), comment="the event a re-drive applied"))
    op.add_column("dead_letters", sa.Column("replay_attempts", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("dead_letters", sa.Column("last_replay_error", sa.Text()))
    op.create_check_constraint(
        "dead_letters_status", "dead_letters", "status IN ('open', 'resolved', 'discarded')"
    )
    # A record is committed once (offsets CAS, adr/0002), so it is dead-lettered at most once.
    op.create_unique_constraint("dead_letters_position_key", "dead_letters", ["topic", "partition", "offset"])
    op.create_index("dead_letters_open_idx", "dead_letters", ["id"], postgresql_where=sa.text("status = 'open'"))


def downgrade() -> None:
    op.drop_index("dead_letters_open_idx", "dead_letters")
    op.drop_constraint("dead_letters_position_key", "dead_letters")
    op.drop_constraint("dead_letters_status", "dead_letters")
    for column in ("last_replay_error", "replay_attempts", "event_id", "resolution", "resolved_by", "resolved_at",
                   "status"):
        op.drop_column("dead_letters", column)
