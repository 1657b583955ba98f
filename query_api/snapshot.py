"""Consistent snapshots of the routing tables, kept fresh by LISTEN/NOTIFY and the
change log (adr/0009).

The projector NOTIFYs ``topology_version`` in the transaction that bumps the
version; PostgreSQL delivers it on commit. One listening connection per API
process wakes the refresh; a slow poll covers notifications missed while the
listening connection was down (and refreshes the freshness heartbeat).

A refresh reads, in one REPEATABLE READ transaction, the new version and the net
routing changes since the version held (``routing_changes``), and derives the new
snapshot from the old one: O(changes), not O(table). Only the first load, or a
gap the change log no longer covers, reads the whole tables. Each snapshot is
immutable (the namespace table is a shared base plus a per-version overlay), so a
request that took one snapshot answers from that version only, and the delta
from the previous version is handed to the delta cache for the long-polling
routers that wake up on it. Deltas to other versions are computed from the change
log on request, once per pair of versions (:class:`DeltaCache`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgpack
import orjson
import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from topology_store.query_api.documents import CellView
from topology_store.query_api.encodings import Compression, Observer, Representations
from topology_store.query_api.metrics import ApiMetrics
from topology_store.runtime.database import VERSION_CHANNEL
from topology_store.runtime.retry import backoff
from topology_store.schemas.router_sync import (
    CELLS_QUERY,
    JSON,
    MSGPACK,
    digest_after,
    namespace_digest,
    representation_etag,
)

log = logging.getLogger(__name__)

# Only committed NAMESPACE claims route (a leased claim does not, yet). Byte order ("C")
# is code point order for UTF-8, Python's string order: the table comes back sorted.
NAMESPACES_QUERY = (
    "SELECT value, cell_id FROM claims WHERE bucket = 'NAMESPACE' AND status = 'COMMITTED' "
    'ORDER BY value COLLATE "C"'
)
HEAD_QUERY = text(
    "SELECT v.version, v.committed_at, greatest(v.committed_at, (SELECT max(updated_at) FROM partition_offsets)) "
    "AS last_commit_at FROM topology_version v WHERE v.id = 1"
)
COVERAGE_QUERY = text(
    "SELECT count(*) FROM routing_versions WHERE version > :since AND version <= :target"
)
CHANGES_QUERY = text(
    "SELECT DISTINCT ON (kind, key) kind, key, value FROM routing_changes "
    "WHERE version > :since AND version <= :target ORDER BY kind, key, version DESC"
)
# The first statement of a refresh. LOCK takes no snapshot, so when a rebuild is
# exchanging the projection tables (projector/rebuild.py, adr/0013) the refresh waits
# for it here and its REPEATABLE READ snapshot is taken after the switch committed:
# never a pre-switch snapshot reading the tables moved in by the switch.
SWITCH_BARRIER = text("LOCK TABLE topology_version IN ACCESS SHARE MODE")
FLOOR_QUERY = text(
    "SELECT coalesce((SELECT min(version) - 1 FROM routing_versions), "
    "(SELECT version FROM topology_version WHERE id = 1))"
)


def _epoch(moment: datetime) -> float:
    return moment.timestamp()


def sorted_by_key(table: dict[str, str]) -> dict[str, str]:
    """``table`` with its keys in code point order (itself when they already are: a
    sorted list sorts in one pass, and the common case, a sorted base with a few keys
    appended, in little more)."""
    keys = sorted(table)
    if keys == list(table):
        return table
    return dict(zip(keys, map(table.__getitem__, keys), strict=True))


def sorted_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's fields in name order: the change log's JSONB and a table row name them
    in different orders."""
    return {name: row[name] for name in sorted(row)}


