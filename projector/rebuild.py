"""Zero-downtime rebuild: replay the log into a shadow schema while the live projector
keeps serving, catch up with it, and switch the read path over in one transaction
(adr/0013).

1. **Build.** The shadow schema is created at the head migrations (under a temporary
   name, renamed once complete, so a crash never leaves half a schema behind). The
   log is applied in chunks with the same pure functions a replay uses
   (:func:`topology_store.core.cells.apply_cell_event` for cells, :func:`topology_store.core.claims.evolve`
   for the recorded claim decisions, adr/0010). Each chunk's rows and the rebuild's
   own position (``rebuild_checkpoint``, in the shadow schema) commit in one
   transaction, so a crash at any instant resumes from the last committed chunk,
   applying no event twice and skipping none.
2. **Catch up.** Chunks continue until what is left is at most ``max_tail`` events.
3. **Switch**, in one transaction: lock ``partition_offsets`` (the first row every
   projector commit writes, so the live projector's next commit waits: it does not
   fail) and then the projection tables (``lock_timeout`` bounds the wait; a timeout
   rolls back, catches up again and retries); apply the final tail; check that the
   shadow covers exactly what the live tables cover (abort otherwise); bump the live
   topology version and write the exact routing difference into the live change log,
   so deltas and the read API's incremental snapshot see one ordinary newer version;
   move the live ``cells``, ``claims``, ``leases``, ``sequence_ranges`` into the
   retired schema and the shadow's into ``public`` (``ALTER TABLE ... SET SCHEMA``:
   transactional; plans cached on the old tables are invalidated and re-planned by
   name); NOTIFY the new version.

The version (``topology_version``) and the change log (``routing_changes``,
``routing_versions``) stay where they are: they are the history of what routers
were told, not something derived from the log, so the switch appends to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol, TextIO, cast
from uuid import UUID

import psycopg
from psycopg import sql
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

from topology_store.core.cells import Cell, Outcome, apply_cell_event
from topology_store.core.claims import ClaimKey, ClaimStatus, HeldClaim, Lease, LeaseStatus, Registry, evolve
from topology_store.projector.changelog import prune_routing_changes
from topology_store.projector.migrate import alembic_config, upgrade_to_head
from topology_store.projector.replay import (
    CELL_COLUMNS,
    CLAIM_COLUMNS,
    LEASE_COLUMNS,
    LIVE_SCHEMA,
    RANGE_COLUMNS,
    SCHEMA_NAME,
    DecisionDecoder,
    cell_row,
    claim_row,
    decode_event,
    lease_row,
    range_row,
    schema_url,
)
from topology_store.projector.store import write_routing_changes
from topology_store.runtime.database import VERSION_CHANNEL
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.models import (
    CellRegistered,
    CellState,
    CellStateChanged,
    CellUpdated,
    ClaimsCommitted,
    ClaimsDestroyed,
    Event,
    LeaseCommitted,
    LeaseGranted,
    LeaseReleased,
    OwnerTransferred,
    OwnerType,
    ReleaseCause,
)

DEFAULT_SCHEMA = "topology_shadow"
RETIRED_SCHEMA = "topology_retired"
# The tables a rebuild derives from the log and the switch exchanges. Everything
# else in public is the log or its bookkeeping (archive, outbox, offsets, decisions
# taken, dead letters, audit index) or the served history (version, change log).
SWITCHED_TABLES = ("cells", "claims", "leases", "sequence_ranges")
CHECKPOINT_TABLE = "rebuild_checkpoint"
SEEN_TABLE = "rebuild_seen"  # event ids applied whose duplicates later in the log must be skipped
REBUILD_LOCK = 0x746F706F726562  # pg advisory lock key: one rebuild per database at a time
BUILDING_SUFFIX = "_building"
# The decisions that touch claims (all name them in ``claims``) and those that touch a lease.
_CLAIMS_DECISIONS = (LeaseGranted, LeaseCommitted, LeaseReleased, ClaimsCommitted, ClaimsDestroyed, OwnerTransferred)
_LEASE_DECISIONS = (LeaseGranted, LeaseCommitted, LeaseReleased)


class RebuildError(RuntimeError):
    """The rebuild cannot go on; the message says why and what to do."""


class _NotYet(Exception):
    """The switch could not take its locks in time, or too much is left to apply
    under them: roll back, catch up, try again."""


@dataclass
class Checkpoint:
    """The rebuild's own tracking position, committed with each chunk's rows."""

    source: str
    cells_topic: str
    decisions_topic: str
    revision: str  # the Alembic head the shadow schema was created at
    cells_next_offset: int = 0  # next offset of the cells topic (partition 0) to apply
    # archive: the last topology_outbox id applied; kafka: the next offset of the decision topic
    decisions_position: int = 0
    decisions_read: int = 0  # decision records read (outbox rows, or decision-topic records)
    events_read: int = 0  # every record read, cells and decisions, skipped ones included
    chunks: int = 0
    # Cells-topic offsets skipped as open dead letters: a re-drive after the rebuild
    # passed them would change the live cells behind the rebuild's back.
    skipped_dead_letters: list[int] = field(default_factory=list)
    outbox_covered_id: int = 0  # kafka: every outbox row up to this id is applied
    switched_version: int | None = None


_CHECKPOINT_FIELDS = [
    "source", "cells_topic", "decisions_topic", "revision", "cells_next_offset", "decisions_position",
    "decisions_read", "events_read", "chunks", "skipped_dead_letters", "outbox_covered_id", "switched_version",
]


@dataclass
class State:
    """What a run holds in memory: the shadow's content (equal to its tables at the
    checkpoint) and the event ids applied, for the log's redeliveries."""

    checkpoint: Checkpoint
    cells: dict[str, Cell] = field(default_factory=dict)
    registry: Registry = field(default_factory=Registry)
    seen: set[UUID] = field(default_factory=set)
    # NAMESPACE keys the shadow changed since the switch's pre-diff (None: no pre-diff)
    namespaces_touched: set[str] | None = None


@dataclass
class Chunk:
    """Records read from the log, in order per stream, with the position after each."""

    cells: list[tuple[int, Event | None]] = field(default_factory=list)  # (next offset, event; None: skipped)
    open_dead_letters: list[int] = field(default_factory=list)  # offsets among cells skipped as open dead letters
    decisions: list[tuple[int, Event | None]] = field(default_factory=list)  # (position after, decision)

    @property
    def size(self) -> int:
        return len(self.cells) + len(self.decisions)


