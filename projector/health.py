"""The projector's view of its two dependencies, and the HTTP server that reports it.

Readiness means "this member can make progress": the broker answers a metadata
request, PostgreSQL answers a query, and no partition is refused because its log does
not continue as the stored offset and the archive say it must (adr/0019). Both are probed every
``projector_probe_interval_s``, and the consumer reports what it meets in between
(a failed commit, a failed fetch), so an outage shows within one batch.

The projector's status server (``TOPOLOGY_PROJECTOR_METRICS_PORT``) answers:

- ``GET /metrics``: the Prometheus metrics, including ``topology_projector_broker_up``
  and ``topology_projector_database_up`` (1 up, 0 down);
- ``GET /readyz``: 200 ``{"status": "ready", ...}`` or 503 ``{"status": "unready", ...}``
  naming the dependency that is down, since when, and the last error;
- ``GET /healthz``: 200 while the process runs (it retries outages by itself, so a
  restart would not help; liveness stays green through them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from aiokafka.client import AIOKafkaClient
from prometheus_client import make_wsgi_app
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.projector.metrics import ProjectorMetrics
from topology_store.projector.poison import database_error
from topology_store.runtime.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Dependency:
    name: str
    up: bool | None = None  # None: not probed yet
    since: float = field(default_factory=time.time)  # when ``up`` last changed
    error: str | None = None

    def document(self) -> dict[str, Any]:
        state = "unknown" if self.up is None else "up" if self.up else "down"
        return {"state": state, "since": round(self.since, 3), "error": self.error}


def brief(error: BaseException | str) -> str:
    """One line for /readyz and the log: the driver's own message, never SQLAlchemy's
    rendering, which appends the statement and its parameters (claim values)."""
    if isinstance(error, str):
        return error[:500]
    cause = database_error(error) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:500]


class Health:
    """Thread-safe enough for its use: the event loop writes, the status thread reads."""

    def __init__(self, metrics: ProjectorMetrics) -> None:
        self.metrics = metrics
        self.broker = Dependency("broker")
        self.database = Dependency("database")
        # "topic[partition]" -> why this member does not project it, and what fixes it.
        self.refused: dict[str, str] = {}

    def _set(self, dependency: Dependency, up: bool, error: BaseException | str | None = None) -> None:
        if dependency.up is not up:
            dependency.since = time.time()
            if up and dependency.up is False:
                log.info("%s reachable again", dependency.name)
            elif not up:
                log.warning("%s unreachable: %s", dependency.name, brief(error) if error is not None else "")
        dependency.up = up
        if error is not None:
            dependency.error = brief(error)
        gauge = self.metrics.broker_up if dependency is self.broker else self.metrics.database_up
        gauge.set(1 if up else 0)

    def broker_ok(self) -> None:
        self._set(self.broker, True)

    def broker_failed(self, error: BaseException | str) -> None:
        self._set(self.broker, False, error)

    def database_ok(self) -> None:
        self._set(self.database, True)

    def database_failed(self, error: BaseException | str) -> None:
        self._set(self.database, False, error)

    def partition_refused(self, partition: str, reason: str) -> None:
        self.refused[partition] = reason
        self.metrics.refused_partitions.set(len(self.refused))

    def partition_resumed(self, partition: str) -> None:
        if self.refused.pop(partition, None) is not None:
            log.info("%s projected again", partition)
        self.metrics.refused_partitions.set(len(self.refused))

    @property
    def ready(self) -> bool:
        return bool(self.broker.up and self.database.up and not self.refused)

    def document(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.ready else "unready",
            "broker": self.broker.document(),
            "database": self.database.document(),
            "log": {"state": "refused" if self.refused else "ok", "refused": dict(self.refused)},
            "assigned_partitions": self.metrics.assigned_partitions._value.get(),  # noqa: SLF001 - a gauge's value
        }


async def _probe_database(engine: AsyncEngine, health: Health, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to answer is "down"
        health.database_failed(exc)
    else:
        health.database_ok()


async def _probe_broker(settings: Settings, client: AIOKafkaClient | None, health: Health,
                        timeout_s: float) -> AIOKafkaClient | None:
    """One metadata round trip; returns the client to reuse (None after a failure,
    so the next probe starts from a fresh connection)."""
    try:
        async with asyncio.timeout(timeout_s):
            if client is None:
                client = AIOKafkaClient(bootstrap_servers=settings.kafka_bootstrap,
                                        request_timeout_ms=int(timeout_s * 1000))
                await client.bootstrap()
            await client.fetch_all_metadata()
    except Exception as exc:  # noqa: BLE001 - refused, frozen, timed out: all "down"
        health.broker_failed(exc if str(exc) else "no answer within the probe timeout")
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - closing a broken client may fail too
                pass
        return None
    health.broker_ok()
    return client


async def probe_forever(settings: Settings, engine: AsyncEngine, health: Health, stop: asyncio.Event) -> None:
    """Probe both dependencies now and every ``projector_probe_interval_s`` until ``stop``."""
    interval = settings.projector_probe_interval_s
    timeout_s = max(1.0, min(interval, 5.0))
    client: AIOKafkaClient | None = None
    try:
        while not stop.is_set():
            database = asyncio.create_task(_probe_database(engine, health, timeout_s))
            client = await _probe_broker(settings, client, health, timeout_s)
            await database
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
    finally:
        if client is not None:
            await client.close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass  # scrapes every few seconds would drown the log


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def status_app(metrics: ProjectorMetrics, health: Health) -> Callable[..., Iterable[bytes]]:
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/readyz", "/healthz"):
            if path == "/healthz":
                status, body = "200 OK", {"status": "ok"}
            else:
                body = health.document()
                status = "200 OK" if health.ready else "503 Service Unavailable"
            payload = json.dumps(body).encode()
            start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
            return [payload]
        return prometheus(environ, start_response)  # type: ignore[no-any-return]

    return app


def start_status_server(port: int, host: str, metrics: ProjectorMetrics, health: Health) -> WSGIServer:
    """Serve /metrics, /readyz and /healthz on a daemon thread (like prometheus_client's own server)."""
    server = make_server(host, port, status_app(metrics, health), server_class=_ThreadingServer,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="projector-status", daemon=True).start()
    return server