@dataclass(frozen=True, slots=True)
class NamespaceTable:
    """namespace path -> cell id at one version: ``base`` (shared between
    versions, never changed) overlaid by ``overlay`` (this version's changes since
    the base; ``None`` means deleted).

    The base's first ``in_order`` keys are in code point order; the rest (paths added
    since the base was last sorted, at most a quarter) follow in arrival order. That
    keeps the fold of an overlay into a new base a dict copy: building a million-key
    dict in sorted order costs seconds, on the event loop. The serializers put the few
    out-of-order paths in place (:meth:`columns`)."""

    base: dict[str, str]
    overlay: dict[str, str | None]
    count: int
    digest: int
    in_order: int = -1  # -1: the whole base

    @classmethod
    def full(cls, namespaces: dict[str, str]) -> NamespaceTable:
        return cls(sorted_by_key(namespaces), {}, len(namespaces), namespace_digest(namespaces))

    @property
    def sorted_keys(self) -> int:
        return len(self.base) if self.in_order < 0 else self.in_order

    def get(self, path: str, default: str | None = None) -> str | None:
        if path in self.overlay:
            value = self.overlay[path]
            return default if value is None else value
        return self.base.get(path, default)

    def merged(self) -> tuple[dict[str, str], bool]:
        """(the whole table as one dict, whether its keys are in code point order). A
        copy of the base keeps the base's order through updates and deletions; only
        added paths land at the end."""
        ordered = self.sorted_keys == len(self.base)
        if not self.overlay:
            return self.base, ordered
        merged = dict(self.base)
        for path, cell_id in self.overlay.items():
            if cell_id is None:
                merged.pop(path, None)
            else:
                ordered = ordered and path in merged
                merged[path] = cell_id
        return merged, ordered

    def materialize(self) -> dict[str, str]:
        return self.merged()[0]

    def columns(self) -> tuple[list[str], list[str]]:
        """(paths, cell ids) in code point order of the paths: the base's sorted part,
        with the rest of the base and the overlay's edits spliced in at their places
        (found by bisection): nothing but those is sorted."""
        paths, cells = list(self.base), list(self.base.values())
        split = self.sorted_keys
        if split == len(paths) and not self.overlay:
            return paths, cells
        edits: dict[str, str | None] = dict(zip(paths[split:], cells[split:], strict=True))
        edits.update(self.overlay)
        del paths[split:], cells[split:]
        out_paths: list[str] = []
        out_cells: list[str] = []
        start = 0
        for path in sorted(edits):
            cell_id = edits[path]
            at = bisect_left(paths, path, start)
            out_paths += paths[start:at]
            out_cells += cells[start:at]
            start = at
            if at < len(paths) and paths[at] == path:
                start = at + 1  # replaced or deleted
            if cell_id is not None:
                out_paths.append(path)
                out_cells.append(cell_id)
        out_paths += paths[start:]
        out_cells += cells[start:]
        return out_paths, out_cells

    def apply(self, upserts: Mapping[str, str], deletions: list[str]) -> NamespaceTable:
        digest, count = digest_after(self, self.digest, self.count, upserts, deletions)
        overlay = dict(self.overlay)
        for path in deletions:
            overlay[path] = None
        overlay.update(upserts)
        if len(overlay) <= max(50_000, len(self.base) // 16):
            return NamespaceTable(self.base, overlay, count, digest, self.in_order)
        # Fold the overlay into a new base now and then, so lookups and serialization
        # stay one dict away: a copy, the sorted part shorter by the paths deleted from it.
        table = NamespaceTable(self.base, overlay, count, digest, self.in_order)
        base, _ = table.merged()
        unsorted = set(list(self.base)[self.sorted_keys:])
        removed = sum(1 for path, cell_id in overlay.items()
                      if cell_id is None and path in self.base and path not in unsorted)
        in_order = self.sorted_keys - removed
        if len(base) - in_order > len(base) // 4:
            # Rarely (a quarter of the table added since the last sort): sort it all again.
            paths, cells = table.columns()
            return NamespaceTable(dict(zip(paths, cells, strict=True)), {}, count, digest)
        return NamespaceTable(base, {}, count, digest, in_order)


class Snapshot:
    """The routing tables at one version. Immutable; serialized lazily, once per
    format and content coding."""

    __slots__ = (
        "build_seconds", "cells", "cells_by_id", "committed_at", "committed_ts", "confirmed_ts", "namespaces",
        "representations", "version",
    )

    def __init__(
        self,
        version: int,
        committed_at: datetime,
        cells: list[dict[str, Any]],
        namespaces: NamespaceTable,
        build_seconds: float,
        compression: Compression,
        observe: Observer | None = None,
    ) -> None:
        self.version = version
        self.committed_at = committed_at
        self.committed_ts = _epoch(committed_at)
        # The projector's latest commit seen while this was the stored version
        # (freshness metadata, not data: a refresh that finds no newer version moves it).
        self.confirmed_ts = self.committed_ts
        self.cells = sorted(map(sorted_fields, cells), key=lambda c: c["cell_id"])
        self.cells_by_id = {c["cell_id"]: c for c in self.cells}
        self.namespaces = namespaces
        self.build_seconds = build_seconds
        self.representations = Representations("snapshot", self._serialize, compression, observe)

    @property
    def namespace_count(self) -> int:
        return self.namespaces.count

    def etag(self, fmt: str, encoding: str) -> str:
        """The entity tag of this version's full snapshot in ``fmt`` and ``encoding``."""
        return representation_etag(self.version, fmt, encoding)

    @property
    def cell_views(self) -> list[CellView]:
        return [CellView.model_validate(c) for c in self.cells]

    def age_seconds(self, now: datetime | None = None) -> float:
        """How long since the projector last committed, as far as this process
        knows: this version's commit, or a later batch that found nothing to change."""
        now_ts = now.timestamp() if now is not None else time.time()
        return max(0.0, now_ts - max(self.committed_ts, self.confirmed_ts))

    def _head(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "committed_at": self.committed_at.isoformat(),
            "namespace_count": self.namespaces.count,
            "namespace_digest": self.namespaces.digest,
            "cells": self.cells,
        }

    def _serialize(self, fmt: str) -> bytes:
        # Namespaces in code point order however this version was built (full load or
        # deltas): the same version is the same bytes (schemas/router_sync.py).
        if fmt == JSON:
            namespaces, ordered = self.namespaces.merged()
            head = orjson.dumps(self._head())
            body = orjson.dumps(namespaces, option=0 if ordered else orjson.OPT_SORT_KEYS)
            return head[:-1] + b',"namespaces":' + body + b"}"
        if fmt == MSGPACK:
            paths, owners = self.namespaces.columns()
            cell_ids = sorted(set(owners))
            index = {cell_id: n for n, cell_id in enumerate(cell_ids)}
            document = self._head()
            document["cell_ids"] = cell_ids
            document["namespace_paths"] = paths
            document["namespace_cells"] = list(map(index.__getitem__, owners))
            return msgpack.packb(document)  # type: ignore[no-any-return]
        raise ValueError(f"unknown format {fmt!r}")


@dataclass(frozen=True, slots=True)
class Changes:
    """Net routing changes between two versions, from the change log, in the one
    serialization order (cells by id with their fields by name, namespaces by path,
    deletions sorted)."""

    cells: list[dict[str, Any]]
    deleted_cells: list[str]
    namespaces: dict[str, str]
    deleted_namespaces: list[str]

    @property
    def size(self) -> int:
        return len(self.cells) + len(self.deleted_cells) + len(self.namespaces) + len(self.deleted_namespaces)


class Delta:
    """What changed from ``since`` to ``version`` (net: one final state per key)."""

    __slots__ = ("changes", "committed_at", "committed_ts", "namespace_count", "namespace_digest",
                 "representations", "since", "version")

    def __init__(self, since: int, target: Snapshot, changes: Changes, compression: Compression,
                 observe: Observer | None = None) -> None:
        self.since = since
        self.version = target.version
        self.committed_at = target.committed_at
        self.committed_ts = target.committed_ts
        self.namespace_count = target.namespaces.count
        self.namespace_digest = target.namespaces.digest
        self.changes = changes
        self.representations = Representations("delta", self._serialize, compression, observe)

    def etag(self, fmt: str, encoding: str) -> str:
        """Never the full snapshot's tag: a delta is another representation."""
        return representation_etag(self.version, fmt, encoding, self.since)

    def document(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "version": self.version,
            "committed_at": self.committed_at.isoformat(),
            "namespace_count": self.namespace_count,
            "namespace_digest": self.namespace_digest,
            "cells": self.changes.cells,
            "deleted_cells": self.changes.deleted_cells,
            "namespaces": self.changes.namespaces,
            "deleted_namespaces": self.changes.deleted_namespaces,
        }

    def _serialize(self, fmt: str) -> bytes:
        if fmt == JSON:
            return orjson.dumps(self.document())
        if fmt == MSGPACK:
            return msgpack.packb(self.document())  # type: ignore[no-any-return]
        raise ValueError(f"unknown format {fmt!r}")


async def read_changes(conn: AsyncConnection, since: int, target: int) -> Changes | None:
    """The net changes in ``(since, target]``; None when the change log does not
    hold every one of those versions (pruned, or never recorded)."""
    covered = int((await conn.execute(COVERAGE_QUERY, {"since": since, "target": target})).scalar_one())
    if covered != target - since:
        return None
    cells: list[dict[str, Any]] = []
    deleted_cells: list[str] = []
    namespaces: dict[str, str] = {}
    deleted_namespaces: list[str] = []
    for kind, key, value in await conn.execute(CHANGES_QUERY, {"since": since, "target": target}):
        if kind == "namespace":
            if value is None:
                deleted_namespaces.append(key)
            else:
                namespaces[key] = value["cell_id"]
        elif kind == "cell":
            if value is None:
                deleted_cells.append(key)
            else:
                cells.append(sorted_fields(value))
    # The change log comes back in the database's collation; sort in Python's (code point) order.
    cells.sort(key=lambda c: c["cell_id"])
    return Changes(cells, sorted(deleted_cells), sorted_by_key(namespaces), sorted(deleted_namespaces))


async def read_floor(conn: AsyncConnection) -> int:
    """The oldest ``since`` a delta can start from."""
    return int((await conn.execute(FLOOR_QUERY)).scalar_one())


async def read_only_connection(engine: AsyncEngine) -> AsyncConnection:
    conn = await engine.connect()
    return await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)


