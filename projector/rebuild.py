"""Zero-downtime rebuild: replay the log into a shadow schema while the live projector
keeps serving, catch up with it, and switch the read path over in one transaction
(adr/0013).

1. **Build** with the one replay pipeline (projector/replay.py: chunks of the archive or
   Kafka, folded by the live projector's own fold over the *recorded* claim decisions,
   adr/0010, and committed with the shadow's checkpoint: a killed run resumes).
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

import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, TextIO, cast

import psycopg
from psycopg import sql
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

from topology_store.projector.changelog import prune_routing_changes
from topology_store.projector.replay import (
    LIVE_SCHEMA,
    Build,
    State,
    building,
    check_name,
    head_revision,
    live_version,
    run_sync,
    save_checkpoint,
    schema_exists,
)
from topology_store.projector.sources import Conn, ReplayError, fetch_all, fetch_one
from topology_store.projector.store import write_routing_changes
from topology_store.runtime.database import VERSION_CHANNEL
from topology_store.runtime.settings import Settings
from topology_store.schemas.router_sync import CELL_DOCUMENTS_SQL

DEFAULT_SCHEMA = "topology_shadow"
RETIRED_SCHEMA = "topology_retired"
# The tables a rebuild derives from the log and the switch exchanges. Everything
# else in public is the log or its bookkeeping (archive, outbox, offsets, decisions
# taken, dead letters, audit index) or the served history (version, change log).
SWITCHED_TABLES = ("cells", "claims", "leases", "sequence_ranges")
REBUILD_LOCK = 0x746F706F726562  # pg advisory lock key: one rebuild per database at a time
RebuildError = ReplayError  # a rebuild is a replay and a switch: one error


class _NotYet(Exception):
    """The switch could not take its locks in time, or too much is left to apply
    under them: roll back, catch up, try again."""


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
    query = sql.SQL(_NAMESPACE_DIFF).format(only=only, shadow=sql.Identifier(schema, "claims"))
    return dict(await fetch_all(conn, query, {"keys": keys} if keys is not None else None))


async def _pre_diff(conn: Conn, schema: str, state: State) -> _PreDiff:
    """The namespace diff, outside the locks: at millions of namespaces the full join
    takes seconds, which the live projector would otherwise wait for. Under the locks
    only the namespaces either side changed since are compared again."""
    await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    version = await live_version(conn)  # the live routes below are this version's
    namespaces = await _namespace_diff(conn, schema)
    await conn.commit()
    state.namespaces_touched = set()
    return _PreDiff(version, namespaces)


async def _cell_documents(conn: Conn, schema: str) -> dict[str, dict[str, Any]]:
    """Every cell's document in ``schema``'s tables, as routers see it (adr/0009, adr/0021)."""
    query = sql.SQL(CELL_DOCUMENTS_SQL).format(cells=sql.Identifier(schema, "cells"),
                                               ranges=sql.Identifier(schema, "sequence_ranges"), where=sql.SQL(""))
    async with conn.cursor() as cursor:
        await cursor.execute(query)
        names = [column.name for column in cursor.description or ()]
        return {row[0]: dict(zip(names, row, strict=True)) for row in await cursor.fetchall()}


async def _routing_diff(conn: Conn, schema: str, state: State, pre: _PreDiff | None,
                        version: int) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, str | None]]:
    """What routers must change to go from the live tables (at ``version``, locked) to
    the shadow's: cells (their documents upserted, deleted) and namespace routes (None:
    not routed). A cell's document holds its sequence ranges: compared whole."""
    live = await _cell_documents(conn, LIVE_SCHEMA)
    shadow = await _cell_documents(conn, schema)
    upserts = {cell_id: document for cell_id, document in shadow.items() if live.get(cell_id) != document}
    deleted = sorted(set(live) - set(shadow))
    covered = await fetch_one(conn, "SELECT count(*) FROM public.routing_versions WHERE version > %s AND version <= %s",
                              (pre.version if pre else 0, version))
    if pre is None or state.namespaces_touched is None or not covered or covered[0] != version - pre.version:
        return upserts, deleted, await _namespace_diff(conn, schema)  # the change log no longer tells
    # Every live route change since the pre-diff is in the change log (adr/0009); the
    # shadow's are what its chunks changed since. Other namespaces differ as they did.
    changed = {key for (key,) in await fetch_all(
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


async def _switch(settings: Settings, build: Build, retired: str, max_tail: int, lock_timeout_s: float,
                  tail_timeout_s: float, pre: _PreDiff | None) -> _Switched:
    # SQLAlchemy's AsyncConnection, because the change log is written by the projector's
    # own functions (projector.store, projector.changelog); everything else runs on its
    # psycopg connection, in the same transaction.
    schema, state, source = build.schema, build.state, build.source
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
                    [sql.Identifier(LIVE_SCHEMA, "topology_version")]
                    + [sql.Identifier(s, t) for s in (LIVE_SCHEMA, schema) for t in SWITCHED_TABLES])))
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
                raise _NotYet(f"could not lock the live tables within {lock_timeout_s:g}s "
                              f"({exc.__class__.__name__})") from None
            left = await source.remaining(conn, state.checkpoint, state.projection.seen)
            if left > max_tail:
                raise _NotYet(f"{left:,} events left to apply; more than --max-tail {max_tail:,}")
            version = await live_version(conn)
            # 3. The final tail, then: does the shadow cover exactly what the live tables do?
            deadline = time.monotonic() + tail_timeout_s
            while True:
                chunk = await source.read(conn, state.checkpoint, build.chunk_events)
                if chunk.size:
                    await build.write(conn, chunk, version)
                    continue
                problems = await source.uncovered(conn, state.checkpoint, state.projection.seen)
                if not problems:
                    break
                if not source.waits or time.monotonic() > deadline:
                    raise RebuildError("the shadow does not cover the live projection; nothing was switched: "
                                       + "; ".join(problems))
            # 4. One ordinary new version whose changes are the exact routing difference.
            upserts, deleted, namespaces = await _routing_diff(conn, schema, state, pre, version)
            row = await fetch_one(conn, "UPDATE public.topology_version SET version = version + 1, "
                                        "committed_at = now() WHERE id = 1 RETURNING version")
            assert row is not None
            version = int(row[0])
            await write_routing_changes(sa, version, cells=upserts, namespaces=namespaces)
            if deleted:  # cells are never deleted live, but a fixed bug may remove one
                await conn.execute("INSERT INTO public.routing_changes (version, kind, key, value) "
                                   "SELECT %s, 'cell', k, NULL FROM unnest(%s::text[]) k", (version, deleted))
            await prune_routing_changes(sa, version)  # records the version as complete (adr/0009)
            # The rows routers see changed carry the version that changed them.
            await conn.execute(sql.SQL("UPDATE {} SET version = %s WHERE cell_id = ANY(%s)").format(
                sql.Identifier(schema, "cells")), (version, list(upserts)))
            await conn.execute(sql.SQL("UPDATE {} SET version = %s WHERE bucket = 'NAMESPACE' AND value = ANY(%s)")
                               .format(sql.Identifier(schema, "claims")), (version, list(namespaces)))
            state.checkpoint.switched_version = version
            await save_checkpoint(conn, schema, state.checkpoint)
            # 5. The exchange. Old tables out first: index and constraint names are per schema.
            await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(retired)))
            await conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(sql.Identifier(retired), sql.Literal(
                f"projection tables retired by topology rebuild at version {version}, {datetime.now().isoformat()}")))
            for table in SWITCHED_TABLES:
                await conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                    sql.Identifier(LIVE_SCHEMA, table), sql.Identifier(retired)))
            for table in SWITCHED_TABLES:
                await conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                    sql.Identifier(schema, table), sql.Identifier(LIVE_SCHEMA)))
            await conn.execute("SELECT pg_notify(%s, %s)", (VERSION_CHANNEL, str(version)))
        locked = time.monotonic() - locked_at
        build.progress.note(f"switched at version {version} ({locked * 1000:,.0f} ms with the projector held): "
                      f"{len(upserts) + len(deleted)} cells and {len(namespaces)} namespace routes differed from the "
                      f"live tables; old tables in schema {retired}")
        return _Switched(version, len(upserts) + len(deleted), len(namespaces), round(locked, 3))
    finally:
        await engine.dispose()


