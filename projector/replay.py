"""The one replay pipeline: the log, folded into a schema of its own, in resumable chunks (adr/0013).

The log is the source of truth; the tables are a view of it. Every rebuilt view
goes through :func:`building`:

1. A schema at the head migrations, created under a temporary name and renamed once
   complete, so a crash never leaves half a schema behind; or, when it holds a run
   that was stopped, that run's checkpoint and content, back in memory.
2. Chunks read from a source (projector/sources.py: the archive or Kafka; the cells
   topic and the *recorded decisions*, adr/0010), folded by the live projector's own
   fold (:func:`topology_store.core.fold.fold`), their changed rows COPYed (projector/bulk.py)
   and committed with the checkpoint. A run killed at any instant resumes from its
   last committed chunk, applying no event twice and skipping none.

- ``topology replay --into SCHEMA [--until CUT]`` (:func:`replay`): the pipeline up to a cut.
- ``topology verify`` (:func:`verify`): the pipeline into a scratch schema, up to where the
  live tables stood in one snapshot, compared with them row by row.
- ``topology rebuild`` (projector/rebuild.py): the pipeline into a shadow schema, caught up
  with the live projector, then switched with the live tables.

The digest covers the projection's content and leaves out the ``version``
columns: versions number commits, and commits depend on batch sizes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import hashlib
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any, TextIO, TypeVar
from uuid import UUID

import psycopg
from psycopg import sql

from topology_store.core.cells import DUPLICATE, Cell
from topology_store.core.claims import ClaimKey, ClaimStatus, HeldClaim, Lease, LeaseStatus
from topology_store.core.fold import BatchResult, Projection, fold
from topology_store.projector.bulk import copy_rows
from topology_store.projector.migrate import alembic_config, upgrade_to_head
from topology_store.projector.tables import LEASE_ENDED_AT_SQL
from topology_store.projector.sources import (
    WHOLE_LOG,
    Checkpoint,
    Chunk,
    Conn,
    Cut,
    ReplayError,
    Source,
    fetch_all,
    fetch_one,
    make_source,
)
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import (
    CellState,
    ClaimsCommitted,
    ClaimsDestroyed,
    LeaseCommitted,
    LeaseGranted,
    LeaseReleased,
    OwnerTransferred,
    OwnerType,
    ReleaseCause,
    SequenceRangeGranted,
)

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,49}$")  # room for the _building suffix within 63 characters
LIVE_SCHEMA = "public"
CHECKPOINT_TABLE = "rebuild_checkpoint"
SEEN_TABLE = "rebuild_seen"  # event ids applied whose duplicates later in the log must be skipped
BUILDING_SUFFIX = "_building"
SCHEMA_LOCK = 0x746F706F  # pg advisory lock class: one run per schema at a time (the key: the schema's hash)
# The decisions that touch claims (all name them in ``claims``) and those that touch a lease.
_CLAIMS_DECISIONS = frozenset({LeaseGranted, LeaseCommitted, LeaseReleased, ClaimsCommitted, ClaimsDestroyed,
                               OwnerTransferred})
_LEASE_DECISIONS = frozenset({LeaseGranted, LeaseCommitted, LeaseReleased})
_CHECKPOINT_FIELDS = [f.name for f in fields(Checkpoint)]
# How each command names its schema and its start-over flag, for messages.
_FLAGS = {"replay": ("--into", "--replace"), "rebuild": ("--schema", "--restart"), "verify": ("--schema", "--restart")}

T = TypeVar("T")


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end on an event loop of its own: in this thread, or in
    another when this one runs a loop already (a caller that blocks on us knowingly)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


# --- the projection's rows -----------------------------------------------------------------------

CELL_COLUMNS = ["cell_id", "address", "session_prefix", "region", "weight", "state", "state_reason", "version",
                "number"]
CLAIM_COLUMNS = ["bucket", "value", "cell_id", "owner_type", "owner_id", "claimed_at", "version", "status", "lease_id",
                 "source_type", "source_id", "user_data"]
LEASE_COLUMNS = ["lease_id", "request_id", "cell_id", "owner_type", "owner_id", "claims", "expires_at", "status",
                 "cause", "version", "destroy_claims", "granted_at"]
RANGE_COLUMNS = ["sequence_name", "start", "end", "cell_id", "request_id", "version"]


def cell_row(c: Cell, version: int) -> tuple[Any, ...]:
    return (c.cell_id, c.address, c.session_prefix, c.region, c.weight, c.state.value, c.state_reason, version,
            c.number)


def claim_row(h: HeldClaim, version: int) -> tuple[Any, ...]:
    return (h.bucket, h.value, h.cell_id, h.owner_type.value, h.owner_id, h.claimed_at, version, h.status.value,
            h.lease_id, h.source_type, h.source_id, h.user_data)


def lease_row(l: Lease, version: int) -> tuple[Any, ...]:  # noqa: E741
    return (l.lease_id, l.request_id, l.cell_id, l.owner_type.value, l.owner_id,
            json.dumps([list(k) for k in l.claims]), l.expires_at, l.status.value,
            l.cause.value if l.cause else None, version, json.dumps([list(k) for k in l.destroys]), l.granted_at)


def range_row(r: SequenceRangeGranted, version: int) -> tuple[Any, ...]:
    return (r.sequence_name, r.start, r.end, r.cell_id, r.request_id, version)


# --- applying and writing a chunk ----------------------------------------------------------------


@dataclass
class State:
    """What a run holds in memory: the schema's content (equal to its tables at the
    checkpoint) and the event ids applied, for the log's redeliveries."""

    checkpoint: Checkpoint
    projection: Projection = field(default_factory=Projection)
    # NAMESPACE keys the shadow changed since the switch's pre-diff (None: no pre-diff)
    namespaces_touched: set[str] | None = None