@dataclass
class _Changes:
    """What one chunk changed, for writing: presence of each touched key at the chunk's start."""

    cells: bool = False
    claims_before: dict[ClaimKey, bool] = field(default_factory=dict)
    leases_before: dict[UUID, bool] = field(default_factory=dict)
    seen: list[UUID] = field(default_factory=list)  # ids to persist in rebuild_seen


@dataclass
class RebuildResult:
    schema: str
    source: str
    resumed: bool
    events_at_start: int  # already in the shadow when this run started (0: a new rebuild)
    events_this_run: int
    events_total: int
    chunks: int
    seconds: float
    switched_version: int | None = None
    retired_schema: str | None = None
    routing_changes: dict[str, int] | None = None  # what the switch changed for routers
    switch_locked_seconds: float | None = None  # from holding the projector's lock to the commit


Conn = psycopg.AsyncConnection[Any]


class Source(Protocol):
    """Where the log is read from."""

    name: str
    waits: bool  # under the switch's locks, can more of the log still arrive (Kafka: the relay)?
    persists_decision_ids: bool  # must rebuild_seen keep decision ids (the log repeats decisions)?

    async def read(self, conn: Conn, state: State, limit: int) -> Chunk: ...

    async def remaining(self, conn: Conn, state: State) -> int: ...

    async def seen_decisions(self, conn: Conn, state: State) -> list[UUID]: ...

    async def prepare_switch(self, conn: Conn, state: State) -> None: ...

    async def uncovered(self, conn: Conn, state: State) -> list[str]: ...

    async def close(self) -> None: ...


def _ident(*names: str) -> sql.Composable:
    return sql.SQL(".").join(sql.Identifier(n) for n in names)