# --- the command ---------------------------------------------------------------------------------


async def _check_live_revision(conn: Conn, revision: str) -> None:
    row = await fetch_one(conn, "SELECT version_num FROM public.alembic_version")
    if row is None or row[0] != revision:
        raise RebuildError(f"the live schema is at migration {row[0] if row else 'none'}, this code at {revision}: "
                           "run `topology migrate` first (the shadow's tables are built at the code's head)")


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
    check_name(schema, "--schema")
    check_name(retired_schema, "--retired-schema")
    if schema == retired_schema:
        raise RebuildError("--schema and --retired-schema must differ")
    if chunk_events < 1 or max_tail < 0 or switch_attempts < 1:
        raise RebuildError("--chunk-events and --switch-attempts must be positive, --max-tail not negative")
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(settings.libpq_url, autocommit=True) as guard:
        # Session-level: released when this process ends, however it ends.
        locked = await fetch_one(guard, "SELECT pg_try_advisory_lock(%s)", (REBUILD_LOCK,))
        if not locked or not locked[0]:
            raise RebuildError("another rebuild is running on this database")
        if switch:
            await _check_live_revision(guard, head_revision(settings))
            if await schema_exists(guard, retired_schema):
                raise RebuildError(f"schema {retired_schema} still holds the tables an earlier switch retired: "
                                   "inspect them, then `topology rebuild --drop-retired` (or --retired-schema NAME)")
        async with building(settings, schema, source, restart=restart, chunk_events=chunk_events, command="rebuild",
                            out=out) as build:
            result = RebuildResult(schema, source, build.resumed, build.at_start, 0, 0, 0, 0.0)
            await build.catch_up(max_tail if switch else None)
            if switch:
                await _switch_with_retries(settings, build, result, retired_schema, max_tail, lock_timeout_s,
                                           tail_timeout_s, switch_attempts)
        if result.switched_version is not None:
            # What is left of the shadow is empty scaffolding (its own archive, outbox, ...).
            await guard.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    checkpoint = build.state.checkpoint
    result.events_this_run = checkpoint.events_read - build.at_start
    result.events_total = checkpoint.events_read
    result.chunks = checkpoint.chunks
    result.seconds = round(time.monotonic() - started, 3)
    build.progress.note(f"done: {result.events_this_run:,} events this run, {result.events_total:,} in total, "
                        f"in {result.seconds:,.1f}s")
    return result


