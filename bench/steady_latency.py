"""Steady-state latency: producer acknowledgement -> commit in PostgreSQL, at a fixed offered load (issue 7).

    python -m bench.steady_latency [--rates 1000,5000] [--seconds 25] [--warmup 5]
                                   [--batch-wait-ms 200[,100,...]] [--batch-max-events 5000] [--profile]
                                   [--output FILE]

Opt-in and slow (about 80 s per setting with the defaults); not part of the test run.
Starts its own embedded Kafka broker (a fresh one per setting) and uses the local
PostgreSQL (TOPOLOGY_BENCH_POSTGRES_URL, default
postgresql://postgres@127.0.0.1:5432/postgres), in a scratch database it drops.

For each projector setting (one per --batch-wait-ms value; a value may repeat, to
alternate settings on a machine whose load drifts), one ``topology project`` child
process, as in production: a child has its own interpreter and GIL and competes for the
cores like the real deployment does, which an in-process Projector sharing this
process's event loop with the producer would not. For each rate, the producer library
(EventPublisher, acks=all) offers ClaimCreated events on distinct namespaces plus one
CellUpdated in a hundred, paced open loop (an event's send time depends only on its
index, never on how fast earlier ones were acknowledged), first --warmup seconds
unmeasured, then --seconds measured. Per event:

- baseline, log delivery: producer acknowledgement -> a bare aiokafka consumer (its
  own process, the projector's fetch settings, no group) receives the record;
- ack -> committed: the projector's transaction is visible. processed_events has no
  commit timestamp (processed_at is now(), the transaction's *start*), so a listener
  process LISTENs on the projector's NOTIFY channel (delivered only on commit,
  payload = the version) and stamps each notification on arrival; an event's commit
  time is the arrival of its version's notification (processed_events.version).
  The error of that stamp is measured in the same run by probes: NOTIFYs sent by
  this process and timed from the send to their arrival at the listener.

Timestamps are time.time() in every process (one CLOCK_REALTIME on one machine), so
they compare with each other and with PostgreSQL's now().

Target (issue 7): p99 < 100 ms at 1,000 events/s. --profile runs the projector under
pyinstrument and writes its text report next to the logs.

The pure helpers at the top (percentiles, the pacing schedule, ratios, joins) are also
used by bench.cost_growth and bench.producer_throughput and are unit-tested in
tests/unit/test_bench_harness.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg import sql

from bench.router_sync import child_env, cpu_seconds, machine_busy, postgres_pids
from topology_store.cli.devstack import EmbeddedKafka, free_port
from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.projector.migrate import upgrade_to_head
from topology_store.runtime.database import VERSION_CHANNEL
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics
from topology_store.schemas.models import (
    CellRegistered,
    CellState,
    CellStateChanged,
    CellUpdated,
    ClaimBucket,
    ClaimCreated,
    Event,
    OwnerType,
)

PROBE_CHANNEL = "bench_notify_probe"
CELLS = 4
CELL_EVENT_EVERY = 100  # one CellUpdated per 100 events: "a few cell events"
TARGET_RATE = 1000
TARGET_P99_MS = 100.0

Key = tuple[str, int, int]  # (topic, partition, offset)


# --- pure helpers (tests/unit/test_bench_harness.py) -------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or
    below it. No interpolation, so a reported p99 is a latency some event really had."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], not {q}")
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


@dataclass(frozen=True, slots=True)
class Summary:
    n: int
    p50: float
    p99: float
    max: float

    def cells(self, unit: str = "ms") -> str:
        return f"{self.n:>8,d} {self.p50:>9.1f} {self.p99:>9.1f} {self.max:>9.1f} {unit}"


def summarize(values: Sequence[float]) -> Summary | None:
    if not values:
        return None
    return Summary(len(values), percentile(values, 50), percentile(values, 99), max(values))


def format_ratio(value: float, baseline: float) -> str:
    """``value`` as a multiple of ``baseline``: what every figure is reported next to."""
    if baseline <= 0 or not math.isfinite(baseline) or not math.isfinite(value):
        return "n/a"
    ratio = value / baseline
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x" if ratio < 100 else f"{ratio:,.0f}x"


def scheduled_at(index: int, rate: float) -> float:
    """Seconds after the start at which event ``index`` (0-based) is due."""
    return index / rate


def due(rate: float, elapsed_s: float, total: int) -> int:
    """How many of ``total`` events an open-loop schedule has released ``elapsed_s``
    after its start: event k is due at k / rate. It depends on the clock only, so a
    pacer that stalled releases everything that fell due meanwhile at once, and the
    offered rate does not drop when the system under test slows down."""
    if elapsed_s < 0:
        return 0
    # The epsilon keeps k/rate * rate from landing a hair below k in floating point.
    return min(total, math.floor(elapsed_s * rate + 1e-9) + 1)


def expand_ranges(batches: Iterable[Sequence[Any]]) -> dict[Key, float]:
    """(topic, partition, first offset, last offset, received at) per fetched batch ->
    received at per record."""
    received: dict[Key, float] = {}
    for topic, partition, first, last, at in batches:
        for offset in range(int(first), int(last) + 1):
            # A record fetched twice (a re-seek) counts at its first arrival.
            received.setdefault((str(topic), int(partition), offset), float(at))
    return received


def commit_times(versions: Mapping[UUID, int], notified: Mapping[int, float]) -> dict[UUID, float]:
    """An event's commit time: the arrival of the notification of the version its
    batch committed (events whose version was never notified are left out)."""
    return {event_id: notified[version] for event_id, version in versions.items() if version in notified}


def latencies_ms(starts: Mapping[Any, float], ends: Mapping[Any, float]) -> list[float]:
    """end - start in milliseconds for every key in both (signed: a consumer can see a
    record before the producer has processed its acknowledgement)."""
    return [(ends[key] - start) * 1000 for key, start in starts.items() if key in ends]


# --- the events ------------------------------------------------------------------------------------


def setup_events() -> list[Event]:
    events: list[Event] = []
    for n in range(1, CELLS + 1):
        events.append(CellRegistered(source="bench", cell_id=f"cell-{n}", address=f"https://cell-{n}.example.com",
                                     session_prefix=f"cell-{n}-", region="us-east1"))
        events.append(CellStateChanged(source="bench", cell_id=f"cell-{n}", state=CellState.ACTIVE))
    return events


def stream_events(prefix: str, count: int) -> list[Event]:
    """ClaimCreated on distinct namespaces, one CellUpdated in CELL_EVENT_EVERY. Built
    before the clock starts, so model validation does not compete with the pacer."""
    events: list[Event] = []
    for n in range(count):
        if n % CELL_EVENT_EVERY == CELL_EVENT_EVERY - 1:
            # Weight moves every time, so every cell event changes the routing table.
            events.append(CellUpdated(source="bench", cell_id=f"cell-{n // CELL_EVENT_EVERY % CELLS + 1}",
                                      weight=100 + n // CELL_EVENT_EVERY % 1000))
        else:
            events.append(ClaimCreated(source="bench", bucket=ClaimBucket.NAMESPACE, value=f"{prefix}-{n}",
                                       cell_id=f"cell-{n % CELLS + 1}", owner_type=OwnerType.GROUP,
                                       owner_id=n))
    return events


# --- observer processes ----------------------------------------------------------------------------
# Separate processes, so their timestamps are not delayed by this process's pacer and
# producer (or by each other), the way the projector's own latency is not.


def observe_log(bootstrap: str, partitions: list[tuple[str, int]], fetch_wait_ms: int, batch_wait_ms: int,
                max_records: int, out: str, ready: ProcessEvent, stop: ProcessEvent) -> None:
    """The baseline: a bare consumer with the projector's fetch settings, reading from
    the start of every partition; ``ready`` once it has caught up."""
    asyncio.run(_observe_log(bootstrap, partitions, fetch_wait_ms, batch_wait_ms, max_records, out, ready, stop))


async def _observe_log(bootstrap: str, partitions: list[tuple[str, int]], fetch_wait_ms: int, batch_wait_ms: int,
                       max_records: int, out: str, ready: ProcessEvent, stop: ProcessEvent) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed",
        max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024, fetch_max_wait_ms=fetch_wait_ms,
    )
    await consumer.start()
    batches: list[tuple[str, int, int, int, float]] = []
    try:
        tps = [TopicPartition(topic, partition) for topic, partition in partitions]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)  # not seek_to_end: Tansu's ListOffsets is wrong after multi-record batches
        while not stop.is_set():
            # Until caught up, a long wait: an empty answer then means "nothing left".
            fetched = await consumer.getmany(timeout_ms=batch_wait_ms if ready.is_set() else 1000,
                                             max_records=max_records)
            at = time.time()
            if not fetched and not ready.is_set():
                ready.set()
            for tp, records in fetched.items():
                if records:
                    batches.append((tp.topic, tp.partition, records[0].offset, records[-1].offset, at))
    finally:
        await consumer.stop()
        Path(out).write_text(json.dumps(batches))


def listen(libpq_url: str, out: str, ready: ProcessEvent, stop: ProcessEvent) -> None:
    """Arrival time of every projector commit notification (by version) and every probe."""
    versions: dict[int, float] = {}
    probes: dict[str, float] = {}
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(VERSION_CHANNEL)))
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(PROBE_CHANNEL)))
        ready.set()
        while not stop.is_set():
            for notify in conn.notifies(timeout=0.2):
                at = time.time()
                if notify.channel == VERSION_CHANNEL:
                    versions.setdefault(int(notify.payload), at)
                else:
                    probes[notify.payload] = at
    Path(out).write_text(json.dumps({"versions": versions, "probes": probes}))


# --- producing -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Ack:
    index: int
    at: float
    key: Key


@dataclass(slots=True)
class Offered:
    acks: dict[UUID, Ack] = field(default_factory=dict)
    released: list[float] = field(default_factory=list)  # wall time each event was handed to the publisher
    max_lag_s: float = 0.0  # worst lateness of a release against its schedule
    failed: int = 0
    sent: int = 0


async def offer(publisher: EventPublisher, events: Sequence[Event], rate: float, offered: Offered,
                marks: Mapping[int, Callable[[], Any]] | None = None, tick_s: float = 0.002) -> None:
    """Release ``events`` open loop at ``rate``; every chunk is published by its own task,
    so a slow acknowledgement never delays the next release. ``marks[i]`` runs (as a
    task) when event i is released: the measurement window's edges. The pacer wakes at
    most every ``tick_s``: waking for every event at 5,000/s would spend the producer
    host's CPU on the pacer (a release late by up to a tick does not change what is
    measured, which starts at the acknowledgement)."""
    marks = dict(marks or {})
    pending: set[asyncio.Task[None]] = set()
    hooks: list[asyncio.Task[Any]] = []

    async def publish(start: int, chunk: Sequence[Event]) -> None:
        index = {event.event_id: start + n for n, event in enumerate(chunk)}
        async for outcome in publisher.publish_many(chunk):
            if isinstance(outcome, PublishFailed):
                offered.failed += 1
                continue
            offered.acks[outcome.event_id] = Ack(index[outcome.event_id], time.time(),
                                                 (outcome.topic, outcome.partition, outcome.offset))

    started = time.perf_counter()
    total = len(events)
    sent = 0
    while sent < total:
        elapsed = time.perf_counter() - started
        target = due(rate, elapsed, total)
        if target > sent:
            offered.max_lag_s = max(offered.max_lag_s, elapsed - scheduled_at(sent, rate))
            now = time.time()
            offered.released.extend([now] * (target - sent))
            for index in [i for i in marks if sent <= i < target]:
                hooks.append(asyncio.create_task(marks.pop(index)()))
            task = asyncio.create_task(publish(sent, events[sent:target]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent = target
            offered.sent = sent
        if sent < total:
            await asyncio.sleep(max(tick_s, scheduled_at(sent, rate) - (time.perf_counter() - started)))
    await asyncio.gather(*pending, *hooks)


async def probe_notify(libpq_url: str, stop: asyncio.Event, sent: dict[str, float], tag: str,
                       interval_s: float = 0.1) -> None:
    """NOTIFYs from here, timed from the send to their arrival at the listener: the error
    bound of stamping a commit by its notification's arrival, under the same load."""
    async with await psycopg.AsyncConnection.connect(libpq_url, autocommit=True) as conn:
        n = 0
        while not stop.is_set():
            n += 1
            name = f"{tag}-{n}"  # one listener hears every rate's probes
            sent[name] = time.time()
            await conn.execute("SELECT pg_notify(%s, %s)", (PROBE_CHANNEL, name))
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except TimeoutError:
                pass


