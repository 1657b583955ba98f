"""Cells get GitLab's numeric cell id: ``cells.number`` (bigint, unique, positive; adr/0021),
and sequence ranges an index by cell (a cell's routing document lists its ranges).

The number comes from the cell events (``CellRegistered.number``, ``CellUpdated.number``).
Cells that exist already keep the number the doors gave them: nothing is written here, and
a cell whose column is null is numbered as before (``TOPOLOGY_GRPC_CELL_IDS``, else the digits
its name ends with; service/gitlab_cells.py). Filling the column here would put numbers in
the projection that are not in the log, which ``topology verify`` would report and a rebuild
drop; an operator who wants a cell's number recorded emits a ``CellUpdated`` with it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None



def upgrade() -> None:
    op.add_column("cells", sa.Column("number", sa.BigInteger(), nullable=True,
                                     comment="GitLab's cell id (CellInfo.id); null: none recorded"))
    op.create_unique_constraint("cells_number_key", "cells", ["number"])
    op.create_check_constraint("cells_number_positive", "cells", "number > 0")
    # A cell's routing document lists its sequence ranges (schemas/router_sync.py).
    op.create_index("sequence_ranges_cell_id_idx", "sequence_ranges", ["cell_id"])


def downgrade() -> None:
    op.drop_index("sequence_ranges_cell_id_idx", table_name="sequence_ranges")
    op.drop_column("cells", "number")
