"""The PostgreSQL adapter of the projector: one transaction per batch.

Each commit, atomically (adr/0002):
1. advances the stored next offset of every partition in the batch by
   compare-and-set against the offset this member started the batch from; a
   member that lost a partition in a rebalance fails here and writes nothing
   (fencing);
2. loads the rows the batch touches (under the claim registry lock when it holds
   claim requests, adr/0010; the event ids already processed are read under that
   lock too, so two copies of one request on two partitions are decided once,
   adr/0017) and folds the events over them with the pure
   :func:`topology_store.core.fold.project_batch`;
3. when routing rows changed, bumps the topology version, writes the cells and the
   change log, and NOTIFYs the version (PostgreSQL delivers it only on commit);
4. writes the claim registry, the decision events into the outbox, one row per
   event into ``processed_events`` (idempotency and audit), and the dead letters,
   all set-based (``unnest``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from topology_store.core.audit import audit_rows
from topology_store.core.cells import Cell, Outcome
from topology_store.core.claims import CLAIM_COMMANDS, DOOR_REQUESTS, Registry, needs, request_digest
from topology_store.core.fold import BatchResult, PositionedEvent, project_batch
from topology_store.projector.archive import RawRecord, archive_columns, headers_json, write_archive, write_audit_keys
from topology_store.projector.bulk import copy_rows, execute_binary
from topology_store.projector.changelog import prune_routing_changes
from topology_store.projector.registry_store import load_registry, write_registry
from topology_store.projector.tables import partition_offsets, topology_version
from topology_store.runtime.database import DECISIONS_CHANNEL, VERSION_CHANNEL, DecisionRow, encode_decision_notices
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.models import (
    REQUEST_EVENT_TYPES,
    CellRegistered,
    CellState,
    CellStateChanged,
    CellUpdated,
    Event,
)
from topology_store.schemas.router_sync import CELL_DOCUMENTS_SQL

CLAIM_REGISTRY_LOCK = 0x746F706F636C6D  # pg advisory lock key held while deciding claims
# Taking the decider's lock also tells the outbox trigger that this transaction draws its
# outbox ids under it (producer/outbox.sql).
_LOCK_DECIDER = ("SELECT pg_advisory_xact_lock(:key), "
                 "set_config('topology.outbox_ids_drawn_under_lock', 'on', true)")

# A batch's round trips are most of its fixed cost (issue 13): up to this many rows a table,
# the archive and the decisions' records go as array parameters (binary) of statements the
# batch sends anyway; a larger batch (catching up) COPYs them, which is faster per row.
STATEMENT_ROWS = 500

TopicPartitionKey = tuple[str, int]


class FencedError(RuntimeError):
    """The stored offset of a partition is not where this member believed it was:
    another member committed it meanwhile. Nothing of the batch was written."""

    def __init__(self, partitions: Sequence[TopicPartitionKey]) -> None:
        super().__init__(f"fenced on {', '.join(f'{t}[{p}]' for t, p in partitions)}")
        self.partitions = list(partitions)


@dataclass(frozen=True, slots=True)
class DeadLetter(RawRecord):
    """A record that could not be read as a valid event, or applied: kept byte for byte, with why."""

    error: str


@dataclass(frozen=True, slots=True)
class PartitionAdvance:
    expected: int  # where this member's batch started (the stored next offset)
    next_offset: int  # one past the last record of the batch


@dataclass(frozen=True, slots=True)
class CommitResult:
    version: int
    changed: bool
    result: BatchResult
    dead_letters: int




class ProjectionStore:
    def __init__(self, engine: AsyncEngine, secret: bytes, codec: EventCodec | None = None) -> None:
        self._engine = engine
        self._secret = secret  # keys the hashes of sensitive claim values
        self._codec = codec or EventCodec()

    @property
    def engine(self) -> AsyncEngine:
        """The projection's engine: the consumer reads the archive on it outside a batch (adr/0019)."""
        return self._engine

    async def stored_offsets(self, partitions: Sequence[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        """The next offset to read for each partition, creating 0 for a new one."""
        if not partitions:
            return {}
        topics = [t for t, _ in partitions]
        numbers = [p for _, p in partitions]
        async with self._engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO partition_offsets (topic, partition, next_offset) "
                    "SELECT t, p, 0 FROM unnest(CAST(:topics AS text[]), CAST(:numbers AS int[])) AS u(t, p) "
                    "ON CONFLICT DO NOTHING"
                ),
                {"topics": topics, "numbers": numbers},
            )
            rows = await conn.execute(
                select(partition_offsets.c.topic, partition_offsets.c.partition, partition_offsets.c.next_offset)
            )
            stored = {(row.topic, row.partition): row.next_offset for row in rows}
        return {tp: stored[tp] for tp in partitions}

    async def current_version(self) -> int:
        async with self._engine.connect() as conn:
            return int((await conn.execute(select(topology_version.c.version))).scalar_one())

    async def commit_batch(
        self,
        events: Sequence[PositionedEvent],
        dead_letters: Sequence[DeadLetter],
        advances: Mapping[TopicPartitionKey, PartitionAdvance],
        archive: Sequence[RawRecord] = (),
        *,
        then: Callable[[AsyncConnection, BatchResult], Awaitable[None]] | None = None,
    ) -> CommitResult:
        """Commit one batch; ``archive`` holds the batch's records as received.
        ``then`` runs last inside the transaction (a dead letter's re-drive marks it
        resolved there, so the event and its resolution commit together)."""
        commands = [(p.event, p.at) for p in events if isinstance(p.event, CLAIM_COMMANDS)]
        # Computed before the lock: nothing under it that does not need it.
        digests = {p.event.event_id: request_digest(p.event, self._secret)
                   for p in events if isinstance(p.event, DOOR_REQUESTS)}
        async with self._engine.begin() as conn:
            # What needs no decision is written before the claim lock is taken, so the
            # lock is held for less (adr/0018): the records as received (in the statement
            # that advances the offsets), the dead letters.
            await _advance_offsets(conn, advances, archive)
            await _write_dead_letters(conn, dead_letters)
            cells = await _load_cells(conn) if any(_is_cell_event(p) for p in events) else {}
            decided_at = None
            if commands:
                # One decider at a time across all members: a multi-claim request
                # spans partitions, and uniqueness needs every decision to see the
                # one before it (adr/0010). Claims are rare next to reads. The same
                # statement tells the outbox trigger that this transaction draws its
                # outbox ids under that lock (producer/outbox.sql).
                await conn.execute(text(_LOCK_DECIDER), {"key": CLAIM_REGISTRY_LOCK})
                decided_at = datetime.now(UTC)  # a grant's end counts from here (adr/0017)
            # Under the lock, in a statement of its own (its snapshot is taken after the lock
            # is granted): a copy of a request on another partition decided by another member
            # a moment ago is a duplicate here, not a second decision (adr/0017).
            seen, version = await _seen_event_ids_and_version(conn, [p.event.event_id for p in events])
            registry = await load_registry(conn, needs(commands, self._secret)) if commands else Registry()
            result = project_batch(events, cells, registry, seen, self._secret, decided_at)
            # The version moves only when routers would see a difference, so an
            # unchanged ETag really means an unchanged routing table.
            if result.routing_changed:
                version = int(
                    (
                        await conn.execute(
                            text(
                                "UPDATE topology_version SET version = version + 1, committed_at = now() "
                                "WHERE id = 1 RETURNING version"
                            )
                        )
                    ).scalar_one()
                )
                await _write_cells(conn, result.cells, version)
            await write_registry(conn, result.registry, version)
            if result.routing_changed:
                # After the registry: a cell's document carries its sequence ranges (adr/0021).
                changed = set(result.cells) | {r.cell_id for r in result.registry.granted_ranges}
                await write_routing_changes(conn, version, cells=await cell_documents(conn, changed),
                                            namespaces=result.namespaces)
                await prune_routing_changes(conn, version)  # change-log coverage and retention (adr/0009)
                await conn.execute(
                    text("SELECT pg_notify(:channel, :payload)"), {"channel": VERSION_CHANNEL, "payload": str(version)}
                )
            if result.claim_decisions and not commands:
                # The outbox ids must be drawn under the decider's lock, taken only for commands.
                raise RuntimeError("claim decisions without a claim command in the batch")
            await _append_to_outbox(conn, self._codec, result.claim_decisions)
            await _record_decisions(conn, result, version, digests, audit_rows(result, self._secret),
                                    notify=bool(commands))
            if then is not None:
                await then(conn, result)
        return CommitResult(
            version=version, changed=result.routing_changed, result=result, dead_letters=len(dead_letters)
        )