# --- the run ---------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def scrape(port: int) -> dict[str, float]:
    values: dict[str, float] = {}
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return values
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values


@dataclass
class Window:
    """What the machine did between the first and the last measured release."""

    wall_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class Sampler:
    def __init__(self, watched: dict[str, list[int]], metrics_port: int) -> None:
        self.watched = watched
        self.metrics_port = metrics_port
        self.window = Window()
        self._start: tuple[float, dict[str, float], dict[int, float], float, dict[str, float]] | None = None

    def _cpu(self) -> tuple[dict[str, float], dict[int, float], float]:
        return ({name: cpu_seconds(pids) for name, pids in self.watched.items()},
                {pid: cpu_seconds([pid]) for pid in postgres_pids()}, machine_busy())

    async def begin(self) -> None:
        cpu, pg, busy = self._cpu()
        self._start = (time.monotonic(), cpu, pg, busy, await asyncio.to_thread(scrape, self.metrics_port))

    async def end(self) -> None:
        assert self._start is not None
        at, cpu0, pg0, busy0, metrics0 = self._start
        cpu, pg, busy = self._cpu()
        metrics = await asyncio.to_thread(scrape, self.metrics_port)
        wall = time.monotonic() - at
        shares = {name: (cpu[name] - cpu0[name]) / wall for name in cpu}
        # Backends that ended meanwhile are not counted; new ones count from zero.
        shares["postgresql (all backends, any database)"] = sum(v - pg0.get(pid, 0.0) for pid, v in pg.items()) / wall
        shares["whole machine (cores busy)"] = (busy - busy0) / wall
        # Whatever else shares the machine (other sessions' work on a shared host).
        shares["everything else"] = max(0.0, shares["whole machine (cores busy)"] - sum(
            v for k, v in shares.items() if k != "whole machine (cores busy)"))
        names = ("topology_projector_commit_seconds_sum", "topology_projector_commit_seconds_count",
                 "topology_projector_batch_events_sum", "topology_projector_batch_events_count")
        self.window = Window(wall, shares, {n: metrics.get(n, 0.0) - metrics0.get(n, 0.0) for n in names})