@dataclass
class _Waiters:
    """One event per version: setting it wakes every request waiting for a newer one."""

    event: asyncio.Event = field(default_factory=asyncio.Event)


class SnapshotCache:
    """Holds the newest snapshot; ``run`` keeps it fresh until cancelled."""

    def __init__(
        self,
        engine: AsyncEngine,
        libpq_url: str,
        poll_interval_s: float,
        on_loaded: Callable[[Snapshot], None] | None = None,
        compression: Compression | None = None,
        observe: Observer | None = None,
        on_delta: Callable[[Delta], None] | None = None,
    ) -> None:
        self._engine = engine
        self._on_loaded = on_loaded
        self._on_delta = on_delta
        self._libpq_url = libpq_url
        self._poll_interval_s = poll_interval_s
        self._compression = compression or Compression()
        self._observe = observe
        self._refresh_lock = asyncio.Lock()
        self._waiters = _Waiters()
        self._closing = False
        self.current: Snapshot | None = None
        self.last_refresh_error: str | None = None
        self.refreshes = 0
        self.full_loads = 0

    @property
    def compression(self) -> Compression:
        return self._compression

    async def refresh(self) -> Snapshot | None:
        """Move to the stored version if it is past the one held."""
        async with self._refresh_lock:
            self.refreshes += 1
            started = time.perf_counter()
            previous = self.current
            delta: Delta | None = None
            conn = await read_only_connection(self._engine)
            try:
                async with conn.begin():
                    await conn.execute(SWITCH_BARRIER)
                    head = (await conn.execute(HEAD_QUERY)).one()
                    if previous is not None and head.version <= previous.version:
                        if head.version == previous.version:
                            previous.confirmed_ts = max(previous.confirmed_ts, _epoch(head.last_commit_at))
                        return previous
                    changes = None
                    if previous is not None:
                        changes = await read_changes(conn, previous.version, head.version)
                    if changes is not None and previous is not None:
                        snapshot = Snapshot(
                            head.version,
                            head.committed_at,
                            _merge_cells(previous.cells_by_id, changes),
                            previous.namespaces.apply(changes.namespaces, changes.deleted_namespaces),
                            0.0,
                            self._compression,
                            self._observe,
                        )
                        delta = Delta(previous.version, snapshot, changes, self._compression, self._observe)
                    else:
                        snapshot = await self._load_full(conn, head.version, head.committed_at)
                        self.full_loads += 1
            finally:
                await conn.close()
            snapshot.build_seconds = time.perf_counter() - started
            self.current = snapshot
            snapshot.confirmed_ts = max(snapshot.committed_ts, _epoch(head.last_commit_at))
            if delta is not None and self._on_delta is not None:
                self._on_delta(delta)
            if self._on_loaded is not None:
                self._on_loaded(snapshot)
            log.info(
                "snapshot version %d (%s, %d namespaces) in %.3fs",
                snapshot.version,
                f"delta of {delta.changes.size} from {delta.since}" if delta is not None else "full load",
                snapshot.namespace_count,
                snapshot.build_seconds,
            )
        self._wake()
        return snapshot

    async def _load_full(self, conn: AsyncConnection, version: int, committed_at: datetime) -> Snapshot:
        cells = [dict(row._mapping) for row in await conn.execute(text(CELLS_QUERY))]
        # A million rows: the driver's cursor directly, without SQLAlchemy's row objects.
        raw = await conn.get_raw_connection()
        driver: psycopg.AsyncConnection[Any] = raw.driver_connection  # type: ignore[assignment]
        async with driver.cursor() as cursor:
            await cursor.execute(NAMESPACES_QUERY)
            namespaces = dict(await cursor.fetchall())
        return Snapshot(version, committed_at, cells, NamespaceTable.full(namespaces), 0.0, self._compression,
                        self._observe)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, _Waiters()
        waiters.event.set()

    def close(self) -> None:
        """Release every waiting request now (the process is shutting down)."""
        self._closing = True
        self._wake()

    async def wait_newer(self, version: int, timeout_s: float) -> Snapshot | None:
        """The current snapshot once it is newer than ``version``, or whatever is
        current when ``timeout_s`` runs out. No database access: the refresh
        (woken by NOTIFY) sets one event that releases every waiter at once."""
        deadline = time.monotonic() + timeout_s
        while True:
            current = self.current
            if (current is not None and current.version > version) or self._closing:
                return current
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return current
            event = self._waiters.event
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                return self.current

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._listen_and_refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving the old snapshot whatever failed
                attempt += 1
                self.last_refresh_error = f"{exc.__class__.__name__}: {exc}"
                delay = backoff(attempt)
                log.warning("snapshot refresh failed (%s); retrying in %.1fs", self.last_refresh_error, delay)
                await asyncio.sleep(delay)
            else:
                attempt = 0

    async def _listen_and_refresh(self) -> None:
        async with await psycopg.AsyncConnection.connect(self._libpq_url, autocommit=True) as conn:
            await conn.execute(f"LISTEN {VERSION_CHANNEL}")
            # Refresh after LISTEN is in place, so no commit can fall between the two.
            await self.refresh()
            self.last_refresh_error = None
            while True:
                async for _ in conn.notifies(timeout=self._poll_interval_s, stop_after=1):
                    pass  # one wake-up is enough: refresh reads the newest version
                await self.refresh()