@dataclass
class _Changes:
    """What one chunk changed, for writing: presence of each touched key at the chunk's start."""

    cells: bool = False
    claims_before: dict[ClaimKey, bool] = field(default_factory=dict)
    leases_before: dict[UUID, bool] = field(default_factory=dict)
    seen: list[UUID] = field(default_factory=list)  # ids to persist in rebuild_seen


def _fresh(result: BatchResult) -> list[UUID]:
    return [p.event.event_id for p, decision in result.decisions if decision is not DUPLICATE]


def apply_chunk(state: State, chunk: Chunk, persist_decision_ids: bool) -> _Changes:
    """Fold a chunk over the in-memory projection with the live projector's fold, and
    move the checkpoint past it."""
    changes = _Changes()
    registry = state.projection.registry
    # Whether each key existed before the chunk decides how it is written: a new row
    # is only COPYed, an existing one deleted and COPYed again.
    claims_before, leases_before = changes.claims_before, changes.leases_before
    for positioned in chunk.decisions:
        decision: Any = positioned.event
        if type(decision) in _CLAIMS_DECISIONS:
            for ref in decision.claims:
                key = ref.key
                if key not in claims_before:
                    claims_before[key] = key in registry.claims
            if type(decision) in _LEASE_DECISIONS and decision.lease_id not in leases_before:
                leases_before[decision.lease_id] = decision.lease_id in registry.leases
    cells = fold(chunk.cells, state.projection)
    decisions = fold(chunk.decisions, state.projection)
    changes.cells = bool(cells.cells)
    changes.seen = _fresh(cells) + (_fresh(decisions) if persist_decision_ids else [])
    chunk.advance(state.checkpoint)
    return changes


