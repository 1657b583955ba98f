"""The projection tables. Alembic migrations create them; ``tests/integration/test_migrations.py``
checks that the migrated database matches this metadata, so this file and the
migrations cannot drift apart."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

cells = Table(
    "cells",
    metadata,
    Column("cell_id", Text, primary_key=True),
    Column("address", Text, nullable=False),
    Column("session_prefix", Text, nullable=False, unique=True),
    Column("region", Text, nullable=False),
    Column("weight", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("state_reason", Text, nullable=False),
    Column("version", BigInteger, nullable=False, comment="topology version of the last change"),
    # GitLab's numeric cell id (Rails' cell.id), from the cell events (adr/0021).
    Column("number", BigInteger, comment="GitLab's cell id (CellInfo.id); null: none recorded"),
    UniqueConstraint("number", name="cells_number_key"),
    CheckConstraint("number > 0", name="cells_number_positive"),
)

claims = Table(
    "claims",
    metadata,
    Column("bucket", Text, nullable=False),
    Column("value", Text, nullable=False),
    Column("cell_id", Text, nullable=False),
    Column("owner_type", Text, nullable=False),
    Column("owner_id", BigInteger, nullable=False),
    Column("claimed_at", DateTime(timezone=True), nullable=False),
    Column("version", BigInteger, nullable=False, comment="topology version of the last change"),
    Column("status", Text, nullable=False, server_default="COMMITTED"),  # LEASED claims do not route
    Column("lease_id", Uuid),  # LEASED: the creating lease; COMMITTED: the destroying one, if any
    # A GitLab record's Rails row and user data (adr/0022); NULL for our own claims.
    Column("source_type", Text, comment="GitLab Source.Type of the Rails row"),
    Column("source_id", LargeBinary, comment="the Rails row's primary key, as sent"),
    Column("user_data", LargeBinary, comment="a serialized google.protobuf.Any"),
    PrimaryKeyConstraint("bucket", "value"),
    Index("claims_cell_id_idx", "cell_id"),
    Index("claims_owner_idx", "cell_id", "owner_type", "owner_id"),
    Index("claims_source_idx", "cell_id", "source_type", "source_id", postgresql_where=text("source_type IS NOT NULL")),
)

leases = Table(
    "leases",
    metadata,
    Column("lease_id", Uuid, primary_key=True),
    Column("request_id", Uuid, nullable=False),
    Column("cell_id", Text, nullable=False),
    Column("owner_type", Text, nullable=False),
    Column("owner_id", BigInteger, nullable=False),
    Column("claims", JSONB, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("status", Text, nullable=False),
    Column("cause", Text),
    Column("version", BigInteger, nullable=False),
    Column("destroy_claims", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("granted_at", DateTime(timezone=True)),  # GitLab's LeaseRecord.created_at
    Index("leases_open_expiry_idx", "expires_at", postgresql_where=text("status = 'OPEN'")),
    Index("leases_open_by_cell_idx", "cell_id", "granted_at", "lease_id", postgresql_where=text("status = 'OPEN'")),
)

# When a lease counts as having ended, for retention (adr/0020): its expiry, or, for a
# lease without one (adr/0022: NO_EXPIRY, year 9999), its grant time. A lower bound of when it
# ended: such a lease can go as soon as it ended if it was granted before the period.
LEASE_ENDED_AT_SQL = "(CASE WHEN expires_at >= '9999-01-01' THEN coalesce(granted_at, expires_at) ELSE expires_at END)"

sequence_ranges = Table(
    "sequence_ranges",
    metadata,
    Column("sequence_name", Text, nullable=False),
    Column("start", BigInteger, nullable=False),
    Column("end", BigInteger, nullable=False),
    Column("cell_id", Text, nullable=False),
    Column("request_id", Uuid, nullable=False),
    Column("version", BigInteger, nullable=False),
    PrimaryKeyConstraint("sequence_name", "start"),
    CheckConstraint('"end" > start', name="sequence_ranges_not_empty"),
    Index("sequence_ranges_cell_id_idx", "cell_id"),  # a cell's document lists its ranges (adr/0021)
)

# The decisions outbox; its definition is the contract in producer/outbox.sql.
topology_outbox = Table(
    "topology_outbox",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", Uuid, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("partition_key", Text, nullable=False),
    Column("payload", LargeBinary),  # the decider always writes bytes; payload_json is for other writers
    Column("payload_json", JSONB),
    Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("published_at", DateTime(timezone=True)),
    Column("failed_at", DateTime(timezone=True)),
    Column("error", Text),
    Index("topology_outbox_unpublished_idx", "id", postgresql_where=text("published_at IS NULL")),
)

# Tracking: where each partition's next unread record is, committed in the same
# transaction as the rows it produced (adr/0002).
partition_offsets = Table(
    "partition_offsets",
    metadata,
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("topic", "partition"),
)

topology_version = Table(
    "topology_version",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),
    Column("committed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("id = 1", name="topology_version_singleton"),
)

# What each version changed in the routing data (cells, namespace -> cell),
# written in the same transaction as the rows, so routers can fetch deltas.
routing_changes = Table(
    "routing_changes",
    metadata,
    Column("version", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),  # "cell" or "namespace"
    Column("key", Text, nullable=False),
    Column("value", JSONB, comment="the row after the change; NULL: deleted"),
    PrimaryKeyConstraint("version", "kind", "key"),
)

# The versions whose changes routing_changes holds completely: one row per version
# bump, pruned together with the changes (projector/changelog.py). Deltas can start
# from min(version) - 1 (or from the current version when empty), never earlier.
routing_versions = Table(
    "routing_versions",
    metadata,
    Column("version", BigInteger, primary_key=True, autoincrement=False),
    Column("committed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("routing_versions_committed_at_idx", "committed_at"),
    comment="versions whose routing changes are all in routing_changes; deltas start at min(version) - 1",
)

# One row per event ever seen: the idempotency record (event_id) and the
# decision the projector took, which auditors read back.
processed_events = Table(
    "processed_events",
    metadata,
    Column("event_id", Uuid, primary_key=True),
    Column("event_type", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("reason", Text),
    Column("version", BigInteger, nullable=False),
    Column("source", Text, nullable=False),
    Column("detail", JSONB, comment="decision events of a claim request, for answers and audit"),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Tells a retry from another command under the same request id (adr/0017).
    Column("request_digest", LargeBinary, comment="keyed hash of a claim request's type and content"),
)

# Records the projector could not read as an event. Kept byte for byte so they
# can be inspected and re-driven; never dropped.
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("key", LargeBinary),
    Column("value", LargeBinary),
    Column("headers", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("error", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Life cycle (`topology dlq`): open until re-driven (resolved) or discarded with a
    # reason; an open or discarded row is never deleted, so no discard is silent; a resolved
    # one goes after TOPOLOGY_RETAIN_RESOLVED_DEAD_LETTERS_S (topology compact, adr/0020).
    Column("status", Text, nullable=False, server_default="open"),
    Column("resolved_at", DateTime(timezone=True)),
    Column("resolved_by", Text),
    Column("resolution", Text, comment="discard reason, or the decision a re-drive reached"),
    Column("event_id", Uuid, comment="the event a re-drive applied"),
    Column("replay_attempts", Integer, nullable=False, server_default="0"),
    Column("last_replay_error", Text),
    CheckConstraint("status IN ('open', 'resolved', 'discarded')", name="dead_letters_status"),
    UniqueConstraint("topic", "partition", "offset", name="dead_letters_position_key"),
    Index("dead_letters_open_idx", "id", postgresql_where=text("status = 'open'")),
)

# Every consumed record, byte for byte as received, in the batch's transaction:
# Kafka retention may end, the archive does not (replays can read either).
event_archive = Table(
    "event_archive",
    metadata,
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("key", LargeBinary),
    Column("value", LargeBinary),
    Column("headers", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("log_time", DateTime(timezone=True), nullable=False),
    Column("archived_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("topic", "partition", "offset"),
)

# The audit index: which keys (a cell, a stored claim key, a lease, an owner) each
# processed event touched, including keys its decisions touched (expiries, transfers).
event_keys = Table(
    "event_keys",
    metadata,
    Column("kind", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("event_id", Uuid, nullable=False),
    PrimaryKeyConstraint("kind", "key", "event_id"),
)