def _is_cell_event(positioned: PositionedEvent) -> bool:
    return isinstance(positioned.event, CellRegistered | CellUpdated | CellStateChanged)


async def _advance_offsets(
    conn: AsyncConnection, advances: Mapping[TopicPartitionKey, PartitionAdvance], archive: Sequence[RawRecord] = ()
) -> None:
    """Advance the stored offsets by compare-and-set (a partition another member committed
    meanwhile raises :class:`FencedError`, and the transaction writes nothing) and archive
    the batch's records, in one statement up to :data:`STATEMENT_ROWS` records."""
    if not advances:
        await write_archive(conn, archive)
        return
    # Sorted, so two members touching overlapping partitions lock in the same order.
    items = sorted(advances.items())
    params: dict[str, object] = {
        "topics": [t for (t, _), _ in items],
        "numbers": [p for (_, p), _ in items],
        "expected": [a.expected for _, a in items],
        "next": [a.next_offset for _, a in items],
    }
    archived_here = 0 < len(archive) <= STATEMENT_ROWS
    archiving = ""
    if archived_here:
        # Only when every partition advanced: a fenced batch's records are archived already
        # (by the member that advanced them), and a unique violation here would read as a
        # poisonous record instead of fencing, raised below.
        archiving = (
            ', archived AS (INSERT INTO event_archive (topic, partition, "offset", key, value, headers, log_time) '
            "SELECT * FROM unnest(%(a_topics)b::text[], %(a_numbers)b::int[], %(a_offsets)b::bigint[], "
            "  %(a_keys)b::bytea[], %(a_values)b::bytea[], %(a_headers)b::text[]::jsonb[], "
            "  %(a_times)b::timestamptz[]) WHERE (SELECT count(*) FROM advanced) = %(partitions)b) "
        )
        params.update(archive_columns(archive), partitions=len(items))
    rows = await execute_binary(
        conn,
        "WITH advanced AS (UPDATE partition_offsets AS o SET next_offset = u.next_offset, updated_at = now() "
        "FROM unnest(%(topics)b::text[], %(numbers)b::int[], %(expected)b::bigint[], %(next)b::bigint[]) "
        "     AS u(topic, partition, expected, next_offset) "
        "WHERE o.topic = u.topic AND o.partition = u.partition AND o.next_offset = u.expected "
        "RETURNING o.topic, o.partition)" + archiving + "SELECT topic, partition FROM advanced",
        params,
    )
    advanced = {(topic, partition) for topic, partition in rows}
    lost = [tp for tp, _ in items if tp not in advanced]
    if lost:
        raise FencedError(lost)
    if not archived_here:
        await write_archive(conn, archive)