async def write_chunk(conn: Conn, schema: str, state: State, changes: _Changes, version: int) -> None:
    """Write what a chunk changed and the checkpoint, in the caller's transaction."""
    projection, registry = state.projection, state.projection.registry
    changed_claims = list(registry.changed_claims)
    if state.namespaces_touched is not None:
        state.namespaces_touched.update(v for b, v in changed_claims if b == "NAMESPACE")
    replaced = [k for k in changed_claims if changes.claims_before.get(k, True)]
    if replaced:
        await conn.execute(
            sql.SQL("DELETE FROM {} c USING unnest(%s::text[], %s::text[]) AS k(b, v) "
                    "WHERE c.bucket = k.b AND c.value = k.v").format(sql.Identifier(schema, "claims")),
            ([b for b, _ in replaced], [v for _, v in replaced]),
        )
    await copy_rows(conn, "claims", CLAIM_COLUMNS,
                    (claim_row(registry.claims[k], version) for k in changed_claims if k in registry.claims), schema)
    changed_leases = list(registry.changed_leases)
    replaced_leases = [i for i in changed_leases if changes.leases_before.get(i, True)]
    if replaced_leases:
        await conn.execute(sql.SQL("DELETE FROM {} WHERE lease_id = ANY(%s::uuid[])").format(
            sql.Identifier(schema, "leases")), (replaced_leases,))
    await copy_rows(conn, "leases", LEASE_COLUMNS,
                    (lease_row(registry.leases[i], version) for i in changed_leases if i in registry.leases), schema)
    await copy_rows(conn, "sequence_ranges", RANGE_COLUMNS,
                    (range_row(r, version) for r in registry.granted_ranges), schema)
    if changes.cells:  # one row per cell: rewriting the table is simplest
        await conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(schema, "cells")))
        await copy_rows(conn, "cells", CELL_COLUMNS, (cell_row(c, version) for c in projection.cells.values()),
                        schema)
    if changes.seen:
        await copy_rows(conn, SEEN_TABLE, ["event_id"], ((i,) for i in changes.seen), schema)
    registry.changed_claims.clear()
    registry.changed_leases.clear()
    registry.granted_ranges.clear()
    await save_checkpoint(conn, schema, state.checkpoint)


async def save_checkpoint(conn: Conn, schema: str, checkpoint: Checkpoint) -> None:
    await conn.execute(
        sql.SQL("UPDATE {} SET {}, updated_at = now()").format(
            sql.Identifier(schema, CHECKPOINT_TABLE),
            sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(f), sql.Placeholder(f))
                               for f in _CHECKPOINT_FIELDS)),
        asdict(checkpoint),
    )


async def live_version(conn: Conn) -> int:
    row = await fetch_one(conn, "SELECT version FROM public.topology_version WHERE id = 1")
    return int(row[0]) if row else 0


# --- the schema ----------------------------------------------------------------------------------


def check_name(name: str, what: str) -> None:
    if not SCHEMA_NAME.match(name) or name in (LIVE_SCHEMA, "pg_catalog", "information_schema"):
        raise ReplayError(f"{what} must be a lower-case schema name of at most 50 characters other than "
                          f"{LIVE_SCHEMA}, not {name!r}")


def schema_url(settings: Settings, schema: str) -> str:
    """The database URL with ``schema`` first on the search path."""
    separator = "&" if "?" in settings.sqlalchemy_url else "?"
    return f"{settings.sqlalchemy_url}{separator}options=-csearch_path%3D{schema}"


def head_revision(settings: Settings) -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(settings.sqlalchemy_url)).get_current_head()
    assert head is not None
    return head


async def schema_exists(conn: Conn, schema: str) -> bool:
    return await fetch_one(conn, "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)) is not None


async def _read_checkpoint(conn: Conn, schema: str) -> Checkpoint | None:
    exists = await fetch_one(conn, "SELECT to_regclass(%s)", (f"{schema}.{CHECKPOINT_TABLE}",))
    if not exists or exists[0] is None:
        return None
    # A schema started before runs recorded their cut was a run over the whole log.
    await conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS cut text NOT NULL DEFAULT ''").format(
        sql.Identifier(schema, CHECKPOINT_TABLE)))
    row = await fetch_one(conn, sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(map(sql.Identifier, _CHECKPOINT_FIELDS)), sql.Identifier(schema, CHECKPOINT_TABLE)))
    if row is None:
        return None
    values = dict(zip(_CHECKPOINT_FIELDS, row, strict=True))
    values["skipped_dead_letters"] = list(values["skipped_dead_letters"] or [])
    return Checkpoint(**values)