async def _all(conn: Conn, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    cursor = await conn.execute(query, params)
    return await cursor.fetchall()


async def _one(conn: Conn, query: Any, params: Any = None) -> tuple[Any, ...] | None:
    cursor = await conn.execute(query, params)
    return await cursor.fetchone()


async def _live_cells_offset(conn: Conn, topic: str) -> int:
    row = await _one(conn, "SELECT next_offset FROM public.partition_offsets WHERE topic = %s AND partition = 0",
                     (topic,))
    return int(row[0]) if row else 0


async def _cells_uncovered(conn: Conn, state: State) -> list[str]:
    checkpoint = state.checkpoint
    live = await _live_cells_offset(conn, checkpoint.cells_topic)
    if live != checkpoint.cells_next_offset:
        return [f"the live projection consumed {checkpoint.cells_topic}[0] up to offset {live}, the shadow up to "
                f"{checkpoint.cells_next_offset}"]
    return []


@dataclass(frozen=True)
class _Raw:
    """Archive rows of one chunk, not decoded yet, and where they were read from."""

    start: tuple[int, int]  # (cells next offset, decisions position)
    limit: int
    cells: list[tuple[int, bytes | None, str | None]]  # (offset, value, dead letter status)
    decisions: list[tuple[int, bytes]]  # (outbox id, payload)

    @property
    def size(self) -> int:
        return len(self.cells) + len(self.decisions)

    @property
    def end(self) -> tuple[int, int]:
        return (self.cells[-1][0] + 1 if self.cells else self.start[0],
                self.decisions[-1][0] if self.decisions else self.start[1])


class ArchiveSource:
    """``event_archive`` (cells records as consumed) and ``topology_outbox`` (decisions in
    decision order). Outbox ids are drawn under the claim registry lock (adr/0010), so
    the committed ids are always a prefix of the final order: reading ``id > position``
    never skips a row that commits later (and the switch counts them to be sure).

    While a chunk is applied and written, the next one is fetched on a second connection
    and decoded in a thread: the waits for PostgreSQL (the shadow's COPYs, the fetch)
    then overlap with decoding (a run took a fifth less time with it, measured)."""

    name = "archive"
    waits = False  # under the switch's locks nothing is archived or decided
    persists_decision_ids = False  # the outbox keeps each decision's id in a column

    def __init__(self, settings: Settings, codec: EventCodec) -> None:
        self._settings = settings
        self._codec = codec
        self._decisions = DecisionDecoder(codec)
        self._ahead_decisions = DecisionDecoder(codec)  # the prefetch thread's own
        self._ahead: asyncio.Task[tuple[_Raw, Chunk]] | None = None
        self._ahead_conn: Conn | None = None
        self._counted = (0, 0)  # (outbox id, rows up to it) counted before the switch's locks

    async def _fetch(self, conn: Conn, start: tuple[int, int], limit: int) -> _Raw:
        # Dead letters not resolved never changed the projection, even when their bytes
        # decode (a wrong key); a re-driven one did (as projector.replay.read_archive).
        cells = await _all(
            conn,
            'SELECT a."offset", a.value, d.status FROM public.event_archive a '
            "LEFT JOIN public.dead_letters d ON d.topic = a.topic AND d.partition = a.partition "
            'AND d."offset" = a."offset" '
            'WHERE a.topic = %s AND a.partition = 0 AND a."offset" >= %s ORDER BY a."offset" LIMIT %s',
            (self._settings.cells_topic, start[0], limit),
        )
        decisions: list[tuple[Any, ...]] = []
        if len(cells) < limit:
            decisions = await _all(
                conn, "SELECT id, payload FROM public.topology_outbox WHERE id > %s ORDER BY id LIMIT %s",
                (start[1], limit - len(cells)))
        return _Raw(start, limit, [(o, bytes(v) if v is not None else None, d) for o, v, d in cells],
                    [(i, bytes(p)) for i, p in decisions])

    def _decode(self, raw: _Raw, decisions: DecisionDecoder) -> Chunk:
        chunk = Chunk()
        for offset, value, dead_status in raw.cells:
            event = None
            if dead_status is None or dead_status == "resolved":
                event = decode_event(self._codec, value) if value is not None else None
            elif dead_status == "open":
                chunk.open_dead_letters.append(offset)
            chunk.cells.append((offset + 1, event))
        for outbox_id, payload in raw.decisions:
            decision = decisions.decode(payload)
            if decision is None:
                raise RebuildError(f"topology_outbox row {outbox_id} is not a readable decision")
            chunk.decisions.append((outbox_id, decision))
        return chunk

    async def _read_ahead(self, start: tuple[int, int], limit: int) -> tuple[_Raw, Chunk]:
        if self._ahead_conn is None:
            self._ahead_conn = await psycopg.AsyncConnection.connect(self._settings.libpq_url, autocommit=True)
        raw = await self._fetch(self._ahead_conn, start, limit)
        return raw, await asyncio.to_thread(self._decode, raw, self._ahead_decisions)

    async def read(self, conn: Conn, state: State, limit: int) -> Chunk:
        checkpoint = state.checkpoint
        start = (checkpoint.cells_next_offset, checkpoint.decisions_position)
        chunk: Chunk | None = None
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            raw, decoded = await ahead
            if raw.start == start and raw.limit == limit:
                chunk = decoded  # committed rows never change: read a moment earlier is as good
        if chunk is None:
            raw = await self._fetch(conn, start, limit)
            chunk = self._decode(raw, self._decisions)
        if raw.size == limit:  # a full chunk: more is likely to follow
            self._ahead = asyncio.create_task(self._read_ahead(raw.end, limit))
        return chunk

    async def remaining(self, conn: Conn, state: State) -> int:
        checkpoint = state.checkpoint
        row = await _one(
            conn,
            'SELECT (SELECT count(*) FROM public.event_archive WHERE topic = %s AND partition = 0 AND "offset" >= %s)'
            " + (SELECT count(*) FROM public.topology_outbox WHERE id > %s)",
            (checkpoint.cells_topic, checkpoint.cells_next_offset, checkpoint.decisions_position),
        )
        return int(row[0]) if row else 0

    async def seen_decisions(self, conn: Conn, state: State) -> list[UUID]:
        rows = await _all(conn, "SELECT event_id FROM public.topology_outbox WHERE id <= %s",
                          (state.checkpoint.decisions_position,))
        return [event_id for (event_id,) in rows]

    async def prepare_switch(self, conn: Conn, state: State) -> None:
        """Count the outbox up to the shadow's position now, outside the switch's locks;
        under them only the rows after it are counted."""
        checkpoint = state.checkpoint
        row = await _one(conn, "SELECT count(*) FROM public.topology_outbox WHERE id <= %s",
                         (checkpoint.decisions_position,))
        self._counted = (checkpoint.decisions_position, int(row[0]) if row else 0)

    async def uncovered(self, conn: Conn, state: State) -> list[str]:
        checkpoint = state.checkpoint
        problems = await _cells_uncovered(conn, state)
        upto, counted = self._counted if self._counted[0] <= checkpoint.decisions_position else (0, 0)
        after, last = await _one(conn, "SELECT count(*), coalesce(max(id), 0) FROM public.topology_outbox "
                                       "WHERE id > %s", (upto,)) or (0, 0)
        count, last = counted + after, max(last, upto if counted else 0)
        # Every claim partition's position is covered when every decision the live
        # commits up to it wrote (the whole outbox, under these locks) was applied.
        if (count, last) != (checkpoint.decisions_read, checkpoint.decisions_position):
            problems.append(f"topology_outbox holds {count} decisions up to id {last}; the shadow applied "
                            f"{checkpoint.decisions_read} up to id {checkpoint.decisions_position}")
        if checkpoint.skipped_dead_letters:
            resolved = await _one(
                conn,
                'SELECT array_agg("offset" ORDER BY "offset") FROM public.dead_letters '
                "WHERE topic = %s AND partition = 0 AND \"offset\" = ANY(%s) AND status = 'resolved'",
                (checkpoint.cells_topic, checkpoint.skipped_dead_letters),
            )
            if resolved and resolved[0]:
                problems.append(f"dead letters of {checkpoint.cells_topic} at offsets {resolved[0]} were re-driven "
                                "after the rebuild passed them: rebuild with --restart")
        return problems

    async def close(self) -> None:
        if self._ahead is not None:
            self._ahead.cancel()
            with contextlib.suppress(BaseException):
                await self._ahead
            self._ahead = None
        if self._ahead_conn is not None:
            await self._ahead_conn.close()
            self._ahead_conn = None


class KafkaSource:
    """The cells topic and the claim-decision topic (fed by ``topology relay``), read
    with a consumer of its own: no group, positions from the checkpoint."""

    name = "kafka"
    waits = True  # the relay may still be publishing decisions the live tables hold
    persists_decision_ids = True  # the relay publishes at least once: repeats anywhere later

    def __init__(self, settings: Settings, codec: EventCodec, idle_ms: int = 500) -> None:
        self._settings = settings
        self._codec = codec
        self._decisions_decoder = DecisionDecoder(codec)
        self._idle_ms = idle_ms
        self._consumer: Any = None
        self._cells: Any = None
        self._decisions: Any = None

    async def read(self, conn: Conn, state: State, limit: int) -> Chunk:
        if self._consumer is None:
            from aiokafka import AIOKafkaConsumer, TopicPartition

            checkpoint = state.checkpoint
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self._settings.kafka_bootstrap,
                                              enable_auto_commit=False)
            await self._consumer.start()
            self._cells = TopicPartition(checkpoint.cells_topic, 0)
            self._decisions = TopicPartition(checkpoint.decisions_topic, 0)
            self._consumer.assign([self._cells, self._decisions])
            self._consumer.seek(self._cells, checkpoint.cells_next_offset)
            self._consumer.seek(self._decisions, checkpoint.decisions_position)
        batch = await self._consumer.getmany(timeout_ms=self._idle_ms, max_records=limit)
        chunk = Chunk()
        for record in batch.get(self._cells, []):
            event = decode_event(self._codec, record.value) if record.value is not None else None
            chunk.cells.append((record.offset + 1, event))
        for record in batch.get(self._decisions, []):
            event = self._decisions_decoder.decode(record.value) if record.value is not None else None
            chunk.decisions.append((record.offset + 1, event))
        return chunk

    async def _advance_coverage(self, conn: Conn, state: State, limit: int) -> list[tuple[int, UUID]]:
        """Move ``outbox_covered_id`` over the outbox rows whose decision was applied;
        returns the rows after it that are not applied yet."""
        checkpoint = state.checkpoint
        rows = await _all(conn, "SELECT id, event_id FROM public.topology_outbox WHERE id > %s ORDER BY id LIMIT %s",
                          (checkpoint.outbox_covered_id, limit))
        for n, (outbox_id, event_id) in enumerate(rows):
            if event_id not in state.seen:
                return [(i, e) for i, e in rows[n:] if e not in state.seen]
            checkpoint.outbox_covered_id = outbox_id
        return []

    async def remaining(self, conn: Conn, state: State) -> int:
        # An estimate (outbox ids have gaps): the exact check runs under the switch's locks.
        await self._advance_coverage(conn, state, 50_000)
        checkpoint = state.checkpoint
        row = await _one(conn, "SELECT coalesce(max(id), 0) FROM public.topology_outbox")
        last = int(row[0]) if row else 0
        cells_lag = await _live_cells_offset(conn, checkpoint.cells_topic) - checkpoint.cells_next_offset
        return max(0, cells_lag) + max(0, last - checkpoint.outbox_covered_id)

    async def seen_decisions(self, conn: Conn, state: State) -> list[UUID]:
        return []  # kept in rebuild_seen

    async def prepare_switch(self, conn: Conn, state: State) -> None:
        await self._advance_coverage(conn, state, 10_000_000)  # under the locks: only what came since

    async def uncovered(self, conn: Conn, state: State) -> list[str]:
        problems = await _cells_uncovered(conn, state)
        missing = await self._advance_coverage(conn, state, 10_000_000)
        if missing:
            problems.append(f"{len(missing)} decisions of topology_outbox (ids {missing[0][0]}..{missing[-1][0]}) are "
                            f"not on {state.checkpoint.decisions_topic} yet: is `topology relay` running?")
        return problems

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


