"""The router client: an edge router's copy of the routing tables, kept in sync
with the read API (adr/0009).

- Holds the whole table in memory and answers :meth:`RouterClient.classify`
  locally, without a network call.
- Syncs by long-poll + deltas (``GET /v1/snapshot?since=V&wait=30s``); falls back
  to a full snapshot on 410, or whenever a delta does not check out (wrong
  ``since``, or the table it yields has another namespace count or digest than
  the server's), and never moves to an older version than the one it holds (a
  full snapshot is asked for with ``min_version``).
- Writes a last-known-good copy to disk atomically (temporary file, fsync,
  rename, fsync of the directory) and starts from it, so a restart while the
  API is unreachable still routes.
- Rotates over several API base URLs, as a load balancer would.
- Reports its version, the server's, the lag between the two, the data's age and
  how long since the API last answered as Prometheus metrics; its readiness turns
  ``stale`` when the API has been silent longer than a bound (:meth:`RouterClient.readiness`):
  a frozen API, or one that accepts connections and never answers, cannot hide behind
  a lag of 0 versions.
- Reads no entity tag: it syncs by version (``since``, ``min_version``,
  ``X-Topology-Version``), so the representation tags of the read API (``"7-json"``,
  ``W/"7-msgpack+zstd"``) changed nothing here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgpack
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

from topology_store.schemas.router_sync import (
    AGE_HEADER,
    MSGPACK,
    VERSION_HEADER,
    classify_in,
    decode_msgpack_snapshot,
    digest_after,
    namespace_digest,
)

log = logging.getLogger(__name__)


class Inconsistent(ValueError):
    """A document does not fit the table it should apply to, or does not check out."""


class ApiUnavailable(RuntimeError):
    """No usable answer from the API (network error, 5xx, unexpected status)."""


class NotAuthorized(RuntimeError):
    """401/403: the token is wrong or lacks snapshot:read."""


@dataclass
class RoutingTable:
    version: int
    committed_at: str
    cells: dict[str, dict[str, Any]]
    namespaces: dict[str, str]
    digest: int

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> RoutingTable:
        """A table from a full snapshot document; checks its count and digest."""
        try:
            namespaces = document["namespaces"]
            table = cls(
                version=int(document["version"]),
                committed_at=str(document["committed_at"]),
                cells={c["cell_id"]: c for c in document["cells"]},
                namespaces=namespaces,
                digest=namespace_digest(namespaces),
            )
            expected = (int(document["namespace_count"]), int(document["namespace_digest"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise Inconsistent(f"not a snapshot document: {exc!r}") from None
        if (len(namespaces), table.digest) != expected:
            raise Inconsistent(
                f"snapshot {table.version}: count/digest {len(namespaces)}/{table.digest} != {expected[0]}/{expected[1]}"
            )
        return table

    def apply(self, delta: dict[str, Any]) -> None:
        """Apply a delta in place, or raise :class:`Inconsistent` and change nothing."""
        try:
            since, version = int(delta["since"]), int(delta["version"])
            upserts: dict[str, str] = delta["namespaces"]
            deletions: list[str] = delta["deleted_namespaces"]
            expected = (int(delta["namespace_digest"]), int(delta["namespace_count"]))
            cells, deleted_cells = delta["cells"], delta["deleted_cells"]
        except (KeyError, TypeError, ValueError) as exc:
            raise Inconsistent(f"not a delta document: {exc!r}") from None
        if since != self.version:
            raise Inconsistent(f"delta from {since}, table at {self.version}")
        if version <= self.version:
            raise Inconsistent(f"delta to {version}, table already at {self.version}")
        after = digest_after(self.namespaces, self.digest, len(self.namespaces), upserts, deletions)
        if after != expected:
            raise Inconsistent(f"delta {since}->{version}: digest/count would be {after}, server says {expected}")
        for path in deletions:
            self.namespaces.pop(path, None)
        self.namespaces.update(upserts)
        for cell_id in deleted_cells:
            self.cells.pop(cell_id, None)
        for cell in cells:
            self.cells[cell["cell_id"]] = cell
        self.version, self.committed_at, self.digest = version, str(delta["committed_at"]), after[0]

    def classify(self, kind: str, value: str) -> dict[str, Any] | None:
        """The answer ``GET /v1/classify`` would give, from memory; None when unknown."""
        status, document = classify_in(self.version, self.namespaces, self.cells, kind, value)
        if status == 400:
            raise ValueError(document["error"]["message"])
        return document if status == 200 else None

    def to_document(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "committed_at": self.committed_at,
            "namespace_count": len(self.namespaces),
            "namespace_digest": self.digest,
            "cells": sorted(self.cells.values(), key=lambda c: c["cell_id"]),
            "namespaces": self.namespaces,
        }


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a torn one, even across a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_last_known_good(path: Path) -> RoutingTable | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read last-known-good table %s: %s", path, exc.strerror)
        return None
    try:
        return RoutingTable.from_document(orjson.loads(raw))
    except (orjson.JSONDecodeError, Inconsistent) as exc:
        log.warning("ignoring last-known-good table %s: %s", path, exc)
        return None


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.version = Gauge("topology_router_version", "Topology version of the table held", registry=r)
        self.server_version = Gauge(
            "topology_router_server_version", "Newest version an API answer named", registry=r
        )
        self.lag = Gauge(
            "topology_router_lag_versions", "Server's version minus the table's (0: up to date)", registry=r
        )
        self.data_age = Gauge(
            "topology_router_data_age_seconds",
            "Age of the data: the API's X-Topology-Age-Seconds at the last answer plus the time since",
            registry=r,
        )
        self.namespaces = Gauge("topology_router_namespaces", "Namespaces in the table held", registry=r)
        self.last_sync = Gauge(
            "topology_router_last_sync_timestamp_seconds", "When the API last answered", registry=r
        )
        self.syncs = Counter("topology_router_syncs", "Sync answers by kind", ["result"], registry=r)
        self.fallbacks = Counter(
            "topology_router_full_fallbacks", "Full snapshots fetched instead of a delta, by reason", ["reason"],
            registry=r,
        )
        self.errors = Counter("topology_router_errors", "Failed syncs by kind", ["kind"], registry=r)
        self.source = Gauge("topology_router_started_from_disk", "1 when the table came from the disk copy",
                            registry=r)
        self.silent = Gauge(
            "topology_router_api_silent_seconds",
            "Since the API last gave a usable answer (200, 304, 410); since start when it never has", registry=r,
        )


@dataclass
class _Answer:
    status: int
    headers: httpx.Headers
    body: bytes


class RouterClient:
    """Keeps a :class:`RoutingTable` in sync; ``run`` until ``stop`` is set."""

    def __init__(
        self,
        api_urls: Sequence[str],
        token: str,
        state_file: Path | None = None,
        wait_s: float = 30.0,
        persist_interval_s: float = 10.0,
        metrics: RouterMetrics | None = None,
        binary: bool = True,
        http: httpx.AsyncClient | None = None,
        stale_after_s: float = 60.0,
    ) -> None:
        if not api_urls:
            raise ValueError("at least one API URL")
        if stale_after_s <= wait_s:
            # An up-to-date router hears nothing for a whole long-poll: that is not stale.
            raise ValueError(f"stale_after_s ({stale_after_s}) must exceed the long-poll wait ({wait_s})")
        self.api_urls = [u.rstrip("/") for u in api_urls]
        self._token = token
        self.state_file = state_file
        self.wait_s = wait_s
        self.persist_interval_s = persist_interval_s
        self.metrics = metrics or RouterMetrics()
        self.binary = binary
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=wait_s + 15.0))
        self._owns_http = http is None
        self._next_url = 0
        self.table: RoutingTable | None = None
        self.server_version: int | None = None
        self.need_full = True
        self._persisted_version: int | None = None
        self._persisted_at = 0.0
        self._age_at: tuple[float, float] | None = None  # (server-reported age, when)
        self.stale_after_s = stale_after_s
        self._started_at = time.monotonic()
        self._heard_at: float | None = None  # the API's last usable answer (monotonic)
        self.ready = asyncio.Event()
        self.metrics.data_age.set_function(lambda: self.data_age_seconds or 0.0)
        self.metrics.silent.set_function(self.silent_seconds)

    def __repr__(self) -> str:  # never show the token
        return f"RouterClient(api_urls={self.api_urls!r}, version={self.version})"

    @property
    def version(self) -> int | None:
        return self.table.version if self.table is not None else None

    @property
    def lag_versions(self) -> int:
        if self.table is None or self.server_version is None:
            return 0
        return max(0, self.server_version - self.table.version)

    def classify(self, kind: str, value: str) -> dict[str, Any] | None:
        if self.table is None:
            return None
        return self.table.classify(kind, value)

    def start_from_disk(self) -> bool:
        """Load the last-known-good table; True when there was a usable one."""
        if self.state_file is None or self.table is not None:
            return False
        table = load_last_known_good(self.state_file)
        if table is None:
            return False
        self._install(table)
        self._persisted_version = table.version
        self.metrics.source.set(1)
        # Catch up by delta from the stored version; 410 sends it to a full snapshot.
        self.need_full = False
        log.info("started from the last-known-good table at version %d (%d namespaces)",
                 table.version, len(table.namespaces))
        return True

    def _install(self, table: RoutingTable) -> None:
        self.table = table
        self.metrics.version.set(table.version)
        self.metrics.namespaces.set(len(table.namespaces))
        self._update_lag()
        self.ready.set()

    def _update_lag(self) -> None:
        self.metrics.lag.set(self.lag_versions)

    @property
    def last_heard_s(self) -> float | None:
        """Seconds since the API last gave a usable answer; None when it never has."""
        return None if self._heard_at is None else time.monotonic() - self._heard_at

    def silent_seconds(self) -> float:
        """Seconds without a usable answer: since the last one, or since start."""
        return time.monotonic() - (self._heard_at if self._heard_at is not None else self._started_at)

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, document) of the sidecar's ``/readyz``: 503 ``not_loaded``
        without a table; 503 ``stale`` when the API has been silent for longer than
        ``stale_after_s`` (the table still answers /classify, but nothing says it is
        current); else 200 ``ready``."""
        if self.table is None:
            return 503, {"error": {"code": "not_loaded", "message": "no table yet"}}
        heard = self.last_heard_s
        silent = self.silent_seconds()
        stale = silent > self.stale_after_s
        document = {
            "status": "stale" if stale else "ready",
            "version": self.table.version,
            "lag_versions": self.lag_versions,
            "last_heard_s": None if heard is None else round(heard, 3),
            "stale_after_s": self.stale_after_s,
        }
        if stale:
            document["message"] = (f"no answer from the read API for {silent:.1f}s "
                                   f"(bound {self.stale_after_s:g}s): the table may be behind")
        return (503 if stale else 200), document

    @property
    def data_age_seconds(self) -> float | None:
        """The API's X-Topology-Age-Seconds at its last answer, plus the time since."""
        if self._age_at is None:
            return None
        age, at = self._age_at
        return age + (time.monotonic() - at)

    async def _get(self, params: dict[str, Any], headers: dict[str, str], timeout_s: float) -> _Answer:
        url = self.api_urls[self._next_url % len(self.api_urls)]
        self._next_url += 1
        try:
            response = await self._http.get(
                f"{url}/v1/snapshot",
                params=params,
                headers={"Authorization": f"Bearer {self._token}", **headers},
                timeout=httpx.Timeout(10.0, read=timeout_s + 15.0),
            )
        except httpx.HTTPError as exc:
            raise ApiUnavailable(f"{url}: {exc.__class__.__name__}") from None
        if response.status_code in (401, 403):
            raise NotAuthorized(f"{url}: {response.status_code} {_error_code(response.content)}")
        if response.status_code not in (200, 304, 410):
            raise ApiUnavailable(f"{url}: HTTP {response.status_code} {_error_code(response.content)}")
        if VERSION_HEADER in response.headers:
            server_version = int(response.headers[VERSION_HEADER])
            self.server_version = max(self.server_version or 0, server_version)
            self.metrics.server_version.set(self.server_version)
        if AGE_HEADER in response.headers:
            self._age_at = (float(response.headers[AGE_HEADER]), time.monotonic())
        self._heard_at = time.monotonic()
        self.metrics.last_sync.set(time.time())
        return _Answer(response.status_code, response.headers, response.content)

    def _decode(self, answer: _Answer) -> dict[str, Any]:
        try:
            if answer.headers.get("content-type", "").startswith(MSGPACK):
                return decode_msgpack_snapshot(msgpack.unpackb(answer.body))  # type: ignore[no-any-return]
            return orjson.loads(answer.body)  # type: ignore[no-any-return]
        except (ValueError, msgpack.UnpackException, TypeError, KeyError) as exc:
            raise Inconsistent(f"undecodable answer: {exc!r}") from None

    async def sync_once(self, wait_s: float | None = None) -> str:
        """One request: the outcome (full, delta, not_modified, gone, inconsistent, stale)."""
        wait = self.wait_s if wait_s is None else wait_s
        accept = {"Accept": f"{MSGPACK}, application/json;q=0.9"} if self.binary else {"Accept": "application/json"}
        table = self.table
        if table is None or self.need_full:
            params: dict[str, Any] = {}
            if table is not None:
                params["min_version"] = table.version  # never go back
                if wait > 0:
                    params["wait"] = f"{wait}s"
            answer = await self._get(params, accept, wait if params.get("wait") else 0)
            if answer.status == 304:
                return self._outcome("not_modified")
            if answer.status != 200:
                raise ApiUnavailable(f"full snapshot: HTTP {answer.status}")
            try:
                fresh = RoutingTable.from_document(self._decode(answer))
            except Inconsistent as exc:
                log.warning("full snapshot rejected: %s", exc)
                return self._outcome("inconsistent")
            if table is not None and fresh.version < table.version:
                return self._outcome("stale")  # an API behind us: keep ours
            self._install(fresh)
            self.need_full = False
            return self._outcome("full")

        answer = await self._get({"since": table.version, "wait": f"{wait}s"}, accept, wait)
        if answer.status == 304:
            return self._outcome("not_modified")
        if answer.status == 410:
            log.info("delta from %d gone (%s): full snapshot", table.version, _error_code(answer.body))
            self.need_full = True
            self.metrics.fallbacks.labels("gone").inc()
            return self._outcome("gone")
        try:
            table.apply(self._decode(answer))
        except Inconsistent as exc:
            log.warning("delta rejected, fetching a full snapshot: %s", exc)
            self.need_full = True
            self.metrics.fallbacks.labels("inconsistent").inc()
            return self._outcome("inconsistent")
        self._install(table)
        return self._outcome("delta")

    def _outcome(self, result: str) -> str:
        self.metrics.syncs.labels(result).inc()
        self._update_lag()
        return result

    def _snapshot_for_disk(self, force: bool) -> tuple[int, bytes] | None:
        table = self.table
        if self.state_file is None or table is None or table.version == self._persisted_version:
            return None
        if not force and time.monotonic() - self._persisted_at < self.persist_interval_s:
            return None
        # Serialized here, between two applied deltas, so the copy is one version.
        return table.version, orjson.dumps(table.to_document())

    def persist(self, force: bool = False) -> bool:
        """Write the table to the state file if it changed (at most every
        ``persist_interval_s`` unless ``force``)."""
        pending = self._snapshot_for_disk(force)
        if pending is None or self.state_file is None:
            return False
        write_atomically(self.state_file, pending[1])
        self._persisted_version, self._persisted_at = pending[0], time.monotonic()
        return True

    async def persist_async(self, force: bool = False) -> bool:
        """As :meth:`persist`, with the file written (and fsynced) off the event loop."""
        pending = self._snapshot_for_disk(force)
        if pending is None or self.state_file is None:
            return False
        await asyncio.to_thread(write_atomically, self.state_file, pending[1])
        self._persisted_version, self._persisted_at = pending[0], time.monotonic()
        return True

    async def run(self, stop: asyncio.Event) -> None:
        self.start_from_disk()
        backoff = 0.2
        while not stop.is_set():
            sync = asyncio.ensure_future(self.sync_once())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({sync, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not sync.done():
                sync.cancel()
                break
            try:
                sync.result()
                backoff = 0.2
            except (ApiUnavailable, NotAuthorized) as exc:
                kind = "unauthorized" if isinstance(exc, NotAuthorized) else "unavailable"
                self.metrics.errors.labels(kind).inc()
                self._update_lag()
                log.warning("sync failed (%s); serving version %s; retrying in %.1fs", exc, self.version, backoff)
                try:
                    await asyncio.wait_for(stop.wait(), backoff * random.uniform(0.8, 1.2))
                except TimeoutError:
                    pass
                backoff = min(5.0, backoff * 2)
                continue
            if sync.result() in ("inconsistent", "stale"):
                # The API answered but not usably: do not hammer it.
                try:
                    await asyncio.wait_for(stop.wait(), backoff * random.uniform(0.8, 1.2))
                except TimeoutError:
                    pass
                backoff = min(5.0, backoff * 2)
            try:
                await self.persist_async()
            except OSError as exc:
                log.warning("cannot write the last-known-good table: %s", exc.strerror)
        try:
            await self.persist_async(force=True)
        except OSError as exc:
            log.warning("cannot write the last-known-good table: %s", exc.strerror)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()


def _error_code(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["code"])
    except Exception:  # noqa: BLE001 - only for a log line
        return ""