async def _create_schema(settings: Settings, schema: str, checkpoint: Checkpoint) -> None:
    building = schema + BUILDING_SUFFIX
    async with await psycopg.AsyncConnection.connect(settings.libpq_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(building)))
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(building)))
    await asyncio.to_thread(upgrade_to_head, schema_url(settings, building))
    async with await psycopg.AsyncConnection.connect(settings.libpq_url) as conn:
        await conn.execute(sql.SQL(
            "CREATE TABLE {} (id int PRIMARY KEY DEFAULT 1 CHECK (id = 1), source text NOT NULL, "
            "cells_topic text NOT NULL, decisions_topic text NOT NULL, revision text NOT NULL, cut text NOT NULL, "
            "cells_next_offset bigint NOT NULL, decisions_position bigint NOT NULL, decisions_read bigint NOT NULL, "
            "events_read bigint NOT NULL, chunks bigint NOT NULL, skipped_dead_letters bigint[] NOT NULL, "
            "outbox_covered_id bigint NOT NULL, switched_version bigint, "
            "started_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now())"
        ).format(sql.Identifier(building, CHECKPOINT_TABLE)))
        await conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
            sql.Identifier(building, CHECKPOINT_TABLE),
            sql.Literal("topology replay/rebuild: where the schema stands in the log, committed with each chunk")))
        await conn.execute(sql.SQL("CREATE TABLE {} (event_id uuid PRIMARY KEY)").format(
            sql.Identifier(building, SEEN_TABLE)))
        await conn.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            sql.Identifier(building, CHECKPOINT_TABLE), sql.SQL(", ").join(map(sql.Identifier, _CHECKPOINT_FIELDS)),
            sql.SQL(", ").join(sql.Placeholder(f) for f in _CHECKPOINT_FIELDS)), asdict(checkpoint))
        # The name appears only once everything above exists: a crash before this
        # leaves a *_building schema, which the next run drops.
        await conn.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(building),
                                                                        sql.Identifier(schema)))


async def _prepare_schema(settings: Settings, schema: str, fresh: Checkpoint, restart: bool, command: str,
                          out: TextIO) -> tuple[Checkpoint, bool]:
    """The checkpoint to continue from, and whether it is a resumption."""
    schema_flag, restart_flag = _FLAGS[command]
    async with await psycopg.AsyncConnection.connect(settings.libpq_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            sql.Identifier(schema + BUILDING_SUFFIX)))
        exists = await schema_exists(conn, schema)
        checkpoint = await _read_checkpoint(conn, schema) if exists and not restart else None
        if exists and checkpoint is None and not restart:
            raise ReplayError(f"schema {schema} exists but is not a {command} in progress; pass {restart_flag} to "
                              f"replace it, or choose another {schema_flag}")
        if checkpoint is not None and checkpoint.switched_version is not None:
            print(f"{command}: {schema} is left over from a rebuild switched at version "
                  f"{checkpoint.switched_version}; starting a new one", file=out, flush=True)
            checkpoint, restart = None, True
        if checkpoint is not None:
            mismatch = [
                f"{name} {getattr(checkpoint, name)!r} (now {getattr(fresh, name)!r})"
                for name in ("source", "cells_topic", "decisions_topic", "revision", "cut")
                if getattr(checkpoint, name) != getattr(fresh, name)
            ]
            if mismatch:
                raise ReplayError(f"the run in {schema} was started with {', '.join(mismatch)}; "
                                  f"pass {restart_flag} to start over")
            return checkpoint, True
        if exists:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    await _create_schema(settings, schema, fresh)
    return fresh, False


async def _load_state(conn: Conn, schema: str, checkpoint: Checkpoint, source: Source) -> State:
    """The schema's content as of its checkpoint, back in memory."""
    state = State(checkpoint)
    cells, claims, leases = state.projection.cells, state.projection.registry.claims, state.projection.registry.leases
    for cell_id, address, prefix, region, weight, cell_state, reason, number in await fetch_all(conn, sql.SQL(
            "SELECT cell_id, address, session_prefix, region, weight, state, state_reason, number FROM {}").format(
            sql.Identifier(schema, "cells"))):
        cells[cell_id] = Cell(cell_id, address, prefix, region, weight, CellState(cell_state), reason, number)
    for (bucket, value, cell_id, owner_type, owner_id, status, lease_id, claimed_at, source_type, source_id,
         user_data) in await fetch_all(conn, sql.SQL(
            "SELECT bucket, value, cell_id, owner_type, owner_id, status, lease_id, claimed_at, source_type, "
            "source_id, user_data FROM {}").format(sql.Identifier(schema, "claims"))):
        claims[(bucket, value)] = HeldClaim(bucket, value, cell_id, OwnerType(owner_type), owner_id,
                                            ClaimStatus(status), lease_id, claimed_at, source_type,
                                            None if source_id is None else bytes(source_id),
                                            None if user_data is None else bytes(user_data))
    for (lease_id, request_id, cell_id, owner_type, owner_id, keys, expires_at, status, cause, destroys,
         granted_at) in await fetch_all(
            conn, sql.SQL("SELECT lease_id, request_id, cell_id, owner_type, owner_id, claims, expires_at, status, "
                          "cause, destroy_claims, granted_at FROM {}").format(sql.Identifier(schema, "leases"))):
        leases[lease_id] = Lease(lease_id, request_id, cell_id, OwnerType(owner_type), owner_id,
                                 tuple((b, v) for b, v in keys), expires_at, LeaseStatus(status),
                                 ReleaseCause(cause) if cause else None, tuple((b, v) for b, v in destroys), granted_at)
    # (registry.sequences only feeds decide(), which a replay never calls.)
    state.projection.seen.update(event_id for (event_id,) in await fetch_all(
        conn, sql.SQL("SELECT event_id FROM {}").format(sql.Identifier(schema, SEEN_TABLE))))
    state.projection.seen.update(await source.seen_decisions(conn, checkpoint))
    return state


