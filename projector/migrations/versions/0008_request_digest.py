"""A claim request's digest beside its decision: a request id reused for another command is refused.

The doors answer a request id that is decided already with its recorded decision (a
client retrying). That answer is right only for the same request: the digest (a keyed
hash of the command's type and content, ``core.claims.request_digest``) lets a door
tell a retry from another command sent under the same id (adr/0017). Rows written
before this revision have none; the doors then compare the request type alone.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "processed_events",
        sa.Column("request_digest", sa.LargeBinary(), comment="keyed hash of a claim request's type and content"),
    )


def downgrade() -> None:
    op.drop_column("processed_events", "request_digest")