def make_source(settings: Settings, name: str, codec: EventCodec | None = None) -> Source:
    if name == "archive":
        return ArchiveSource(settings, codec or EventCodec())
    if name == "kafka":
        return KafkaSource(settings, codec or EventCodec())
    raise RebuildError(f"--source is archive or kafka, not {name!r}")


# --- applying and writing a chunk --------------------------------------------------------------


def apply_chunk(state: State, chunk: Chunk, persist_decision_ids: bool) -> _Changes:
    """Fold a chunk over the in-memory shadow, exactly as :func:`projector.replay.fold`
    folds the whole log (the first occurrence of an event id wins)."""
    checkpoint, registry, seen = state.checkpoint, state.registry, state.seen
    changes = _Changes()
    for position, event in chunk.cells:
        checkpoint.cells_next_offset = position
        if event is None or event.event_id in seen:
            continue
        seen.add(event.event_id)
        changes.seen.append(event.event_id)
        assert isinstance(event, CellRegistered | CellUpdated | CellStateChanged)
        decision, cell = apply_cell_event(state.cells, event)
        if decision.outcome is Outcome.APPLIED and cell is not None:
            state.cells[cell.cell_id] = cell
            changes.cells = True
    claims_before, leases_before = changes.claims_before, changes.leases_before
    for position, decision_event in chunk.decisions:
        checkpoint.decisions_position = position
        checkpoint.decisions_read += 1
        if decision_event is None or decision_event.event_id in seen:
            continue  # the relay publishes at least once
        seen.add(decision_event.event_id)
        if persist_decision_ids:
            changes.seen.append(decision_event.event_id)
        # Whether each key existed before the chunk decides how it is written: a new
        # row is only COPYed, an existing one deleted and COPYed again.
        if isinstance(decision_event, _CLAIMS_DECISIONS):
            for ref in decision_event.claims:
                key = ref.key
                if key not in claims_before:
                    claims_before[key] = key in registry.claims
            if isinstance(decision_event, _LEASE_DECISIONS) and decision_event.lease_id not in leases_before:
                leases_before[decision_event.lease_id] = decision_event.lease_id in registry.leases
        evolve(registry, decision_event)
    checkpoint.events_read += chunk.size
    checkpoint.chunks += 1
    checkpoint.skipped_dead_letters.extend(chunk.open_dead_letters)
    return changes


async def _copy(conn: Conn, schema: str, table: str, columns: list[str], rows: Iterable[tuple[Any, ...]]) -> None:
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        _ident(schema, table), sql.SQL(", ").join(map(sql.Identifier, columns)))
    async with conn.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            await copy.write_row(row)


async def write_chunk(conn: Conn, schema: str, state: State, changes: _Changes, version: int) -> None:
    """Write what a chunk changed and the checkpoint, in the caller's transaction."""
    registry = state.registry
    changed_claims = list(registry.changed_claims)
    if state.namespaces_touched is not None:
        state.namespaces_touched.update(v for b, v in changed_claims if b == "NAMESPACE")
    replaced = [k for k in changed_claims if changes.claims_before.get(k, True)]
    if replaced:
        await conn.execute(
            sql.SQL("DELETE FROM {} c USING unnest(%s::text[], %s::text[]) AS k(b, v) "
                    "WHERE c.bucket = k.b AND c.value = k.v").format(_ident(schema, "claims")),
            ([b for b, _ in replaced], [v for _, v in replaced]),
        )
    await _copy(conn, schema, "claims", CLAIM_COLUMNS,
                (claim_row(registry.claims[k], version) for k in changed_claims if k in registry.claims))
    changed_leases = list(registry.changed_leases)
    replaced_leases = [i for i in changed_leases if changes.leases_before.get(i, True)]
    if replaced_leases:
        await conn.execute(sql.SQL("DELETE FROM {} WHERE lease_id = ANY(%s::uuid[])").format(
            _ident(schema, "leases")), (replaced_leases,))
    await _copy(conn, schema, "leases", LEASE_COLUMNS,
                (lease_row(registry.leases[i], version) for i in changed_leases if i in registry.leases))
    await _copy(conn, schema, "sequence_ranges", RANGE_COLUMNS,
                (range_row(r, version) for r in registry.granted_ranges))
    if changes.cells:  # one row per cell: rewriting the table is simplest
        await conn.execute(sql.SQL("DELETE FROM {}").format(_ident(schema, "cells")))
        await _copy(conn, schema, "cells", CELL_COLUMNS, (cell_row(c, version) for c in state.cells.values()))
    if changes.seen:
        await _copy(conn, schema, SEEN_TABLE, ["event_id"], ((i,) for i in changes.seen))
    registry.changed_claims.clear()
    registry.changed_leases.clear()
    registry.granted_ranges.clear()
    await _save_checkpoint(conn, schema, state.checkpoint)