# --- a run ---------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Events/s and ETA on stderr: one line per chunk (rewritten in place on a terminal)."""

    command: str
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
        line = (f"{self.command}: chunk {checkpoint.chunks} committed: {checkpoint.events_read:,} events in the "
                f"schema, {self.done:,}/{self.to_go:,} this run, {rate:,.0f} events/s, ETA {eta:,.0f}s")
        terminal = self.out.isatty()
        print(("\r" + line + " ") if terminal else line, end="" if terminal else "\n", file=self.out, flush=True)

    def note(self, message: str) -> None:
        if self.out.isatty() and self.done:
            print(file=self.out)
        print(f"{self.command}: {message}", file=self.out, flush=True)


@dataclass
class Build:
    """One run of the pipeline over ``schema``: what it holds, where it reads, how far it got."""

    schema: str
    conn: Conn  # commits each chunk
    state: State
    source: Source
    progress: Progress
    chunk_events: int
    version: int | None  # stamped on the rows written (None: the live version as each chunk is written)
    resumed: bool
    at_start: int  # events already in the schema when this run started

    async def write(self, conn: Conn, chunk: Chunk, version: int) -> None:
        """Apply ``chunk`` and write what it changed, with the checkpoint, in ``conn``'s transaction."""
        changes = apply_chunk(self.state, chunk, self.source.persists_decision_ids)
        await write_chunk(conn, self.schema, self.state, changes, version)

    async def catch_up(self, target: int | None) -> None:
        """Commit chunks until at most ``target`` events are left (None: until the source
        has nothing more)."""
        conn, state, source = self.conn, self.state, self.source
        while True:
            chunk = await source.read(conn, state.checkpoint, self.chunk_events)
            if chunk.size:
                await self.write(conn, chunk, self.version if self.version is not None else await live_version(conn))
            # Only once a read came back short is the end near enough to be worth counting.
            remaining = (await source.remaining(conn, state.checkpoint, state.projection.seen)
                         if chunk.size < self.chunk_events else None)
            await conn.commit()
            # The projection in memory grows by millions of long-lived objects: with
            # automatic collection the collector walked them again and again (a third
            # of a rebuild's CPU time, measured). The loop makes no garbage cycles worth
            # reclaiming before the run ends, so collection is off for the run and each
            # chunk's objects are frozen, out of the first collection's way afterwards.
            gc.freeze()
            if chunk.size:
                self.progress.chunk(state.checkpoint, chunk.size, remaining)
            if chunk.size == 0 or (target is not None and remaining is not None and remaining <= target):
                return


