"""The reference outbox writer: events go into the caller's PostgreSQL transaction.

The owning application calls ``write_event(conn, event)`` (or ``write_events``)
inside the transaction that makes its own change; the row commits or rolls back
with that change, and ``topology relay`` publishes it later (adr/0008).

The event is validated by the pydantic models and encoded to Avro single-object
bytes here, so an event the contract refuses fails inside the writer's
transaction, where the application can still react, instead of in the relay
hours later. Any language can write the table (``outbox.sql`` is the contract);
this module is the Python rendering of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from topology_store.schemas.codec import EventCodec
from topology_store.schemas.models import Event, parse_event

__all__ = ["OUTBOX_CHANNEL", "OUTBOX_TABLE", "OutboxUsageError", "create_outbox", "outbox_ddl", "write_event",
           "write_events"]

OUTBOX_TABLE = "topology_outbox"
OUTBOX_CHANNEL = "topology_outbox"

# One migration at a time: CREATE ... IF NOT EXISTS is not safe against itself.
_DDL_LOCK = (1953460336, 1)

_INSERT = (
    "INSERT INTO topology_outbox (event_id, event_type, partition_key, payload, headers) "
    "VALUES (%s, %s, %s, %s, %s) RETURNING id"
)


class OutboxUsageError(RuntimeError):
    """The writer was called where its row could not share the caller's transaction."""


def outbox_ddl() -> str:
    """The contract as SQL (``producer/outbox.sql``), shipped inside the package."""
    return resources.files("topology_store.producer").joinpath("outbox.sql").read_text(encoding="utf-8")


def create_outbox(conn: psycopg.Connection[Any]) -> None:
    """Create or update the outbox table, its index and triggers; idempotent."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _DDL_LOCK)
        conn.execute(outbox_ddl().encode("utf-8"))


@cache
def _codec() -> EventCodec:
    return EventCodec()


def _require_transaction(conn: psycopg.Connection[Any]) -> None:
    # In autocommit mode outside conn.transaction() the INSERT would commit on its
    # own: exactly the dual write the outbox exists to prevent.
    if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        raise OutboxUsageError(
            "write_event needs the caller's transaction: use a non-autocommit connection "
            "or call it inside `with conn.transaction():`"
        )


def _as_event(event: Event | Mapping[str, Any]) -> Event:
    if isinstance(event, Event):
        # Re-validate: model_construct() and model_copy(update=...) skip validation.
        return type(event).model_validate(event.model_dump())
    return parse_event(dict(event))


def write_event(
    conn: psycopg.Connection[Any],
    event: Event | Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    codec: EventCodec | None = None,
) -> int:
    """Insert one event into the outbox in the caller's open transaction; return its outbox id.

    ``event`` is a model or a mapping with a ``type`` field (raises
    ``schemas.models.EventInputError`` when invalid). ``headers`` become extra
    Kafka headers. Holds a transaction-level lock on the event's partition key
    until the caller commits or rolls back (that is what keeps per-key order).
    """
    return write_events(conn, [event], headers, codec)[0]


def write_events(
    conn: psycopg.Connection[Any],
    events: Iterable[Event | Mapping[str, Any]],
    headers: Mapping[str, str] | None = None,
    codec: EventCodec | None = None,
) -> list[int]:
    """Insert events in the given order (their per-key order) in the caller's transaction."""
    _require_transaction(conn)
    validated = [_as_event(event) for event in events]  # everything valid before anything is written
    codec = codec or _codec()
    extra = {str(name): str(value) for name, value in (headers or {}).items()}
    rows = [
        (event.event_id, event.EVENT_TYPE, event.partition_key, codec.encode(event.EVENT_TYPE, event.to_avro()),
         Jsonb(extra))
        for event in validated
    ]
    with conn.cursor() as cursor:
        # Take every key's lock in one global order before inserting: two
        # transactions writing the same keys in different orders would otherwise
        # deadlock on the locks the insert trigger takes. (One key: the trigger's
        # own lock is all there is; skip the round trip.)
        keys = sorted({row[2] for row in rows})
        if len(keys) > 1:
            for key in keys:
                cursor.execute("SELECT topology_outbox_lock_key(%s)", (key,))
        ids: list[int] = []
        for row in rows:
            cursor.execute(_INSERT, row)
            inserted = cursor.fetchone()
            assert inserted is not None
            ids.append(int(inserted[0]))
    return ids