async def _save_checkpoint(conn: Conn, schema: str, checkpoint: Checkpoint) -> None:
    await conn.execute(
        sql.SQL("UPDATE {} SET {}, updated_at = now()").format(
            _ident(schema, CHECKPOINT_TABLE),
            sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(f), sql.Placeholder(f))
                               for f in _CHECKPOINT_FIELDS)),
        asdict(checkpoint),
    )


async def _live_version(conn: Conn) -> int:
    row = await _one(conn, "SELECT version FROM public.topology_version WHERE id = 1")
    return int(row[0]) if row else 0


# --- the shadow schema -------------------------------------------------------------------------


def _head_revision(settings: Settings) -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(settings.sqlalchemy_url)).get_current_head()
    assert head is not None
    return head


async def _schema_exists(conn: Conn, schema: str) -> bool:
    return await _one(conn, "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)) is not None


async def _read_checkpoint(conn: Conn, schema: str) -> Checkpoint | None:
    exists = await _one(conn, "SELECT to_regclass(%s)", (f"{schema}.{CHECKPOINT_TABLE}",))
    if not exists or exists[0] is None:
        return None
    row = await _one(conn, sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(map(sql.Identifier, _CHECKPOINT_FIELDS)), _ident(schema, CHECKPOINT_TABLE)))
    if row is None:
        return None
    values = dict(zip(_CHECKPOINT_FIELDS, row, strict=True))
    values["skipped_dead_letters"] = list(values["skipped_dead_letters"] or [])
    return Checkpoint(**values)


async def _create_shadow(settings: Settings, schema: str, checkpoint: Checkpoint) -> None:
    building = schema + BUILDING_SUFFIX
    async with await psycopg.AsyncConnection.connect(settings.libpq_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(building)))
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(building)))
    await asyncio.to_thread(upgrade_to_head, schema_url(settings, building))
    async with await psycopg.AsyncConnection.connect(settings.libpq_url) as conn:
        await conn.execute(sql.SQL(
            "CREATE TABLE {} (id int PRIMARY KEY DEFAULT 1 CHECK (id = 1), source text NOT NULL, "
            "cells_topic text NOT NULL, decisions_topic text NOT NULL, revision text NOT NULL, "
            "cells_next_offset bigint NOT NULL, decisions_position bigint NOT NULL, decisions_read bigint NOT NULL, "
            "events_read bigint NOT NULL, chunks bigint NOT NULL, skipped_dead_letters bigint[] NOT NULL, "
            "outbox_covered_id bigint NOT NULL, switched_version bigint, "
            "started_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now())"
        ).format(_ident(building, CHECKPOINT_TABLE)))
        await conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(_ident(building, CHECKPOINT_TABLE), sql.Literal(
            "topology rebuild: where the shadow stands in the log, committed with each chunk (adr/0013)")))
        await conn.execute(sql.SQL("CREATE TABLE {} (event_id uuid PRIMARY KEY)").format(_ident(building, SEEN_TABLE)))
        await conn.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            _ident(building, CHECKPOINT_TABLE), sql.SQL(", ").join(map(sql.Identifier, _CHECKPOINT_FIELDS)),
            sql.SQL(", ").join(sql.Placeholder(f) for f in _CHECKPOINT_FIELDS)), asdict(checkpoint))
        # The name appears only once everything above exists: a crash before this
        # leaves a *_building schema, which the next run drops.
        await conn.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(building),
                                                                        sql.Identifier(schema)))


async def _prepare_shadow(settings: Settings, schema: str, source: str, restart: bool,
                          out: TextIO) -> tuple[Checkpoint, bool]:
    """The checkpoint to continue from, and whether it is a resumption."""
    fresh = Checkpoint(source=source, cells_topic=settings.cells_topic,
                       decisions_topic=settings.claim_decisions_topic, revision=_head_revision(settings))
    async with await psycopg.AsyncConnection.connect(settings.libpq_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            sql.Identifier(schema + BUILDING_SUFFIX)))
        exists = await _schema_exists(conn, schema)
        checkpoint = await _read_checkpoint(conn, schema) if exists else None
        if exists and checkpoint is None and not restart:
            raise RebuildError(f"schema {schema} exists but is not a rebuild in progress; "
                               "pass --restart to replace it, or choose another --schema")
        if checkpoint is not None and checkpoint.switched_version is not None:
            print(f"rebuild: {schema} is left over from a rebuild switched at version "
                  f"{checkpoint.switched_version}; starting a new one", file=out, flush=True)
            checkpoint, restart = None, True
        if checkpoint is not None and not restart:
            mismatch = [
                f"{name} {getattr(checkpoint, name)!r} (now {getattr(fresh, name)!r})"
                for name in ("source", "cells_topic", "decisions_topic", "revision")
                if getattr(checkpoint, name) != getattr(fresh, name)
            ]
            if mismatch:
                raise RebuildError(f"the rebuild in {schema} was started with {', '.join(mismatch)}; "
                                   "pass --restart to start over")
            return checkpoint, True
        if exists:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    await _create_shadow(settings, schema, fresh)
    return fresh, False


