"""Cells get GitLab's numeric cell id: ``cells.number`` (bigint, unique, positive; adr/0021),
and sequence ranges an index by cell (a cell's routing document lists its ranges).

The number comes from the cell events (``CellRegistered.number``, ``CellUpdated.number``).
Cells that exist already get the number the interim rule gave them (the digits their name
ends with, after a dash or the whole name: ``cell-7`` -> 7), where that is unambiguous:
when two cells' names end with the same number, both are left null, as the gRPC door
refused to pick one. ``TOPOLOGY_GRPC_CELL_IDS`` is not read here: it still numbers the cells
whose column is null (service/gitlab_cells.py).

A number filled here is not in the log: a replay leaves it null until a ``CellUpdated``
with that number records it (the cell rules accept it, and it changes nothing live).

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

# service/gitlab_cells.py's derived_number, in PostgreSQL: at most 19 digits, no leading
# zero, and no more than int64 holds.
BACKFILL = """
WITH derived AS (
    SELECT cell_id, substring(cell_id FROM '(?:^|-)([1-9][0-9]{0,18})$')::numeric AS n FROM cells
), fits AS (
    SELECT cell_id, n::bigint AS n FROM derived WHERE n IS NOT NULL AND n <= 9223372036854775807
), alone AS (
    SELECT n FROM fits GROUP BY n HAVING count(*) = 1
)
UPDATE cells SET number = fits.n FROM fits JOIN alone USING (n) WHERE cells.cell_id = fits.cell_id
"""


def upgrade() -> None:
    op.add_column("cells", sa.Column("number", sa.BigInteger(), nullable=True,
                                     comment="GitLab's cell id (CellInfo.id); null: none recorded"))
    op.create_unique_constraint("cells_number_key", "cells", ["number"])
    op.create_check_constraint("cells_number_positive", "cells", "number > 0")
    op.execute(BACKFILL)
    # A cell's routing document lists its sequence ranges (schemas/router_sync.py).
    op.create_index("sequence_ranges_cell_id_idx", "sequence_ranges", ["cell_id"])


def downgrade() -> None:
    op.drop_index("sequence_ranges_cell_id_idx", table_name="sequence_ranges")
    op.drop_column("cells", "number")