def _merge_cells(cells_by_id: Mapping[str, dict[str, Any]], changes: Changes) -> list[dict[str, Any]]:
    merged = dict(cells_by_id)
    for cell_id in changes.deleted_cells:
        merged.pop(cell_id, None)
    for cell in changes.cells:
        merged[cell["cell_id"]] = cell
    return list(merged.values())



class DeltaCache:
    """Deltas by (since, version): computed once from the change log (concurrent
    requests for the same pair share one query), kept in a small LRU. The
    refresh hands in the delta from the previous version, which is the one every
    up-to-date long-polling router asks for next."""

    def __init__(self, engine: AsyncEngine, compression: Compression, observe: Observer | None,
                 max_entries: int = 256, metrics: ApiMetrics | None = None) -> None:
        self._engine = engine
        self._compression = compression
        self._observe = observe
        self._max_entries = max_entries
        self._metrics = metrics
        self._entries: OrderedDict[tuple[int, int], Delta] = OrderedDict()
        self._pending: dict[tuple[int, int], asyncio.Task[Delta | None]] = {}

    def put(self, delta: Delta) -> None:
        self._entries[(delta.since, delta.version)] = delta
        self._entries.move_to_end((delta.since, delta.version))
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def get(self, since: int, target: Snapshot) -> Delta | None:
        """The delta from ``since`` to ``target``; None when the change log no longer covers it."""
        key = (since, target.version)
        delta = self._entries.get(key)
        if delta is not None:
            self._entries.move_to_end(key)
            if self._metrics is not None:
                self._metrics.deltas.labels("cached").inc()
            return delta
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._compute(since, target))
            self._pending[key] = task
        return await asyncio.shield(task)

    async def _compute(self, since: int, target: Snapshot) -> Delta | None:
        key = (since, target.version)
        try:
            conn = await read_only_connection(self._engine)
            try:
                async with conn.begin():
                    changes = await read_changes(conn, since, target.version)
            finally:
                await conn.close()
            if changes is None:
                if self._metrics is not None:
                    self._metrics.deltas.labels("gone").inc()
                return None
            delta = Delta(since, target, changes, self._compression, self._observe)
            self.put(delta)
            if self._metrics is not None:
                self._metrics.deltas.labels("computed").inc()
            return delta
        finally:
            self._pending.pop(key, None)

    async def floor(self) -> int:
        conn = await read_only_connection(self._engine)
        try:
            async with conn.begin():
                return await read_floor(conn)
        finally:
            await conn.close()