async def _load_state(conn: Conn, schema: str, checkpoint: Checkpoint, source: Source) -> State:
    """The shadow's content as of its checkpoint, back in memory."""
    state = State(checkpoint)
    for cell_id, address, prefix, region, weight, cell_state, reason in await _all(conn, sql.SQL(
            "SELECT cell_id, address, session_prefix, region, weight, state, state_reason FROM {}").format(
            _ident(schema, "cells"))):
        state.cells[cell_id] = Cell(cell_id, address, prefix, region, weight, CellState(cell_state), reason)
    claims = state.registry.claims
    for bucket, value, cell_id, owner_type, owner_id, status, lease_id, claimed_at in await _all(conn, sql.SQL(
            "SELECT bucket, value, cell_id, owner_type, owner_id, status, lease_id, claimed_at FROM {}").format(
            _ident(schema, "claims"))):
        claims[(bucket, value)] = HeldClaim(bucket, value, cell_id, OwnerType(owner_type), owner_id,
                                            ClaimStatus(status), lease_id, claimed_at)
    leases = state.registry.leases
    for lease_id, request_id, cell_id, owner_type, owner_id, keys, expires_at, status, cause in await _all(
            conn, sql.SQL("SELECT lease_id, request_id, cell_id, owner_type, owner_id, claims, expires_at, status, "
                          "cause FROM {}").format(_ident(schema, "leases"))):
        leases[lease_id] = Lease(lease_id, request_id, cell_id, OwnerType(owner_type), owner_id,
                                 tuple((b, v) for b, v in keys), expires_at, LeaseStatus(status),
                                 ReleaseCause(cause) if cause else None)
    # (registry.sequences only feeds decide(), which a rebuild never calls.)
    state.seen.update(event_id for (event_id,) in await _all(
        conn, sql.SQL("SELECT event_id FROM {}").format(_ident(schema, SEEN_TABLE))))
    state.seen.update(await source.seen_decisions(conn, state))
    return state


# --- progress ------------------------------------------------------------------------------------


@dataclass
class RebuildProgress:
    """Events/s and ETA on stderr: one line per chunk (rewritten in place on a terminal)."""

    out: TextIO
    to_go: int  # events left when this run started (grows with the live log)
    done: int = 0
    started: float = field(default_factory=time.monotonic)

    def chunk(self, checkpoint: Checkpoint, size: int, remaining: int | None = None) -> None:
        self.done += size
        if remaining is not None:
            self.to_go = self.done + remaining
        self.to_go = max(self.to_go, self.done)
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.to_go - self.done) / rate if rate else 0.0
        line = (f"rebuild: chunk {checkpoint.chunks} committed: {checkpoint.events_read:,} events in the shadow, "
                f"{self.done:,}/{self.to_go:,} this run, {rate:,.0f} events/s, ETA {eta:,.0f}s")
        terminal = self.out.isatty()
        print(("\r" + line + " ") if terminal else line, end="" if terminal else "\n", file=self.out, flush=True)

    def note(self, message: str) -> None:
        if self.out.isatty() and self.done:
            print(file=self.out)
        print(f"rebuild: {message}", file=self.out, flush=True)


# --- the switch ----------------------------------------------------------------------------------


@dataclass
class _PreDiff:
    """The namespace routes that differ between the live tables at ``version`` and the
    shadow, taken before the switch's locks in one snapshot."""

    version: int
    namespaces: dict[str, str | None]


_NAMESPACE_DIFF = (
    "SELECT coalesce(l.value, s.value), s.cell_id "
    "FROM (SELECT value, cell_id FROM public.claims WHERE bucket = 'NAMESPACE' AND status = 'COMMITTED' {only}) l "
    "FULL JOIN (SELECT value, cell_id FROM {shadow} WHERE bucket = 'NAMESPACE' AND status = 'COMMITTED' {only}) s "
    "ON l.value = s.value WHERE l.cell_id IS DISTINCT FROM s.cell_id"
)


async def _namespace_diff(conn: Conn, schema: str, keys: list[str] | None = None) -> dict[str, str | None]:
    only = sql.SQL("AND value = ANY(%(keys)s)" if keys is not None else "")
    query = sql.SQL(_NAMESPACE_DIFF).format(only=only, shadow=_ident(schema, "claims"))
    return dict(await _all(conn, query, {"keys": keys} if keys is not None else None))


async def _pre_diff(conn: Conn, schema: str, state: State) -> _PreDiff:
    """The namespace diff, outside the locks: at millions of namespaces the full join
    takes seconds, which the live projector would otherwise wait for. Under the locks
    only the namespaces either side changed since are compared again."""
    await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    version = await _live_version(conn)  # the live routes below are this version's
    namespaces = await _namespace_diff(conn, schema)
    await conn.commit()
    state.namespaces_touched = set()
    return _PreDiff(version, namespaces)


async def _routing_diff(conn: Conn, schema: str, state: State, pre: _PreDiff | None,
                        version: int) -> tuple[dict[str, Cell], list[str], dict[str, str | None]]:
    """What routers must change to go from the live tables (at ``version``, locked) to
    the shadow's: cells (upserted, deleted) and namespace routes (None: not routed)."""
    live = {row[0]: tuple(row) for row in await _all(
        conn, "SELECT cell_id, address, session_prefix, region, weight, state, state_reason FROM public.cells")}
    upserts = {cell_id: cell for cell_id, cell in state.cells.items()
               if live.get(cell_id) != (cell.cell_id, cell.address, cell.session_prefix, cell.region, cell.weight,
                                        cell.state.value, cell.state_reason)}
    deleted = sorted(set(live) - set(state.cells))
    covered = await _one(conn, "SELECT count(*) FROM public.routing_versions WHERE version > %s AND version <= %s",
                         (pre.version if pre else 0, version))
    if pre is None or state.namespaces_touched is None or not covered or covered[0] != version - pre.version:
        return upserts, deleted, await _namespace_diff(conn, schema)  # the change log no longer tells
    # Every live route change since the pre-diff is in the change log (adr/0009); the
    # shadow's are what its chunks changed since. Other namespaces differ as they did.
    changed = {key for (key,) in await _all(
        conn, "SELECT DISTINCT key FROM public.routing_changes WHERE kind = 'namespace' AND version > %s",
        (pre.version,))} | state.namespaces_touched
    namespaces = {path: cell for path, cell in pre.namespaces.items() if path not in changed}
    namespaces.update(await _namespace_diff(conn, schema, sorted(changed)))
    return upserts, deleted, namespaces


@dataclass
class _Switched:
    version: int
    cells: int
    namespaces: int
    locked_seconds: float