def create_database(admin_url: str) -> tuple[str, str]:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = psycopg.conninfo.conninfo_to_dict(admin_url)
    url = (f"postgresql://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
           f"{params.get('port', 5432)}/{name}")
    return name, url


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def wait_processed(settings: Settings, event_ids: list[UUID], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            found = conn.execute("SELECT count(*) FROM processed_events WHERE event_id = ANY(%s)",
                                 (event_ids,)).fetchone()
            if found is not None and found[0] >= len(event_ids):
                return True
            time.sleep(0.2)
    return False


def wait_drained(settings: Settings, acks: Iterable[Ack], timeout_s: float) -> bool:
    """Until the stored offsets cover every acknowledged record (cheap, unlike count(*))."""
    last: dict[tuple[str, int], int] = {}
    for ack in acks:
        topic, partition, offset = ack.key
        last[(topic, partition)] = max(last.get((topic, partition), -1), offset)
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            stored = {(t, p): o for t, p, o in conn.execute("SELECT topic, partition, next_offset FROM partition_offsets")}
            if all(stored.get(tp, 0) > offset for tp, offset in last.items()):
                return True
            time.sleep(0.2)
    return False


def start_projector(settings: Settings, work: Path, tag: str, profile: bool) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "topology_store.cli", "project"]
    if profile:
        command = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o",
                   str(work / f"projector-{tag}.profile.txt"), "-m", "topology_store.cli", "project"]
    log = open(work / f"projector-{tag}.log", "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(command, env=child_env(settings, TOPOLOGY_LOG_FORMAT="text"), stdout=log,
                            stderr=subprocess.STDOUT)