async def _seen_event_ids_and_version(conn: AsyncConnection, event_ids: list[UUID]) -> tuple[set[UUID], int]:
    """The event ids of ``event_ids`` processed already, and the routing version, in one round trip."""
    rows = await execute_binary(
        conn,
        "SELECT (SELECT version FROM topology_version), "
        "ARRAY(SELECT event_id FROM processed_events WHERE event_id = ANY(%(ids)b::uuid[]))",
        {"ids": event_ids},
    )
    version, seen = rows[0]
    return set(seen), int(version)


async def _load_cells(conn: AsyncConnection) -> dict[str, Cell]:
    # The cells table is small (one row per cell), and cell rules compare cells
    # with each other, so the whole table is the input.
    rows = await conn.execute(
        text("SELECT cell_id, address, session_prefix, region, weight, state, state_reason, number FROM cells")
    )
    return {
        row.cell_id: Cell(
            cell_id=row.cell_id,
            address=row.address,
            session_prefix=row.session_prefix,
            region=row.region,
            weight=row.weight,
            state=CellState(row.state),
            state_reason=row.state_reason,
            number=row.number,
        )
        for row in rows
    }


async def _write_cells(conn: AsyncConnection, cells: Mapping[str, Cell], version: int) -> None:
    if not cells:
        return
    rows = list(cells.values())
    await conn.execute(
        text(
            "INSERT INTO cells (cell_id, address, session_prefix, region, weight, state, state_reason, number, "
            "  version) "
            "SELECT u.*, CAST(:version AS bigint) FROM unnest(CAST(:ids AS text[]), CAST(:addresses AS text[]), "
            "  CAST(:prefixes AS text[]), CAST(:regions AS text[]), CAST(:weights AS int[]), "
            "  CAST(:states AS text[]), CAST(:reasons AS text[]), CAST(:numbers AS bigint[])) AS u "
            "ON CONFLICT (cell_id) DO UPDATE SET address = excluded.address, "
            "  session_prefix = excluded.session_prefix, region = excluded.region, weight = excluded.weight, "
            "  state = excluded.state, state_reason = excluded.state_reason, number = excluded.number, "
            "  version = excluded.version"
        ),
        {
            "version": version,
            "ids": [c.cell_id for c in rows],
            "addresses": [c.address for c in rows],
            "prefixes": [c.session_prefix for c in rows],
            "regions": [c.region for c in rows],
            "weights": [c.weight for c in rows],
            "states": [c.state.value for c in rows],
            "reasons": [c.state_reason for c in rows],
            "numbers": [c.number for c in rows],
        },
    )