async def _switch(settings: Settings, schema: str, retired: str, state: State, source: Source, chunk_events: int,
                  max_tail: int, lock_timeout_s: float, tail_timeout_s: float, progress: RebuildProgress,
                  pre: _PreDiff | None) -> _Switched:
    # SQLAlchemy's AsyncConnection, because the change log is written by the projector's
    # own functions (projector.store, projector.changelog); everything else runs on its
    # psycopg connection, in the same transaction.
    engine = create_async_engine(settings.sqlalchemy_url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as sa, sa.begin():
            conn = cast(Conn, (await sa.get_raw_connection()).driver_connection)
            # SET LOCAL: the timeout ends with this transaction.
            await conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
                sql.Literal(f"{int(lock_timeout_s * 1000)}ms")))
            try:
                # 1. The projector's commits write partition_offsets first: once this is
                #    held no commit is in flight, and the next one waits here, before it
                #    touched anything else (so it cannot deadlock with step 2).
                await conn.execute("LOCK TABLE public.partition_offsets IN EXCLUSIVE MODE")
                locked_at = time.monotonic()
                # 2. Readers: topology_version first, which the read API locks first too
                #    (query_api/snapshot.py), so a refresh in progress finishes and the next
                #    one takes its snapshot after this commits.
                await conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.SQL(", ").join(
                    [_ident(LIVE_SCHEMA, "topology_version")]
                    + [_ident(s, t) for s in (LIVE_SCHEMA, schema) for t in SWITCHED_TABLES])))
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
                raise _NotYet(f"could not lock the live tables within {lock_timeout_s:g}s "
                              f"({exc.__class__.__name__})") from None
            left = await source.remaining(conn, state)
            if left > max_tail:
                raise _NotYet(f"{left:,} events left to apply; more than --max-tail {max_tail:,}")
            version = await _live_version(conn)
            # 3. The final tail, then: does the shadow cover exactly what the live tables do?
            deadline = time.monotonic() + tail_timeout_s
            while True:
                chunk = await source.read(conn, state, chunk_events)
                if chunk.size:
                    changes = apply_chunk(state, chunk, source.persists_decision_ids)
                    await write_chunk(conn, schema, state, changes, version)
                    continue
                problems = await source.uncovered(conn, state)
                if not problems:
                    break
                if not source.waits or time.monotonic() > deadline:
                    raise RebuildError("the shadow does not cover the live projection; nothing was switched: "
                                       + "; ".join(problems))
            # 4. One ordinary new version whose changes are the exact routing difference.
            upserts, deleted, namespaces = await _routing_diff(conn, schema, state, pre, version)
            row = await _one(conn, "UPDATE public.topology_version SET version = version + 1, committed_at = now() "
                                   "WHERE id = 1 RETURNING version")
            assert row is not None
            version = int(row[0])
            await write_routing_changes(sa, version, cells=upserts, namespaces=namespaces)
            if deleted:  # cells are never deleted live, but a fixed bug may remove one
                await conn.execute("INSERT INTO public.routing_changes (version, kind, key, value) "
                                   "SELECT %s, 'cell', k, NULL FROM unnest(%s::text[]) k", (version, deleted))
            await prune_routing_changes(sa, version)  # records the version as complete (adr/0009)
            # The rows routers see changed carry the version that changed them.
            await conn.execute(sql.SQL("UPDATE {} SET version = %s WHERE cell_id = ANY(%s)").format(
                _ident(schema, "cells")), (version, list(upserts)))
            await conn.execute(sql.SQL("UPDATE {} SET version = %s WHERE bucket = 'NAMESPACE' AND value = ANY(%s)")
                               .format(_ident(schema, "claims")), (version, list(namespaces)))
            state.checkpoint.switched_version = version
            await _save_checkpoint(conn, schema, state.checkpoint)
            # 5. The exchange. Old tables out first: index and constraint names are per schema.
            await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(retired)))
            await conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(sql.Identifier(retired), sql.Literal(
                f"projection tables retired by topology rebuild at version {version}, {datetime.now().isoformat()}")))
            for table in SWITCHED_TABLES:
                await conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                    _ident(LIVE_SCHEMA, table), sql.Identifier(retired)))
            for table in SWITCHED_TABLES:
                await conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                    _ident(schema, table), sql.Identifier(LIVE_SCHEMA)))
            await conn.execute("SELECT pg_notify(%s, %s)", (VERSION_CHANNEL, str(version)))
        locked = time.monotonic() - locked_at
        progress.note(f"switched at version {version} ({locked * 1000:,.0f} ms with the projector held): "
                      f"{len(upserts) + len(deleted)} cells and {len(namespaces)} namespace routes differed from the "
                      f"live tables; old tables in schema {retired}")
        return _Switched(version, len(upserts) + len(deleted), len(namespaces), round(locked, 3))
    finally:
        await engine.dispose()


# --- the command ---------------------------------------------------------------------------------


def _check_name(name: str, what: str) -> None:
    if not SCHEMA_NAME.match(name) or len(name) > 50 or name in (LIVE_SCHEMA, "pg_catalog", "information_schema"):
        raise RebuildError(f"{what} must be a lower-case schema name of at most 50 characters other than "
                           f"{LIVE_SCHEMA}, not {name!r}")


async def _check_live_revision(conn: Conn, revision: str) -> None:
    row = await _one(conn, "SELECT version_num FROM public.alembic_version")
    if row is None or row[0] != revision:
        raise RebuildError(f"the live schema is at migration {row[0] if row else 'none'}, this code at {revision}: "
                           "run `topology migrate` first (the shadow's tables are built at the code's head)")


def _collect_chunk_garbage() -> None:
    """Freeze what this chunk allocated.

    The in-memory registry grows by millions of long-lived objects. With automatic
    collection (disabled for the run, see :func:`rebuild_async`) the collector walked
    them again and again: a third of the rebuild's CPU time, measured, and growing with
    the log; even one pass per chunk over the chunk's new objects cost a tenth. The loop
    creates no garbage cycles worth reclaiming before the run ends (a few event-loop
    objects per chunk), so nothing is collected until then, and freezing keeps the
    first collection after the run from walking the whole registry again."""
    gc.freeze()


async def _catch_up(conn: Conn, schema: str, state: State, source: Source, chunk_events: int, target: int,
                    progress: RebuildProgress) -> None:
    """Apply committed chunks until at most ``target`` events are left."""
    while True:
        chunk = await source.read(conn, state, chunk_events)
        if chunk.size:
            changes = apply_chunk(state, chunk, source.persists_decision_ids)
            await write_chunk(conn, schema, state, changes, await _live_version(conn))
        # Only once a read came back short is the end near enough to be worth counting.
        remaining = await source.remaining(conn, state) if chunk.size < chunk_events else None
        await conn.commit()
        _collect_chunk_garbage()
        if chunk.size:
            progress.chunk(state.checkpoint, chunk.size, remaining)
        if chunk.size == 0 or (remaining is not None and remaining <= target):
            return