@asynccontextmanager
async def building(settings: Settings, schema: str, source_name: str, *, cut: Cut = WHOLE_LOG, restart: bool = False,
                   chunk_events: int = 50_000, version: int | None = None, command: str = "replay",
                   out: TextIO = sys.stderr) -> AsyncIterator[Build]:
    """Start (or resume) a run of the pipeline into ``schema``; the caller catches up."""
    check_name(schema, _FLAGS[command][0])
    if chunk_events < 1:
        raise ReplayError("--chunk-events must be positive")
    collecting = gc.isenabled()
    gc.disable()  # process-wide, for the run only: see Build.catch_up
    try:
        async with await psycopg.AsyncConnection.connect(settings.libpq_url, autocommit=True) as guard:
            # Session-level: released when this connection ends, however the run ends.
            locked = await fetch_one(guard, "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (SCHEMA_LOCK, schema))
            if not locked or not locked[0]:
                raise ReplayError(f"another run is writing schema {schema}")
            source = make_source(settings, source_name, cut)
            try:
                fresh = Checkpoint(source=source_name, cells_topic=settings.cells_topic, cut=str(cut),
                                   decisions_topic=settings.claim_decisions_topic, revision=head_revision(settings))
                checkpoint, resumed = await _prepare_schema(settings, schema, fresh, restart, command, out)
                async with await psycopg.AsyncConnection.connect(settings.libpq_url) as conn:
                    state = await _load_state(conn, schema, checkpoint, source)
                    progress = Progress(command, out, await source.remaining(conn, checkpoint, state.projection.seen))
                    await conn.commit()
                    if resumed:
                        progress.note(f"resuming {schema} from its checkpoint: {checkpoint.events_read:,} events "
                                      f"already applied in {checkpoint.chunks} chunks, about {progress.to_go:,} to go")
                    else:
                        progress.note(f"building {schema} from the {source_name}: about {progress.to_go:,} events")
                    yield Build(schema, conn, state, source, progress, chunk_events, version, resumed,
                                checkpoint.events_read)
            finally:
                await source.close()
    finally:
        gc.unfreeze()
        if collecting:
            gc.enable()


# --- replay and verify ---------------------------------------------------------------------------


def replay(settings: Settings, schema: str, cut: Cut = WHOLE_LOG, source: str = "archive", replace: bool = False,
           out: TextIO = sys.stderr, chunk_events: int = 50_000) -> Projection:
    """Replay the log up to ``cut`` into ``schema``: a rebuild without the switch. A rerun
    resumes a run that was stopped; ``replace`` starts over. Rows carry the cut's version
    (0 without one). Returns the projection."""

    async def run() -> Projection:
        version = cut.until_version or 0
        async with building(settings, schema, source, cut=cut, restart=replace, chunk_events=chunk_events,
                            version=version, command="replay", out=out) as build:
            await build.catch_up(None)
            await build.conn.execute(sql.SQL("UPDATE {} SET version = %s, committed_at = now()").format(
                sql.Identifier(schema, "topology_version")), (version,))
            await build.conn.commit()
            return build.state.projection

    return run_sync(run())


# The projection's content: everything but the version columns, ordered by key.
DIGEST_QUERIES: dict[str, str] = {
    "cells": "SELECT cell_id, address, session_prefix, region, weight, state, state_reason, number FROM {s}.cells "
             "ORDER BY 1",
    "claims": "SELECT bucket, value, cell_id, owner_type, owner_id, claimed_at, status, lease_id, source_type, "
              "encode(source_id, 'hex'), encode(user_data, 'hex') FROM {s}.claims ORDER BY 1, 2",
    "leases": "SELECT lease_id, request_id, cell_id, owner_type, owner_id, claims, expires_at, status, cause, "
              "destroy_claims, granted_at FROM {s}.leases ORDER BY 1",
    "sequence_ranges": 'SELECT sequence_name, start, "end", cell_id, request_id FROM {s}.sequence_ranges ORDER BY 1, 2',
}


def table_rows(conn: psycopg.Connection[Any], schema: str,
               leases_ended_before: datetime | None = None) -> dict[str, list[tuple[str, ...]]]:
    """``leases_ended_before``: leave out ended leases whose expiry is older (those
    ``topology compact`` may have removed, adr/0020), on both sides of a comparison."""
    queries = dict(DIGEST_QUERIES)
    params: dict[str, tuple[object, ...]] = {}
    if leases_ended_before is not None:
        queries["leases"] = queries["leases"].replace(
            " ORDER BY", f" WHERE NOT (status <> 'OPEN' AND {LEASE_ENDED_AT_SQL} < %s) ORDER BY")
        params["leases"] = (leases_ended_before,)
    return {
        table: [tuple(json.dumps(v, sort_keys=True, default=str) for v in row)
                for row in conn.execute(sql.SQL(query.replace("{s}", "{}")).format(sql.Identifier(schema)),
                                        params.get(table))]
        for table, query in queries.items()
    }


def digest(rows: dict[str, list[tuple[str, ...]]]) -> str:
    hasher = hashlib.sha256()
    for table in sorted(rows):
        hasher.update(table.encode())
        for row in rows[table]:
            hasher.update(b"\x1e" + "\x1f".join(row).encode())
    return hasher.hexdigest()


@dataclass
class Verification:
    live_digest: str
    replay_digest: str
    missing: dict[str, list[tuple[str, ...]]]  # in the replay, not live
    unexpected: dict[str, list[tuple[str, ...]]]  # live, not in the replay

    @property
    def equal(self) -> bool:
        return self.live_digest == self.replay_digest


def compare(settings: Settings, live_schema: str, replay_schema: str) -> Verification:
    with psycopg.connect(settings.libpq_url) as conn:
        return _verification(table_rows(conn, live_schema), table_rows(conn, replay_schema))


def _verification(live: dict[str, list[tuple[str, ...]]], replayed: dict[str, list[tuple[str, ...]]]) -> Verification:
    return Verification(
        live_digest=digest(live),
        replay_digest=digest(replayed),
        missing={t: sorted(set(replayed[t]) - set(live[t])) for t in live if set(replayed[t]) - set(live[t])},
        unexpected={t: sorted(set(live[t]) - set(replayed[t])) for t in live if set(live[t]) - set(replayed[t])},
    )


def verify(settings: Settings, scratch_schema: str = "topology_verify", out: TextIO = sys.stderr) -> Verification:
    """Replay the archive into a scratch schema up to where the live tables stand, and
    compare the two row by row. The live projector may keep running: the live rows and
    their position in the log (the cells topic's offset, the last outbox id: ids are
    drawn in commit order, adr/0014) are read in one REPEATABLE READ snapshot, so both
    sides stand at the same cut."""
    with psycopg.connect(settings.libpq_url) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        # LOCK takes no snapshot: when a rebuild is switching tables (projector/rebuild.py),
        # the snapshot is taken once the switch committed, never half before it.
        conn.execute("LOCK TABLE public.topology_version IN ACCESS SHARE MODE")
        # Ended leases past their retention may be compacted live, never in the replay:
        # both sides are compared without them (adr/0020).
        ended_before: datetime | None = None
        if settings.retain_ended_leases_s > 0:
            ended_before = conn.execute("SELECT now() - %s * interval '1 second'",
                                        (settings.retain_ended_leases_s,)).fetchone()[0]  # type: ignore[index]
        live = table_rows(conn, LIVE_SCHEMA, ended_before)
        position = conn.execute(
            "SELECT coalesce((SELECT next_offset FROM public.partition_offsets WHERE topic = %s AND partition = 0), "
            "0), coalesce((SELECT max(id) FROM public.topology_outbox), 0)", (settings.cells_topic,)).fetchone()
    assert position is not None

    async def run() -> None:
        async with building(settings, scratch_schema, "archive", cut=Cut(live=(position[0], position[1])),
                            restart=True, version=0, command="verify", out=out) as build:
            await build.catch_up(None)

    try:
        run_sync(run())
        with psycopg.connect(settings.libpq_url) as conn:
            replayed = table_rows(conn, scratch_schema, ended_before)
    finally:
        with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(scratch_schema)))
    return _verification(live, replayed)


def export_rows(settings: Settings, schema: str, table: str, fmt: str, out: TextIO) -> int:
    if table not in DIGEST_QUERIES:
        raise ReplayError(f"--table is one of {', '.join(DIGEST_QUERIES)}")
    query = DIGEST_QUERIES[table].replace("{s}", "{}")
    count = 0
    with psycopg.connect(settings.libpq_url) as conn:
        cursor = conn.execute(sql.SQL(query).format(sql.Identifier(schema)))
        names = [c.name for c in cursor.description or []]
        if fmt == "csv":
            import csv

            writer = csv.writer(out)
            writer.writerow(names)
            for row in cursor:
                writer.writerow(row)
                count += 1
        else:
            for row in cursor:
                out.write(json.dumps(dict(zip(names, row, strict=True)), default=str) + "\n")
                count += 1
    return count