_CELL_DOCUMENTS = text(CELL_DOCUMENTS_SQL.format(cells="cells", ranges="sequence_ranges",
                                                 where="WHERE c.cell_id = ANY(CAST(:ids AS text[]))"))


async def cell_documents(conn: AsyncConnection, cell_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The documents of these cells as routers see them, in snapshots and in the change
    log (``schemas.router_sync.CELL_DOCUMENTS_SQL``), from the tables as this transaction
    sees them: write the cells and their sequence ranges first."""
    ids = sorted(cell_ids)
    if not ids:
        return {}
    return {row.cell_id: dict(row._mapping) for row in await conn.execute(_CELL_DOCUMENTS, {"ids": ids})}


async def write_routing_changes(
    conn: AsyncConnection, version: int, cells: Mapping[str, Mapping[str, Any]], namespaces: Mapping[str, str | None]
) -> None:
    """Record what ``version`` changed for routers: each cell's new document
    (:func:`cell_documents`), and each namespace's new owning cell (``None``: no longer
    claimed)."""
    kinds = ["cell"] * len(cells) + ["namespace"] * len(namespaces)
    keys = [*cells, *namespaces]
    # A namespace's value names one of a few cells: serialize each once per batch.
    routes = {cell_id: json.dumps({"cell_id": cell_id}) for cell_id in set(namespaces.values()) if cell_id is not None}
    values = [json.dumps(c) for c in cells.values()] + [
        routes[cell_id] if cell_id is not None else None for cell_id in namespaces.values()
    ]
    if not keys:
        return
    await execute_binary(
        conn,
        "INSERT INTO routing_changes (version, kind, key, value) "
        "SELECT %(version)b::bigint, k, key, v FROM unnest(%(kinds)b::text[], %(keys)b::text[], "
        "  %(values)b::text[]::jsonb[]) AS u(k, key, v)",
        {"version": version, "kinds": kinds, "keys": keys, "values": values},
    )


async def _record_decisions(
    conn: AsyncConnection, result: BatchResult, version: int, digests: Mapping[UUID, bytes],
    audit_keys: Sequence[tuple[str, str, UUID]], notify: bool,
) -> None:
    """Write one ``processed_events`` row per fresh event and the audit index
    (``event_keys``), and, with ``notify``, wake the claims doors with the requests'
    decisions (delivered on commit; their decision JSON built once, for both). Up to
    :data:`STATEMENT_ROWS` rows a table, one statement for all of it."""
    # Duplicates are not recorded again: the first decision for an event_id stands.
    fresh = [(p, d, _detail(d.events)) for p, d in result.decisions if d.outcome is not Outcome.DUPLICATE]
    answered: list[DecisionRow] = [
        (p.event.event_id, p.event.EVENT_TYPE, d.outcome.value, d.reason, detail, digests.get(p.event.event_id))
        for p, d, detail in fresh if p.event.EVENT_TYPE in _ANSWERED]
    # The decisions themselves travel in the notification, so a waiting request is answered
    # without a lookup; what does not fit in a payload is announced by an empty one, which
    # makes the doors look it up (adr/0018).
    payloads = encode_decision_notices(answered) if notify else []
    processed = [
        (p.event.event_id, p.event.EVENT_TYPE, p.topic, p.partition, p.offset, d.outcome.value, d.reason,
         p.event.source, p.event.occurred_at, detail, version, digests.get(p.event.event_id))
        for p, d, detail in fresh
    ]
    parts: list[str] = []
    params: dict[str, object] = {}
    if processed and len(processed) <= STATEMENT_ROWS:
        parts.append(
            "INSERT INTO processed_events (event_id, event_type, topic, partition, \"offset\", outcome, reason, "
            "  source, occurred_at, detail, version, request_digest) "
            "SELECT * FROM unnest(%(p_ids)b::uuid[], %(p_types)b::text[], %(p_topics)b::text[], "
            "  %(p_numbers)b::int[], %(p_offsets)b::bigint[], %(p_outcomes)b::text[], %(p_reasons)b::text[], "
            "  %(p_sources)b::text[], %(p_occurred)b::timestamptz[], %(p_details)b::text[]::jsonb[], "
            "  %(p_versions)b::bigint[], %(p_digests)b::bytea[])"
        )
        columns = list(zip(*processed, strict=True))
        params.update({name: list(column) for name, column in zip(
            ("p_ids", "p_types", "p_topics", "p_numbers", "p_offsets", "p_outcomes", "p_reasons", "p_sources",
             "p_occurred", "p_details", "p_versions", "p_digests"), columns, strict=True)})
    elif processed:
        await copy_rows(
            conn, "processed_events",
            ("event_id", "event_type", "topic", "partition", "offset", "outcome", "reason", "source", "occurred_at",
             "detail", "version", "request_digest"),
            processed,
        )
    if audit_keys and len(audit_keys) <= STATEMENT_ROWS:
        parts.append("INSERT INTO event_keys (kind, key, event_id) "
                     "SELECT * FROM unnest(%(k_kinds)b::text[], %(k_keys)b::text[], %(k_ids)b::uuid[])")
        params.update({"k_kinds": [k for k, _, _ in audit_keys], "k_keys": [k for _, k, _ in audit_keys],
                       "k_ids": [i for _, _, i in audit_keys]})
    elif audit_keys:
        await write_audit_keys(conn, audit_keys)
    if payloads:
        parts.append(f"SELECT pg_notify('{DECISIONS_CHANNEL}', payload) FROM unnest(%(payloads)b::text[]) AS payload")
        params["payloads"] = payloads
    if not parts:
        return
    # Data-modifying CTEs run to completion whether or not the last statement reads them.
    *writes, last = parts
    statement = ("WITH " + ", ".join(f"w{n} AS ({w})" for n, w in enumerate(writes)) + " " if writes else "") + last
    await execute_binary(conn, statement, params)


def _detail(decisions: tuple[Event, ...]) -> str | None:
    """The decision events of a claim request, as JSON, for the synchronous answer."""
    if not decisions:
        return None
    # pydantic's own JSON writer, with the type spliced in front: this runs for every
    # claim event, and the dict-then-json.dumps route cost three times as much.
    return "[" + ",".join(f'{{"type":"{d.EVENT_TYPE}",' + d.model_dump_json()[1:] for d in decisions) + "]"


async def _append_to_outbox(conn: AsyncConnection, codec: EventCodec, decisions: Sequence[Event]) -> None:
    """Record the decisions in the log: the relay publishes the outbox to the
    claim-decisions topic, in id order. The ids are drawn here, in decision order,
    while the registry lock is held, so id order is decision order and commit order
    (producer/outbox.sql: the statement that took the lock said so, and such rows skip
    the per-row trigger and its per-key locks)."""
    if not decisions:
        return
    # ORDER BY the position: PostgreSQL evaluates a volatile target (nextval) after the
    # sort, so the ids follow the decisions' order.
    await execute_binary(
        conn,
        "INSERT INTO topology_outbox (id, event_id, event_type, partition_key, payload) "
        "SELECT nextval('topology_outbox_id_seq'), e, t, k, p FROM unnest(%(ids)b::uuid[], %(types)b::text[], "
        "  %(keys)b::text[], %(payloads)b::bytea[]) WITH ORDINALITY AS u(e, t, k, p, n) ORDER BY n",
        {"ids": [d.event_id for d in decisions], "types": [d.EVENT_TYPE for d in decisions],
         "keys": [d.partition_key for d in decisions],
         "payloads": [codec.encode(d.EVENT_TYPE, d.to_avro()) for d in decisions]},
    )


async def _write_dead_letters(conn: AsyncConnection, dead_letters: Sequence[DeadLetter]) -> None:
    if not dead_letters:
        return
    await conn.execute(
        text(
            'INSERT INTO dead_letters (topic, partition, "offset", key, value, headers, error) '
            "SELECT * FROM unnest(CAST(:topics AS text[]), CAST(:numbers AS int[]), CAST(:offsets AS bigint[]), "
            "  CAST(:keys AS bytea[]), CAST(:values AS bytea[]), CAST(:headers AS jsonb[]), CAST(:errors AS text[]))"
        ),
        {
            "topics": [d.topic for d in dead_letters],
            "numbers": [d.partition for d in dead_letters],
            "offsets": [d.offset for d in dead_letters],
            "keys": [d.key for d in dead_letters],
            "values": [d.value for d in dead_letters],
            "headers": [headers_json(d.headers) for d in dead_letters],
            # ASCII with escapes: the error quotes what could not be read, and a
            # database whose encoding cannot hold it must still take the dead letter.
            "errors": [d.error.encode("ascii", "backslashreplace").decode("ascii") for d in dead_letters],
        },
    )


# The requests a door waits on (a tick is the projector's own and answered to no one).
_ANSWERED = REQUEST_EVENT_TYPES - {"LeaseExpiryTick"}