async def _switch_with_retries(settings: Settings, build: Build, result: RebuildResult, retired_schema: str,
                               max_tail: int, lock_timeout_s: float, tail_timeout_s: float, attempts: int) -> None:
    conn = build.conn
    # Bulk-loaded tables have no planner statistics yet: gather them before the live
    # projector and the read API start planning against them.
    await conn.execute(sql.SQL("ANALYZE {}").format(
        sql.SQL(", ").join(sql.Identifier(build.schema, t) for t in SWITCHED_TABLES)))
    await conn.commit()
    for attempt in range(1, attempts + 1):
        # The slow comparisons happen here, before the locks; under them only what
        # changed since is compared again.
        pre = await _pre_diff(conn, build.schema, build.state)
        await build.source.prepare_switch(conn, build.state.checkpoint, build.state.projection.seen)
        await conn.commit()
        try:
            switched = await _switch(settings, build, retired_schema, max_tail, lock_timeout_s, tail_timeout_s, pre)
        except _NotYet as exc:
            build.progress.note(f"switch attempt {attempt} of {attempts} deferred: {exc}")
            if attempt == attempts:
                raise RebuildError(f"could not switch after {attempts} attempts: {exc}; "
                                   "the shadow is kept, run again to resume") from None
            await build.catch_up(max_tail)
            continue
        result.switched_version = switched.version
        result.retired_schema = retired_schema
        result.routing_changes = {"cells": switched.cells, "namespaces": switched.namespaces}
        result.switch_locked_seconds = switched.locked_seconds
        return


def rebuild(settings: Settings, **options: Any) -> RebuildResult:
    """:func:`rebuild_async` on an event loop of its own (the CLI, tests in a thread)."""
    return run_sync(rebuild_async(settings, **options))


def drop_retired(settings: Settings, retired_schema: str = RETIRED_SCHEMA) -> bool:
    """Drop what an earlier switch retired; False when there is nothing to drop."""
    check_name(retired_schema, "--retired-schema")
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (retired_schema,)).fetchone() is None:
            return False
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(retired_schema)))
        return True


def result_json(result: RebuildResult) -> str:
    return json.dumps(asdict(result))
