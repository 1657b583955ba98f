"""The outbox accepts a JSON payload in place of the encoded bytes (payload_json), and keeps
a row the relay could not validate with its error (failed_at, error).

The projection database's outbox holds the decider's decisions, always encoded;
the columns come with the shared contract (producer/outbox.sql, adr/0008), which
upgrades an older table in place when applied again.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from importlib.resources import files

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

OUTBOX_SQL = files("topology_store.producer").joinpath("outbox.sql")


def upgrade() -> None:
    op.execute(OUTBOX_SQL.read_text(encoding="utf-8"))


def downgrade() -> None:
    # Only the decider writes here, always bytes: no row has payload_json to lose.
    for name in ("topology_outbox_one_payload", "topology_outbox_payload_json_is_object",
                 "topology_outbox_failure_has_error"):
        op.execute(f"ALTER TABLE topology_outbox DROP CONSTRAINT IF EXISTS {name}")
    op.execute("ALTER TABLE topology_outbox DROP COLUMN IF EXISTS payload_json, DROP COLUMN IF EXISTS failed_at, "
               "DROP COLUMN IF EXISTS error, ALTER COLUMN payload SET NOT NULL")
    # The insert trigger's function as it was: the current one clears the dropped columns.
    op.execute(
        "CREATE OR REPLACE FUNCTION topology_outbox_before_insert() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN PERFORM topology_outbox_lock_key(NEW.partition_key); "
        "NEW.id := nextval(format('%I.topology_outbox_id_seq', TG_TABLE_SCHEMA)); "
        "NEW.published_at := NULL; RETURN NEW; END $$"
    )