def measure_rate(settings: Settings, rate: int, warmup_s: float, seconds: float, prefix: str,
                 watched: dict[str, list[int]], metrics_port: int) -> tuple[Offered, Window, dict[str, float], int, int]:
    warm = int(rate * warmup_s)
    measured = int(rate * seconds)
    events = stream_events(prefix, warm + measured)
    offered = Offered()
    sampler = Sampler(watched, metrics_port)
    probes: dict[str, float] = {}

    async def run() -> None:
        stop = asyncio.Event()
        prober = asyncio.create_task(probe_notify(settings.libpq_url, stop, probes, prefix))
        try:
            async with EventPublisher(settings) as publisher:
                await offer(publisher, events, rate, offered,
                            marks={warm: sampler.begin, warm + measured - 1: sampler.end})
        finally:
            stop.set()
            await prober

    asyncio.run(run())
    return offered, sampler.window, probes, warm, warm + measured


def analyse(settings: Settings, offered: Offered, first: int, end: int, delivered: Mapping[Key, float],
            notified: Mapping[int, float], probes_sent: Mapping[str, float], probes_seen: Mapping[str, float],
            window: Window) -> dict[str, Any]:
    measured = {event_id: ack for event_id, ack in offered.acks.items() if first <= ack.index < end}
    with psycopg.connect(settings.libpq_url) as conn:
        rows = conn.execute("SELECT event_id, version, extract(epoch FROM processed_at) FROM processed_events "
                            "WHERE event_id = ANY(%s)", (list(measured),)).fetchall()
    versions = {row[0]: int(row[1]) for row in rows}
    started_at = {row[0]: float(row[2]) for row in rows}
    committed = commit_times(versions, notified)
    acked_at = {event_id: ack.at for event_id, ack in measured.items()}
    delivery = {event_id: delivered[ack.key] for event_id, ack in measured.items() if ack.key in delivered}
    baseline = latencies_ms(acked_at, delivery)
    to_commit = latencies_ms(acked_at, committed)
    to_start = latencies_ms(acked_at, started_at)
    in_txn = latencies_ms(started_at, committed)
    added = [(committed[e] - delivery[e]) * 1000 for e in measured if e in committed and e in delivery]
    probe_ms = latencies_ms({k: v for k, v in probes_sent.items()}, probes_seen)
    released = offered.released[first:end]
    commits = window.metrics.get("topology_projector_commit_seconds_count", 0.0)
    # Saturation shows as a trend: latency that keeps growing across the window.
    ordered = [(ack.index, (committed[e] - ack.at) * 1000) for e, ack in measured.items() if e in committed]
    ordered.sort()
    tenth = max(1, len(ordered) // 10)
    head, tail = summarize([v for _, v in ordered[:tenth]]), summarize([v for _, v in ordered[-tenth:]])
    result: dict[str, Any] = {
        "events": end - first,
        "acknowledged": len(measured),
        "committed_and_matched": len(committed),
        "delivered_to_baseline": len(delivery),
        "failed_publishes": offered.failed,
        "achieved_rate_per_s": (len(released) - 1) / (released[-1] - released[0]) if len(released) > 1 else None,
        "pacing_max_lag_ms": offered.max_lag_s * 1000,
        "baseline_ack_to_bare_consumer_ms": _summary(baseline),
        "ack_to_committed_ms": _summary(to_commit),
        "ack_to_transaction_start_ms": _summary(to_start),
        "transaction_start_to_commit_seen_ms": _summary(in_txn),
        "added_by_projector_ms": _summary(added),
        "notify_probe_error_bound_ms": _summary(probe_ms),
        "ack_to_committed_p50_first_tenth_ms": round(head.p50, 1) if head else None,
        "ack_to_committed_p50_last_tenth_ms": round(tail.p50, 1) if tail else None,
        "projector_commits_per_s": commits / window.wall_s if window.wall_s else None,
        "projector_applied_per_s": (window.metrics.get("topology_projector_batch_events_sum", 0.0) / window.wall_s
                                    if window.wall_s else None),
        "projector_mean_batch_events": (window.metrics.get("topology_projector_batch_events_sum", 0.0) / commits
                                        if commits else None),
        "projector_mean_commit_ms": (window.metrics.get("topology_projector_commit_seconds_sum", 0.0) / commits * 1000
                                     if commits else None),
        "cpu_share_of_one_core": {k: round(v, 3) for k, v in window.cpu.items()},
    }
    b, c = summarize(baseline), summarize(to_commit)
    if b and c:
        result["ratio_p50"] = format_ratio(c.p50, b.p50)
        result["ratio_p99"] = format_ratio(c.p99, b.p99)
    return result


def _summary(values: Sequence[float]) -> dict[str, float] | None:
    summary = summarize(values)
    return None if summary is None else {k: round(v, 2) for k, v in asdict(summary).items()}


def report(setting: str, rate: int, result: dict[str, Any]) -> None:
    print(f"\n== {setting}, offered {rate:,}/s: {result['events']:,} measured events "
          f"(achieved {result['achieved_rate_per_s'] or 0:,.1f}/s, pacing lag max {result['pacing_max_lag_ms']:.1f} ms, "
          f"{result['failed_publishes']} failed)")
    print(f"{'':48s} {'n':>8s} {'p50':>9s} {'p99':>9s} {'max':>9s}")
    for label, name in (("baseline: ack -> bare consumer received", "baseline_ack_to_bare_consumer_ms"),
                        ("ack -> committed (NOTIFY arrival)", "ack_to_committed_ms"),
                        ("  ack -> projector transaction start", "ack_to_transaction_start_ms"),
                        ("  transaction start -> commit seen", "transaction_start_to_commit_seen_ms"),
                        ("  added by the projector (commit - delivery)", "added_by_projector_ms"),
                        ("NOTIFY probe: send -> arrival (error bound)", "notify_probe_error_bound_ms")):
        summary = result[name]
        cells = "(none)" if summary is None else Summary(**{k: (int(v) if k == "n" else v)
                                                            for k, v in summary.items()}).cells()
        print(f"{label:48s} {cells}")
    if "ratio_p50" in result:
        print(f"{'committed / baseline':48s} p50 {result['ratio_p50']}, p99 {result['ratio_p99']}")
    if result["projector_mean_batch_events"] is not None:
        print(f"projector: {result['projector_applied_per_s']:,.0f} events/s applied, "
              f"{result['projector_commits_per_s']:.1f} commits/s, mean batch "
              f"{result['projector_mean_batch_events']:.1f} events, mean commit {result['projector_mean_commit_ms']:.1f} ms")
    print(f"ack -> committed p50, first tenth of the window {result['ack_to_committed_p50_first_tenth_ms']} ms, "
          f"last tenth {result['ack_to_committed_p50_last_tenth_ms']} ms")
    print("CPU, share of one core: " + ", ".join(f"{k} {v:.2f}" for k, v in result["cpu_share_of_one_core"].items()))
    if rate == TARGET_RATE and result["ack_to_committed_ms"]:
        p99 = result["ack_to_committed_ms"]["p99"]
        print(f"target p99 < {TARGET_P99_MS:.0f} ms at {TARGET_RATE:,}/s: {'met' if p99 < TARGET_P99_MS else 'MISSED'} "
              f"(p99 {p99:.1f} ms)")


def run_setting(base: Settings, work: Path, batch_wait_ms: int, rates: list[int], warmup_s: float, seconds: float,
                profile: bool) -> dict[str, Any]:
    tag = f"wait{batch_wait_ms}-{uuid.uuid4().hex[:4]}"  # namespaces stay new even when a setting is repeated
    port = free_port()
    # A broker and topics of its own per setting: the embedded broker's cost per fetch
    # is not independent of what it holds, so a setting measured after another one
    # must not inherit its log.
    kafka = EmbeddedKafka(log_path=work / f"tansu-{tag}.log").start()
    settings = base.model_copy(update={
        "kafka_bootstrap": kafka.bootstrap, "batch_wait_ms": batch_wait_ms, "consumer_group": f"bench-latency-{tag}",
        "projector_metrics_port": port, "cells_topic": f"{tag}.cells", "claims_topic": f"{tag}.claims",
        "claim_requests_topic": f"{tag}.claim-requests", "claim_decisions_topic": f"{tag}.claim-decisions"})
    try:
        asyncio.run(ensure_topics(settings))
        asyncio.run(_publish(settings, setup_events()))  # already in the database after the first setting: unchanged
        return _run_setting(settings, kafka, work, tag, rates, warmup_s, seconds, profile)
    finally:
        kafka.stop()


def _run_setting(settings: Settings, kafka: EmbeddedKafka, work: Path, tag: str, rates: list[int], warmup_s: float,
                 seconds: float, profile: bool) -> dict[str, Any]:
    batch_wait_ms, port = settings.batch_wait_ms, settings.projector_metrics_port
    projector = start_projector(settings, work, tag, profile)
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    observers: list[multiprocessing.process.BaseProcess] = []
    results: dict[str, Any] = {}
    try:
        # The member has joined its group once an event published now is committed.
        marker = [CellUpdated(source="bench", cell_id="cell-1", weight=batch_wait_ms + 1)]
        asyncio.run(_publish(settings, marker))
        if not wait_processed(settings, [e.event_id for e in marker], 120):
            raise RuntimeError(f"the projector did not commit the marker event; see {work}/projector-{tag}.log")
        partitions = [(settings.cells_topic, 0)] + [(settings.claims_topic, p) for p in range(settings.claims_partitions)]
        log_out, listen_out = work / f"delivered-{tag}.json", work / f"notified-{tag}.json"
        log_ready, listen_ready = context.Event(), context.Event()
        observers = [
            context.Process(target=observe_log, name="bare-consumer",
                            args=(settings.kafka_bootstrap, partitions, max(10, batch_wait_ms), batch_wait_ms,
                                  settings.batch_max_events, str(log_out), log_ready, stop)),
            context.Process(target=listen, name="listener", args=(settings.libpq_url, str(listen_out), listen_ready, stop)),
        ]
        for process in observers:
            process.start()
        if not (log_ready.wait(120) and listen_ready.wait(30)):
            raise RuntimeError("an observer process did not get ready")
        watched = {"projector": [projector.pid], "producer (this process)": [os.getpid()],
                   "broker": [kafka._process.pid] if kafka._process is not None else [],
                   "observers (bare consumer, listener)": [p.pid for p in observers if p.pid is not None]}
        runs = []
        for rate in rates:
            say(f"{tag}: offering {rate}/s for {warmup_s:.0f}+{seconds:.0f}s")
            offered, window, probes, first, end = measure_rate(settings, rate, warmup_s, seconds, f"{tag}-r{rate}",
                                                                watched, port)
            if not wait_drained(settings, offered.acks.values(), 180):
                say(f"{tag}: the projector had not caught up 180 s after the {rate}/s run")
            time.sleep(1.0)  # the last notifications and fetches arrive at the observers
            runs.append((rate, offered, window, probes, first, end))
    finally:
        stop.set()
        for process in observers:
            process.join(60)
            if process.is_alive():
                process.terminate()
        stop(projector, timeout_s=60)  # a large batch may still be committing
    delivered = expand_ranges(json.loads(log_out.read_text()))
    heard = json.loads(listen_out.read_text())
    notified = {int(version): at for version, at in heard["versions"].items()}
    for rate, offered, window, probes, first, end in runs:
        results[str(rate)] = analyse(settings, offered, first, end, delivered, notified, probes, heard["probes"], window)
    return results


async def _publish(settings: Settings, events: list[Event]) -> None:
    async with EventPublisher(settings) as publisher:
        async for outcome in publisher.publish_many(events):
            if isinstance(outcome, PublishFailed):
                raise outcome


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{platform.machine()} ({cpu}), {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"Linux {platform.release()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings.model_fields
    parser.add_argument("--rates", default="1000,5000", help="offered events/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=25, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=5, help="unmeasured seconds before each rate's window")
    parser.add_argument("--batch-wait-ms", default=str(defaults["batch_wait_ms"].default),
                        help="projector settings to run, comma-separated (default: the settings' default)")
    parser.add_argument("--batch-max-events", type=int, default=defaults["batch_max_events"].default)
    parser.add_argument("--profile", action="store_true", help="run the projector under pyinstrument")
    parser.add_argument("--output", type=Path, help="write every figure as JSON here")
    args = parser.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    admin = os.environ.get("TOPOLOGY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    database, url = create_database(admin)
    results: dict[str, Any] = {"machine": machine(), "rates": rates, "warmup_s": args.warmup, "seconds": args.seconds,
                               "batch_max_events": args.batch_max_events, "runs": []}
    failed = True
    try:
        base = Settings(database_url=url, producer_idempotence="off", batch_max_events=args.batch_max_events)
        upgrade_to_head(base.sqlalchemy_url)
        say(f"machine: {results['machine']}; logs in {work}")
        for wait_ms in (int(w) for w in args.batch_wait_ms.split(",")):
            setting = f"batch_wait_ms={wait_ms}, batch_max_events={args.batch_max_events}"
            measured = run_setting(base, work, wait_ms, rates, args.warmup, args.seconds, args.profile)
            # A list, not a mapping by setting: a setting may be given twice (alternated runs).
            results["runs"].append({"batch_wait_ms": wait_ms, "by_rate": measured})
            for rate in rates:
                report(setting, rate, measured[str(rate)])
        failed = False
    finally:
        drop_database(admin, database)
        if failed or args.profile:
            say(f"logs{' and profiles' if args.profile else ''} kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=2, default=str)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
