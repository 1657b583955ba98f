"""``topology project``: run one projector process until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine

from aiokafka.errors import KafkaError

from topology_store.projector.compaction import compact_periodically, report_table_sizes
from topology_store.projector.consumer import Projector
from topology_store.projector.health import Health, probe_forever, start_status_server
from topology_store.projector.metrics import ProjectorMetrics
from topology_store.projector.migrate import check_at_head
from topology_store.projector.poison import is_transient
from topology_store.projector.store import ProjectionStore
from topology_store.projector.ticks import publish_ticks
from topology_store.runtime.collector import freeze_startup_heap
from topology_store.runtime.database import create_engine
from topology_store.runtime.retry import backoff, sleep_unless
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics

log = logging.getLogger(__name__)

# A batch allocates a few objects per event and frees nearly all of them by
# reference counting; CPython's default (a young-generation pass every 700
# allocations, over a heap that includes every module ever imported) spent about
# a sixth of the projector's CPU collecting nothing (docs/benchmark-projector.md).
GC_YOUNG_THRESHOLD = 50_000


def tune_gc_for_batches() -> None:
    """Move what startup allocated out of the collector's view and collect young
    objects less often. Process-wide: called once by the projector's entry point."""
    freeze_startup_heap(GC_YOUNG_THRESHOLD)


async def run_projector(settings: Settings) -> None:
    # Signals first: a SIGTERM while PostgreSQL or the broker is still away must end
    # the waits below, not sit them out.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    metrics = ProjectorMetrics()
    health = Health(metrics)
    if settings.projector_metrics_port:
        # /metrics, and /readyz naming whichever dependency is down (projector/health.py)
        start_status_server(settings.projector_metrics_port, settings.metrics_host, metrics, health)
    if not await _until_available(
        "database", lambda: asyncio.to_thread(check_at_head, settings.sqlalchemy_url), is_transient,
        health.database_failed, stop,
    ):
        return
    if settings.claim_hmac_secret.get_secret_value() == Settings.model_fields["claim_hmac_secret"].default.get_secret_value():
        log.warning("TOPOLOGY_CLAIM_HMAC_SECRET is the development default; set a real secret in production")
    if not await _until_available(
        "broker", lambda: ensure_topics(settings), lambda exc: isinstance(exc, KafkaError | OSError | TimeoutError),
        health.broker_failed, stop,
    ):
        return
    # No pre-ping: a batch on a connection the server dropped fails as transient and is
    # read again (projector/poison.py), so the round trip every batch would pay buys nothing.
    engine = create_engine(settings.sqlalchemy_url, pre_ping=False)
    tune_gc_for_batches()
    try:
        projector = Projector(settings, ProjectionStore(engine, settings.claim_secret), metrics, health=health)
        log.info("projector consuming %s as group %s", ", ".join(settings.topics), settings.consumer_group)
        ticks = asyncio.create_task(publish_ticks(settings, engine, stop), name="lease-ticks")
        probes = asyncio.create_task(probe_forever(settings, engine, health, stop), name="health-probes")
        helpers = [ticks, probes, asyncio.create_task(report_table_sizes(settings, metrics, stop), name="table-sizes")]
        if settings.compact_interval_s > 0:  # retention (adr/0020): one member at a time compacts
            helpers.append(asyncio.create_task(compact_periodically(settings, metrics, stop), name="compaction"))
        try:
            await _bounded(projector.run(stop), stop, settings.shutdown_timeout_s)
        finally:
            stop.set()
            for task in helpers:
                await _finish(task, settings.shutdown_timeout_s)
    finally:
        await engine.dispose()
    log.info("projector stopped")


async def _until_available(
    what: str,
    operation: Callable[[], Awaitable[object]],
    retryable: Callable[[BaseException], bool],
    report: Callable[[BaseException], None],
    stop: asyncio.Event,
) -> bool:
    """Run ``operation`` until it succeeds (True) or ``stop`` is set (False): a
    dependency that is down at start-up is waited for with capped exponential
    backoff and jitter, like one that goes down later."""
    attempt = 0
    while not stop.is_set():
        try:
            await operation()
            return True
        except Exception as exc:
            if not retryable(exc):
                raise  # a schema not at head, a wrong topic layout: an operator must act
            attempt += 1
            report(exc)
            delay = backoff(attempt)
            log.error("%s unavailable at start-up (%s); retrying in %.1fs", what, type(exc).__name__, delay)
            await sleep_unless(stop, delay)
    return False


async def _bounded(work: Coroutine[object, object, None], stop: asyncio.Event, grace_s: float) -> None:
    """Run ``work`` to its end; once ``stop`` is set, give it ``grace_s`` to finish the
    batch in flight, then cancel it. Cancelling abandons that batch atomically: its
    transaction never commits, and the next owner reads it again."""
    task = asyncio.create_task(work)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            done, _ = await asyncio.wait({task}, timeout=grace_s)
            if not done:
                log.warning("the batch in flight did not finish within %.0fs of the stop request; abandoning it",
                            grace_s)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return
        task.result()  # a crash of the consumer loop is still a crash
    finally:
        stopping.cancel()


async def _finish(task: asyncio.Task[None], grace_s: float) -> None:
    try:
        await asyncio.wait_for(task, grace_s)
    except TimeoutError:
        log.warning("%s did not stop within %.0fs; cancelled", task.get_name(), grace_s)
    except Exception:  # noqa: BLE001 - a helper task failing must not turn a clean stop into a crash
        log.exception("%s failed while stopping", task.get_name())
