"""GitLab's records (adr/0022): a claim keeps the Rails row behind it and its user data, a
lease the committed claims it destroys and when it was granted.

- ``claims.source_type`` / ``source_id`` / ``user_data``: what ``BeginUpdate``'s ``Source``
  and ``user_data`` said (NULL for claims made through our own contract), indexed per cell
  and source for ``ListRecords``' paging by primary key.
- ``leases.destroy_claims``: the ``[bucket, value]`` pairs a lease destroys on commit
  (``[]`` for every lease before this revision: they could only create).
- ``leases.granted_at``: the grant's log time, GitLab's ``LeaseRecord.created_at``, which
  ``ListLeases`` filters and pages by. Carried over for existing leases from their
  recorded ``LeaseGranted`` decision (``processed_events.detail``), the time the decider
  gave them; NULL only where no decision is recorded.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("claims", sa.Column("source_type", sa.Text(), comment="GitLab Source.Type of the Rails row"))
    op.add_column("claims", sa.Column("source_id", sa.LargeBinary(), comment="the Rails row's primary key, as sent"))
    op.add_column("claims", sa.Column("user_data", sa.LargeBinary(), comment="a serialized google.protobuf.Any"))
    op.create_index("claims_source_idx", "claims", ["cell_id", "source_type", "source_id"],
                    postgresql_where=sa.text("source_type IS NOT NULL"))
    op.add_column("leases", sa.Column("destroy_claims", JSONB(), nullable=False, server_default=sa.text("'[]'::jsonb")))
    op.add_column("leases", sa.Column("granted_at", sa.DateTime(timezone=True)))
    op.execute(
        "UPDATE leases l SET granted_at = g.at FROM ("
        "  SELECT p.event_id, min((d->>'occurred_at')::timestamptz) AS at"
        "  FROM processed_events p CROSS JOIN LATERAL jsonb_array_elements(p.detail) d"
        "  WHERE p.event_type = 'ClaimsRequested' AND jsonb_typeof(p.detail) = 'array'"
        "    AND d->>'type' = 'LeaseGranted' GROUP BY p.event_id) g "
        "WHERE g.event_id = l.request_id"
    )
    op.create_index("leases_open_by_cell_idx", "leases", ["cell_id", "granted_at", "lease_id"],
                    postgresql_where=sa.text("status = 'OPEN'"))


def downgrade() -> None:
    op.drop_index("leases_open_by_cell_idx", table_name="leases")
    op.drop_column("leases", "granted_at")
    op.drop_column("leases", "destroy_claims")
    op.drop_index("claims_source_idx", table_name="claims")
    for column in ("user_data", "source_id", "source_type"):
        op.drop_column("claims", column)
