"""Retention: remove what is past its period, in bounded batches, beside live projectors (adr/0020).

``topology compact`` (cli/compact.py) and, every ``TOPOLOGY_COMPACT_INTERVAL_S``, one
projector (projector/main.py) run :func:`compact`. What goes, and nothing else:

- ``processed_events``: lease expiry ticks that decided nothing, older than the
  idempotency window. Every other row is a decision an answer, ``audit history`` or a
  replay cut reads, and stays;
- ``leases``: committed or released leases whose expiry is older than their retention;
- ``dead_letters``: re-driven (resolved) ones older than their retention; a discarded
  one is kept (it is why an archive replay skips that record);
- with ``--outbox``, a producer's outbox (the relay's source): published rows older than
  their retention. The projection's own outbox is the decision record and is refused.

The archive, the audit index, sequence ranges and the decision outbox are kept forever.

Each table is walked by ranges of heap blocks (a TID range scan, PostgreSQL 14+), one
short transaction per range: no batch locks more than the rows it deletes, and none
takes the claim registry lock. One compaction runs at a time per database (a session
advisory lock); the cutoffs are read once from the database clock at the start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

import psycopg
from psycopg import errors, sql

from topology_store.projector.metrics import ProjectorMetrics
from topology_store.projector.tables import LEASE_ENDED_AT_SQL
from topology_store.runtime.settings import Settings

log = logging.getLogger(__name__)

COMPACTION_LOCK = 0x746F706F636D70  # pg advisory lock key: one compaction per database
DEFAULT_BATCH_BLOCKS = 1000  # heap blocks (8 KiB each) per delete transaction
LOCK_TIMEOUT = "2s"  # a batch waiting longer (a rebuild's switch) gives way and is tried again
LOCK_RETRIES = 30

# The projection's tables whose sizes the projector reports (topology_database_table_*).
PROJECTION_TABLES = (
    "cells", "claims", "leases", "sequence_ranges", "topology_outbox", "partition_offsets", "topology_version",
    "routing_changes", "routing_versions", "processed_events", "dead_letters", "event_archive", "event_keys",
)

Conn = psycopg.Connection[Any]


class CompactionError(RuntimeError):
    """The compaction cannot run; the message says why and what to do."""


class CompactionBusy(CompactionError):
    """Another compaction holds the lock on this database."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One kind of row that may go: ``predicate`` is SQL over the table's rows with a
    ``{cutoff}`` placeholder, true for the rows older than the retention ``keep_s``."""

    table: str
    what: str
    predicate: str
    keep_s: float
    setting: str


@dataclass(frozen=True, slots=True)
class Outcome:
    table: str
    what: str
    older_than_s: float
    cutoff: datetime
    rows: int  # deleted, or that would be (dry run)
    dry_run: bool
    complete: bool  # False: stopped before the end of the table

    def document(self) -> dict[str, object]:
        return {"table": self.table, "what": self.what, "older_than_s": self.older_than_s,
                "cutoff": self.cutoff.isoformat(), "would_delete" if self.dry_run else "deleted": self.rows,
                "complete": self.complete}


def projection_rules(settings: Settings) -> list[Rule]:
    """What may go from the projection database; a retention of 0 keeps that kind."""
    rules = [Rule("processed_events", "lease expiry ticks that decided nothing",
                  "event_type = 'LeaseExpiryTick' AND detail IS NULL AND processed_at < {cutoff}",
                  settings.idempotency_window_s, "TOPOLOGY_IDEMPOTENCY_WINDOW_S")]
    if settings.retain_ended_leases_s > 0:
        rules.append(Rule("leases", "committed or released leases, by expiry (by grant without one)",
                          f"status <> 'OPEN' AND {LEASE_ENDED_AT_SQL} < {{cutoff}}", settings.retain_ended_leases_s,
                          "TOPOLOGY_RETAIN_ENDED_LEASES_S"))
    if settings.retain_resolved_dead_letters_s > 0:
        rules.append(Rule("dead_letters", "re-driven (resolved) dead letters",
                          "status = 'resolved' AND resolved_at < {cutoff}", settings.retain_resolved_dead_letters_s,
                          "TOPOLOGY_RETAIN_RESOLVED_DEAD_LETTERS_S"))
    return rules


def outbox_rules(settings: Settings) -> list[Rule]:
    """What may go from a producer's outbox database (the relay's source)."""
    if settings.retain_published_outbox_s <= 0:
        return []
    return [Rule("topology_outbox", "published outbox rows",
                 "published_at IS NOT NULL AND published_at < {cutoff}", settings.retain_published_outbox_s,
                 "TOPOLOGY_RETAIN_PUBLISHED_OUTBOX_S")]


def _is_projection(conn: Conn) -> bool:
    row = conn.execute("SELECT to_regclass('event_archive') IS NOT NULL").fetchone()
    return bool(row and row[0])


def compact(
    url: str,
    rules: list[Rule],
    *,
    outbox: bool = False,
    dry_run: bool = False,
    batch_blocks: int = DEFAULT_BATCH_BLOCKS,
    progress: Callable[[str], None] | None = None,
    stopping: Callable[[], bool] = lambda: False,
    progress_every_s: float = 1.0,
) -> list[Outcome]:
    """Apply ``rules`` to the database at ``url``; one :class:`Outcome` per rule.
    ``outbox``: the database is a producer's (refused if it is a projection database).
    ``stopping``: asked between batches; a stopped table is reported incomplete."""
    if batch_blocks < 1:
        raise CompactionError("the batch size is at least one block")
    say = progress or (lambda _line: None)
    with psycopg.connect(url, autocommit=True) as conn:
        is_projection = _is_projection(conn)
        if outbox and is_projection:
            raise CompactionError(
                "this is the projection database: its topology_outbox holds the claim decisions, which the "
                "archive replay reads (adr/0020); --outbox compacts a producer's outbox (the relay's --source)")
        if not outbox and not is_projection:
            raise CompactionError("no projection tables here (event_archive is missing): run `topology migrate`, "
                                  "or give --outbox for a producer's outbox database")
        if not dry_run:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (COMPACTION_LOCK,)).fetchone()
            if not (row and row[0]):
                raise CompactionBusy("another compaction (`topology compact` or a projector's scheduled one) "
                                     "is running on this database")
        try:
            conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
            # One clock for every rule, read once: a long run does not move its own cutoffs.
            now_row = conn.execute("SELECT now()").fetchone()
            assert now_row is not None
            outcomes = []
            for rule in rules:
                cutoff = _cutoff(conn, now_row[0], rule.keep_s)
                outcomes.append(_apply(conn, rule, cutoff, dry_run, batch_blocks, say, stopping, progress_every_s))
            return outcomes
        finally:
            if not dry_run:
                conn.execute("SELECT pg_advisory_unlock(%s)", (COMPACTION_LOCK,))


def _cutoff(conn: Conn, now: datetime, keep_s: float) -> datetime:
    row = conn.execute("SELECT %s::timestamptz - %s * interval '1 second'", (now, keep_s)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def _apply(conn: Conn, rule: Rule, cutoff: datetime, dry_run: bool, batch_blocks: int,
           say: Callable[[str], None], stopping: Callable[[], bool], progress_every_s: float) -> Outcome:
    table = sql.Identifier(rule.table)
    predicate = sql.SQL(rule.predicate.replace("{cutoff}", "%(cutoff)s"))
    label = f"{rule.table}: {rule.what} older than {_duration(rule.keep_s)} ({rule.setting})"
    if dry_run:
        # Read only: one scan, no row locked.
        row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(table, predicate),
                           {"cutoff": cutoff}).fetchone()
        rows = int(row[0]) if row else 0
        say(f"{label}: {rows} rows would go (dry run)")
        return Outcome(rule.table, rule.what, rule.keep_s, cutoff, rows, True, True)
    size = conn.execute("SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::bigint",
                        (rule.table,)).fetchone()
    blocks = int(size[0]) if size else 0
    delete = sql.SQL("DELETE FROM {} WHERE ctid >= %(low)s::tid AND ctid < %(high)s::tid AND ({})").format(
        table, predicate)
    deleted, start, said_at = 0, 0, time.monotonic()
    say(f"{label}: {blocks} blocks to read")
    while start < blocks:
        if stopping():
            say(f"{label}: stopped at block {start} of {blocks}, {deleted} rows deleted")
            return Outcome(rule.table, rule.what, rule.keep_s, cutoff, deleted, False, False)
        params = {"low": f"({start},0)", "high": f"({start + batch_blocks},0)", "cutoff": cutoff}
        deleted += _delete_batch(conn, delete, params, say, label)
        start += batch_blocks
        if time.monotonic() - said_at >= progress_every_s:
            said_at = time.monotonic()
            say(f"{label}: block {min(start, blocks)} of {blocks}, {deleted} rows deleted so far")
    say(f"{label}: {deleted} rows deleted")
    return Outcome(rule.table, rule.what, rule.keep_s, cutoff, deleted, False, True)


def _delete_batch(conn: Conn, delete: sql.Composed, params: dict[str, object], say: Callable[[str], None],
                  label: str) -> int:
    """One range of blocks in its own transaction (autocommit); a lock held by someone
    else (a rebuild switching tables) makes it wait its turn, never hold anyone up."""
    for attempt in range(1, LOCK_RETRIES + 1):
        try:
            return conn.execute(delete, params).rowcount
        except errors.LockNotAvailable:
            say(f"{label}: a lock is held elsewhere; trying again ({attempt}/{LOCK_RETRIES})")
            time.sleep(min(1.0, 0.1 * attempt))
    raise CompactionError(f"{label}: could not take a row lock in {LOCK_RETRIES} tries of {LOCK_TIMEOUT}")


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def table_sizes(conn: Conn, tables: tuple[str, ...] = PROJECTION_TABLES) -> dict[str, tuple[float, int]]:
    """Per table: PostgreSQL's row estimate (``pg_class.reltuples``, kept by ANALYZE and
    autovacuum; -1 before the first) and its total size in bytes (heap, indexes, TOAST).
    Cheap: catalog reads only, never a count."""
    rows = conn.execute(
        "SELECT c.relname, c.reltuples, pg_total_relation_size(c.oid) FROM pg_class c "
        "WHERE c.oid = ANY(SELECT to_regclass(t) FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NOT NULL)",
        (list(tables),),
    ).fetchall()
    return {name: (max(float(estimate), 0.0), int(size)) for name, estimate, size in rows}


def describe(outcomes: list[Outcome]) -> str:
    """One line for a log: what went, per table."""
    verb = "would delete" if outcomes and outcomes[0].dry_run else "deleted"
    return ", ".join(f"{o.table} {verb} {o.rows}" for o in outcomes) or "nothing to compact"


def print_outcomes(outcomes: list[Outcome], out: TextIO) -> None:
    import json

    out.writelines(json.dumps(outcome.document()) + "\n" for outcome in outcomes)


# --- in the projector ----------------------------------------------------------------------------

TABLE_SIZES_INTERVAL_S = 60.0  # catalog reads; table sizes change slowly


async def compact_periodically(settings: Settings, metrics: ProjectorMetrics, stop: asyncio.Event) -> None:
    """Every ``TOPOLOGY_COMPACT_INTERVAL_S``: the projection's compaction, by whichever
    member takes the lock first (the others skip that round). A failure is logged and
    tried again next round; the run stops between batches when the projector stops."""
    while not await _stopped_within(stop, settings.compact_interval_s):
        try:
            outcomes = await asyncio.to_thread(compact, settings.libpq_url, projection_rules(settings),
                                               stopping=stop.is_set, progress=log.debug, progress_every_s=60.0)
        except CompactionBusy:
            log.debug("compaction skipped: another member is compacting")
            continue
        except Exception as exc:  # noqa: BLE001 - the projection goes on; the alert watches the last success
            log.warning("compaction failed (%s: %s); next try in %.0fs", type(exc).__name__, exc,
                        settings.compact_interval_s)
            continue
        for outcome in outcomes:
            metrics.compacted_rows.labels(outcome.table).inc(outcome.rows)
        if all(o.complete for o in outcomes):
            metrics.compaction_last_success.set(time.time())
        log.info("compaction: %s", describe(outcomes))


async def report_table_sizes(settings: Settings, metrics: ProjectorMetrics, stop: asyncio.Event,
                             interval_s: float = TABLE_SIZES_INTERVAL_S) -> None:
    """Keep ``topology_database_table_rows`` and ``_bytes`` current (a scrape never waits on the database)."""

    def read() -> dict[str, tuple[float, int]]:
        with psycopg.connect(settings.libpq_url, autocommit=True, connect_timeout=5) as conn:
            return table_sizes(conn)

    while True:
        try:
            for table, (rows, size) in (await asyncio.to_thread(read)).items():
                metrics.table_rows.labels(table).set(rows)
                metrics.table_bytes.labels(table).set(size)
        except Exception as exc:  # noqa: BLE001 - sizes are informative; /readyz reports the database
            log.debug("table sizes not read (%s)", type(exc).__name__)
        if await _stopped_within(stop, interval_s):
            return


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except TimeoutError:
        return False