async def rebuild_async(
    settings: Settings,
    *,
    schema: str = DEFAULT_SCHEMA,
    source: str = "archive",
    restart: bool = False,
    switch: bool = True,
    chunk_events: int = 50_000,
    max_tail: int = 10_000,
    lock_timeout_s: float = 5.0,
    tail_timeout_s: float = 5.0,
    switch_attempts: int = 5,
    retired_schema: str = RETIRED_SCHEMA,
    out: TextIO = sys.stderr,
) -> RebuildResult:
    """Build (or resume) the shadow, catch up, and with ``switch`` exchange it for the live tables."""
    _check_name(schema, "--schema")
    _check_name(retired_schema, "--retired-schema")
    if schema == retired_schema:
        raise RebuildError("--schema and --retired-schema must differ")
    if chunk_events < 1 or max_tail < 0 or switch_attempts < 1:
        raise RebuildError("--chunk-events and --switch-attempts must be positive, --max-tail not negative")
    started = time.monotonic()
    collecting = gc.isenabled()
    gc.disable()  # process-wide, for the run only: see _collect_chunk_garbage
    try:
        return await _rebuild(settings, schema, source, restart, switch, chunk_events, max_tail, lock_timeout_s,
                              tail_timeout_s, switch_attempts, retired_schema, out, started)
    finally:
        gc.unfreeze()
        if collecting:
            gc.enable()


async def _rebuild(settings: Settings, schema: str, source: str, restart: bool, switch: bool, chunk_events: int,
                   max_tail: int, lock_timeout_s: float, tail_timeout_s: float, switch_attempts: int,
                   retired_schema: str, out: TextIO, started: float) -> RebuildResult:
    async with await psycopg.AsyncConnection.connect(settings.libpq_url, autocommit=True) as guard:
        # Session-level: released when this process ends, however it ends.
        locked = await _one(guard, "SELECT pg_try_advisory_lock(%s)", (REBUILD_LOCK,))
        if not locked or not locked[0]:
            raise RebuildError("another rebuild is running on this database")
        if switch:
            await _check_live_revision(guard, _head_revision(settings))
            if await _schema_exists(guard, retired_schema):
                raise RebuildError(f"schema {retired_schema} still holds the tables an earlier switch retired: "
                                   "inspect them, then `topology rebuild --drop-retired` (or --retired-schema NAME)")
        log = make_source(settings, source)
        try:
            checkpoint, resumed = await _prepare_shadow(settings, schema, source, restart, out)
            async with await psycopg.AsyncConnection.connect(settings.libpq_url) as conn:
                state = await _load_state(conn, schema, checkpoint, log)
                at_start = checkpoint.events_read
                progress = RebuildProgress(out, await log.remaining(conn, state))
                await conn.commit()
                if resumed:
                    progress.note(f"resuming {schema} from its checkpoint: {at_start:,} events already applied in "
                                  f"{checkpoint.chunks} chunks, about {progress.to_go:,} to go")
                else:
                    progress.note(f"building {schema} from the {source}: about {progress.to_go:,} events")
                await _catch_up(conn, schema, state, log, chunk_events, max_tail if switch else 0, progress)
                result = RebuildResult(schema, source, resumed, at_start, 0, 0, 0, 0.0)
                if switch:
                    # Bulk-loaded tables have no planner statistics yet: gather them before
                    # the live projector and the read API start planning against them.
                    await conn.execute(sql.SQL("ANALYZE {}").format(
                        sql.SQL(", ").join(_ident(schema, t) for t in SWITCHED_TABLES)))
                    await conn.commit()
                for attempt in range(1, switch_attempts + 1) if switch else ():
                    # The slow comparisons happen here, before the locks; under them only
                    # what changed since is compared again.
                    pre = await _pre_diff(conn, schema, state)
                    await log.prepare_switch(conn, state)
                    await conn.commit()
                    try:
                        switched = await _switch(settings, schema, retired_schema, state, log, chunk_events,
                                                 max_tail, lock_timeout_s, tail_timeout_s, progress, pre)
                    except _NotYet as exc:
                        progress.note(f"switch attempt {attempt} of {switch_attempts} deferred: {exc}")
                        if attempt == switch_attempts:
                            raise RebuildError(f"could not switch after {switch_attempts} attempts: {exc}; "
                                               "the shadow is kept, run again to resume") from None
                        await _catch_up(conn, schema, state, log, chunk_events, max_tail, progress)
                        continue
                    result.switched_version = switched.version
                    result.retired_schema = retired_schema
                    result.routing_changes = {"cells": switched.cells, "namespaces": switched.namespaces}
                    result.switch_locked_seconds = switched.locked_seconds
                    break
        finally:
            await log.close()
        if result.switched_version is not None:
            # What is left of the shadow is empty scaffolding (its own archive, outbox, ...).
            await guard.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        await guard.execute("SELECT pg_advisory_unlock(%s)", (REBUILD_LOCK,))
    checkpoint = state.checkpoint
    result.events_this_run = checkpoint.events_read - at_start
    result.events_total = checkpoint.events_read
    result.chunks = checkpoint.chunks
    result.seconds = round(time.monotonic() - started, 3)
    progress.note(f"done: {result.events_this_run:,} events this run, {result.events_total:,} in total, "
                  f"in {result.seconds:,.1f}s")
    return result


def rebuild(settings: Settings, **options: Any) -> RebuildResult:
    """:func:`rebuild_async` on an event loop of its own (the CLI, tests in a thread)."""
    return asyncio.run(rebuild_async(settings, **options))


def drop_retired(settings: Settings, retired_schema: str = RETIRED_SCHEMA) -> bool:
    """Drop what an earlier switch retired; False when there is nothing to drop."""
    _check_name(retired_schema, "--retired-schema")
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (retired_schema,)).fetchone() is None:
            return False
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(retired_schema)))
        return True


def result_json(result: RebuildResult) -> str:
    return json.dumps(asdict(result))
