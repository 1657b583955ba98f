"""Latency of synchronous claims: POST /v1/claims (begin) until the decision, and begin+commit
pairs, at fixed offered rates, on Tansu and on Apache Kafka in the same run.

    python -m bench.claims_latency [--broker tansu|apache|both] [--rounds 1] [--rate 200]
                                   [--seconds 20] [--pairs 20,50,150] [--pair-seconds 10]
                                   [--connections 32] [--json FILE]

Opt-in and slow; not part of the test run. For each broker in turn (``--broker``; both
when Apache Kafka is available, bench/__init__.py), a fresh broker and a fresh scratch
database on the local PostgreSQL (TOPOLOGY_BENCH_POSTGRES_URL), with a projector and the
read API as child processes (``topology project``, ``topology serve``); then:

1. the baseline, the HTTP floor: 500 GET /healthz round trips, one at a time, on one
   keep-alive connection of the same server;
2. begins: --rate POST /v1/claims per second for --seconds, one fresh namespace each
   (the API publishes the request, the projector decides it, the API is woken by the
   projector's NOTIFY);
3. pairs, for each rate of --pairs: a begin, then on its 201 the commit of its lease
   (POST /v1/leases/{id}/commit), per pair.

The load generator is open loop: request k is due at k / rate after the start whatever
became of the earlier ones, and its latency is timed from when it was due, so a late
pacer cannot hide a slow server. It is a small HTTP/1.1 client on asyncio streams (uvloop
when installed): every request is built as bytes before the clock starts, each goes out on
an idle keep-alive connection, or on a new one when all are busy (no client-side queue),
and of an answer only the status line and Content-Length are read (pure helpers:
``parse_head``, ``request_bytes``; tests/unit/test_bench_harness.py). httpx costs more CPU
per request than the server under test, and on two cores that CPU is taken from it. The
CPU each process used during each step (this client, the API, the projector, the broker,
the PostgreSQL backends of the scratch database; from /proc) is reported next to the
latencies, so a reader can see the client is not the bottleneck.

The reference Topology Service targets 20 ms for its calls. Figures from a shared machine
are noisy: the load average is printed with them, and the ratios (to the same run's HTTP
floor, Apache Kafka to Tansu) are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import psycopg
from psycopg import sql

from bench import (
    add_broker_argument,
    best_per_broker,
    broker_table,
    interleaved,
    load_average,
    running_broker,
    selected_brokers,
)
from bench.router_sync import cpu_seconds, machine_busy
from bench.steady_latency import due, format_ratio, percentile, scheduled_at
from topology_store.cli.devstack import free_port
from topology_store.projector.migrate import upgrade_to_head
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics

TOKEN = f"bench-{uuid.uuid4().hex}"
HOST = "127.0.0.1"
TARGET_MS = 20.0
T = TypeVar("T")
# Timestamps from perf_counter: uvloop's loop.time() only moves in whole milliseconds.
clock = time.perf_counter


# --- pure helpers (tests/unit/test_bench_harness.py) -------------------------------------------------


class Head(NamedTuple):
    status: int
    length: int
    keep_alive: bool


def parse_head(head: bytes) -> Head:
    """Status, Content-Length and whether the connection stays open, from an HTTP/1.1
    response head (status line and headers, up to and including the blank line). An
    answer whose body length is not given by Content-Length (chunked, or delimited by
    the connection's end) is refused: this client reads bodies by length only."""
    lines = head.split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or len(status_line[1]) != 3:
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    status = int(status_line[1])
    keep_alive = status_line[0] != b"HTTP/1.0"
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and value.strip().lower() != b"identity":
            raise ValueError("a chunked answer: this client reads bodies by Content-Length only")
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            keep_alive = b"close" not in tokens and (keep_alive or b"keep-alive" in tokens)
    if length is None:
        if status in (204, 304) or 100 <= status < 200:
            return Head(status, 0, keep_alive)
        raise ValueError(f"HTTP {status} without Content-Length")
    return Head(status, length, keep_alive)


def request_bytes(method: str, path: str, body: bytes | None = None, token: str | None = None,
                  host: str = HOST) -> bytes:
    """One HTTP/1.1 request, ready to write on a keep-alive connection."""
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")


def begin_body(namespace: str, lease_id: uuid.UUID, cell_id: str = "cell-1") -> bytes:
    return json.dumps({"cell_id": cell_id, "owner_type": "GROUP", "owner_id": 1, "lease_id": str(lease_id),
                       "claims": [{"bucket": "NAMESPACE", "value": namespace}]}).encode()


def pair_requests(count: int, tag: str, commit: bool, token: str = TOKEN) -> list[tuple[bytes, bytes | None]]:
    """``count`` (begin, commit-or-None) requests on fresh namespaces; the lease id is chosen
    here, so the commit is built before the begin is answered and no answer body is parsed."""
    requests: list[tuple[bytes, bytes | None]] = []
    for n in range(count):
        lease = uuid.uuid4()
        begin = request_bytes("POST", "/v1/claims", begin_body(f"ns-{tag}-{n}-{lease.hex[:8]}", lease), token)
        finish = (request_bytes("POST", f"/v1/leases/{lease}/commit", b'{"cell_id": "cell-1"}', token)
                  if commit else None)
        requests.append((begin, finish))
    return requests


def cpu_share(cpu_s: float, wall_s: float) -> float:
    """CPU seconds over wall seconds, in percent of one core."""
    return 100.0 * cpu_s / wall_s if wall_s > 0 else float("nan")


# --- the client ----------------------------------------------------------------------------------------


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


#: Idle connections older than this are closed, not reused: uvicorn closes a keep-alive
#: connection idle for 5 s (its timeout_keep_alive), and a request written just as it does
#: would fail for the client's sake, not the server's.
IDLE_LIMIT_S = 4.0


class Pool:
    """Keep-alive connections: the most recently used idle one when there is one, else a
    new one. Never a queue."""

    def __init__(self, port: int, host: str = HOST) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[Connection, float]] = []  # (connection, idle since), oldest first
        self.opened = 0

    async def get(self) -> Connection:
        now = clock()
        while self.idle:
            connection, since = self.idle.pop()
            if now - since < IDLE_LIMIT_S and not connection[0].at_eof():
                return connection
            self.discard(connection)
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port)

    def put(self, connection: Connection) -> None:
        self.idle.append((connection, clock()))

    async def fill(self, count: int) -> None:
        for connection in [await self.get() for _ in range(count)]:
            self.put(connection)

    @staticmethod
    def discard(connection: Connection) -> None:
        connection[1].close()

    def close(self) -> None:
        for connection, _ in self.idle:
            self.discard(connection)
        self.idle.clear()


async def exchange(connection: Connection, request: bytes) -> Head:
    reader, writer = connection
    writer.write(request)
    head = parse_head(await reader.readuntil(b"\r\n\r\n"))
    if head.length:
        await reader.readexactly(head.length)
    return head


@dataclass
class Step:
    """What one offered step measured; latencies in seconds, from each request's due time."""

    label: str
    rate: float
    offered: int
    begin: list[float] = field(default_factory=list)
    commit: list[float] = field(default_factory=list)  # from the begin's answer to the commit's
    pair: list[float] = field(default_factory=list)  # from the pair's due time to the commit's answer
    statuses: Counter[str] = field(default_factory=Counter)
    lag: float = 0.0  # the latest any request went out after it was due
    wall_s: float = 0.0
    client_cpu_s: float = 0.0  # this process's CPU from the first release to the last answer
    opened: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # percent of one core

    @property
    def failed(self) -> int:
        return sum(n for key, n in self.statuses.items() if key not in ("begin 201", "commit 200"))


async def offer(port: int, label: str, rate: float, requests: Sequence[tuple[bytes, bytes | None]],
                connections: int, timeout_s: float) -> Step:
    """Offer ``requests`` open loop at ``rate`` per second: request k is released at k / rate
    after the start (``due``), never later because earlier ones are unanswered."""
    pool = Pool(port)
    await pool.fill(connections)
    step = Step(label, rate, len(requests))

    async def one(begin: bytes, finish: bytes | None, at: float) -> None:
        step.lag = max(step.lag, clock() - at)
        connection = None
        try:
            async with asyncio.timeout(timeout_s):
                connection = await pool.get()
                head = await exchange(connection, begin)
                begun = clock()
                step.statuses[f"begin {head.status}"] += 1
                if head.status == 201:
                    step.begin.append(begun - at)
                    if finish is not None:
                        head = await exchange(connection, finish)
                        done = clock()
                        step.statuses[f"commit {head.status}"] += 1
                        if head.status == 200:
                            step.commit.append(done - begun)
                            step.pair.append(done - at)
            if head.keep_alive:
                pool.put(connection)
            else:
                pool.discard(connection)
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            step.statuses[type(exc).__name__] += 1
            if connection is not None:
                pool.discard(connection)

    tasks: list[asyncio.Task[None]] = []
    cpu_started = time.process_time()
    start = clock() + 0.005
    released, total = 0, len(requests)
    while released < total:
        now = clock()
        upto = due(rate, now - start, total)
        for k in range(released, upto):
            tasks.append(asyncio.create_task(one(*requests[k], start + scheduled_at(k, rate))))
        released = max(released, upto)
        if released < total:
            await asyncio.sleep(max(0.0, start + scheduled_at(released, rate) - clock()))
    await asyncio.gather(*tasks)
    step.wall_s = clock() - start
    step.client_cpu_s = time.process_time() - cpu_started
    step.opened = pool.opened
    pool.close()
    return step


async def floor(port: int, count: int = 500) -> list[float]:
    """The HTTP floor: GET /healthz round trips, one at a time, on one keep-alive connection."""
    pool = Pool(port)
    connection = await pool.get()
    request = request_bytes("GET", "/healthz")
    latencies = []
    try:
        for _ in range(count):
            started = clock()
            head = await exchange(connection, request)
            if head.status == 200:
                latencies.append(clock() - started)
    finally:
        pool.discard(connection)
    return latencies


async def settle(port: int, limit_s: float = 90.0) -> float:
    """Wait until the pipeline is idle again (a lone begin answered within 250 ms twice in a
    row), so that one step's backlog does not count against the next. Returns the wait."""
    started = clock()
    quick = 0
    pool = Pool(port)
    try:
        while quick < 2 and clock() - started < limit_s:
            (begin, _), = pair_requests(1, "settle", commit=False)
            sent = clock()
            connection = await pool.get()
            try:
                head = await exchange(connection, begin)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                pool.discard(connection)
                await asyncio.sleep(0.5)
                continue
            pool.put(connection)
            quick = quick + 1 if head.status == 201 and clock() - sent < 0.25 else 0
            if quick < 2:
                await asyncio.sleep(0.2)
    finally:
        pool.close()
    return clock() - started


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop when installed: the client's CPU per request is what it costs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


# --- one broker ----------------------------------------------------------------------------------------


def backend_pids(admin: str, database: str) -> list[int]:
    """The PostgreSQL backends serving the scratch database (not other work on the server)."""
    with psycopg.connect(admin, autocommit=True) as conn:
        return [int(row[0]) for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,))]


class CpuMeter:
    """CPU seconds of named processes over a step, as percent of one core."""

    def __init__(self, processes: dict[str, Callable[[], list[int]]]) -> None:
        self.processes = processes
        self.before: dict[str, dict[int, float]] = {}
        self.busy = 0.0

    def _read(self) -> dict[str, dict[int, float]]:
        return {name: {pid: cpu_seconds([pid]) for pid in pids()} for name, pids in self.processes.items()}

    def start(self) -> None:
        self.before = self._read()
        self.busy = machine_busy()

    def stop(self, wall_s: float, client_cpu_s: float) -> dict[str, float]:
        after = self._read()
        shares = {"client (this process)": cpu_share(client_cpu_s, wall_s)}
        for name, pids in after.items():
            # A backend that started during the step counts from zero; one that ended is lost.
            used = sum(seconds - self.before.get(name, {}).get(pid, 0.0) for pid, seconds in pids.items())
            shares[name] = cpu_share(used, wall_s)
        shares["machine (all processes)"] = cpu_share(machine_busy() - self.busy, wall_s)
        return shares


def measured(meter: CpuMeter, port: int, label: str, rate: float, requests: list[tuple[bytes, bytes | None]],
             connections: int, timeout_s: float) -> Step:
    meter.start()
    step = run(offer(port, label, rate, requests, connections, timeout_s))
    step.cpu = meter.stop(step.wall_s, step.client_cpu_s)
    return step


def on_broker(broker_name: str, args: argparse.Namespace, admin: str) -> dict[str, Any]:
    database = f"bench_{uuid.uuid4().hex[:8]}"
    logs = Path(tempfile.mkdtemp(prefix=f"bench-claims-{broker_name}-"))
    result: dict[str, Any] = {"broker": broker_name, "logs": str(logs), "load_before": load_average()}
    print(f"[{broker_name}] starting; load average {result['load_before']}; logs in {logs}", flush=True)
    with ExitStack() as stack:
        broker = stack.enter_context(running_broker(broker_name, logs / f"{broker_name}.log"))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))

        def drop() -> None:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))

        stack.callback(drop)
        port = free_port()
        settings = Settings(
            kafka_bootstrap=broker.bootstrap, database_url=f"postgresql://postgres@127.0.0.1:5432/{database}",
            producer_idempotence="off", projector_metrics_port=0, api_port=port, batch_wait_ms=5,
        )
        upgrade_to_head(settings.sqlalchemy_url)
        asyncio.run(ensure_topics(settings))
        env = {**os.environ, "TOPOLOGY_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
               "TOPOLOGY_DATABASE_URL": settings.database_url, "TOPOLOGY_PRODUCER_IDEMPOTENCE": "off",
               "TOPOLOGY_PROJECTOR_METRICS_PORT": "0", "TOPOLOGY_API_PORT": str(port), "TOPOLOGY_BATCH_WAIT_MS": "5",
               "TOPOLOGY_API_TOKENS": json.dumps({TOKEN: ["snapshot:read", "claims:read", "claims:write"]}),
               "TOPOLOGY_LOG_FORMAT": "text"}
        children: dict[str, subprocess.Popen[bytes]] = {}
        for command in ("project", "serve"):
            log = stack.enter_context(open(logs / f"{command}.log", "wb"))
            child = subprocess.Popen([sys.executable, "-m", "topology_store.cli", command], env=env,
                                     stdout=log, stderr=subprocess.STDOUT)
            children[command] = child

            def end(child: subprocess.Popen[bytes] = child) -> None:
                child.terminate()
                try:
                    child.wait(20)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()

            stack.callback(end)
        for _ in range(300):
            try:
                if run(floor(port, 1)):
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the API did not answer /healthz: see {logs}/serve.log")
        timeout_s = settings.decision_wait_s + 30
        meter = CpuMeter({
            "API (topology serve)": lambda: [children["serve"].pid],
            "projector (topology project)": lambda: [children["project"].pid],
            f"broker ({broker_name})": lambda: [broker.pid] if broker.pid else [],
            "PostgreSQL (scratch database)": lambda: backend_pids(admin, database),
        })
        # Warm-up, unmeasured: the projector joins its group, the API's producer connects.
        run(offer(port, "warm-up", 5, pair_requests(20, "warmup", commit=True), 4, timeout_s))
        result["settle_s"] = [run(settle(port))]
        healthz = run(floor(port))
        result["floor"] = healthz
        steps = [measured(meter, port, f"begin @ {args.rate:g}/s", args.rate,
                          pair_requests(int(args.rate * args.seconds), "begin", commit=False),
                          args.connections, timeout_s)]
        for rate in args.pairs:
            result["settle_s"].append(run(settle(port)))
            steps.append(measured(meter, port, f"pairs @ {rate:g}/s", rate,
                                  pair_requests(int(rate * args.pair_seconds), f"pair{rate:g}", commit=True),
                                  args.connections, timeout_s))
        result["steps"] = steps
        result["load_after"] = load_average()
        for step in steps:
            if step.failed:
                print(f"[{broker_name}] {step.label}: {step.failed} of {step.offered} not answered as expected: "
                      f"{dict(step.statuses)}", file=sys.stderr)
    return result


# --- the report ----------------------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"


def report(results: list[dict[str, Any]]) -> dict[str, Any]:
    brokers = [r["broker"] for r in results]
    by = {r["broker"]: r for r in results}
    rows: list[tuple[str, dict[str, float | None]]] = []

    def latency_rows(label: str, pick: Callable[[dict[str, Any]], Sequence[float] | None]) -> None:
        for q in (50, 90, 99):
            values = {b: (percentile(v, q) * 1000 if (v := pick(by[b])) else None) for b in brokers}
            rows.append((f"{label} p{q}", values))

    latency_rows("GET /healthz (HTTP floor)", lambda r: r["floor"])
    labels = [s.label for s in results[0]["steps"]]
    for index, label in enumerate(labels):
        latency_rows(f"{label}: begin", lambda r, i=index: r["steps"][i].begin)
        if label.startswith("pairs"):
            latency_rows(f"{label}: commit", lambda r, i=index: r["steps"][i].commit)
            latency_rows(f"{label}: pair", lambda r, i=index: r["steps"][i].pair)
    print()
    print("Latency, ms from each request's due time (open loop); Apache/Tansu compares the brokers:")
    for line in broker_table(rows, brokers, ms):
        print(line)

    same_run: list[tuple[str, dict[str, float | None]]] = []
    for index, label in enumerate(labels):
        same_run.append((f"{label}: begin p99 / HTTP floor p99", {
            b: percentile(s.begin, 99) / percentile(by[b]["floor"], 99) if (s := by[b]["steps"][index]).begin
            else None for b in brokers}))
        same_run.append((f"{label}: begin p99 / target 20 ms", {
            b: percentile(s.begin, 99) * 1000 / TARGET_MS if (s := by[b]["steps"][index]).begin else None
            for b in brokers}))
    print()
    print("Each run against its own baselines:")
    for line in broker_table(same_run, brokers, lambda v: f"{v:,.1f}x" if v >= 10 else f"{v:.2f}x"):
        print(line)

    for broker in brokers:
        print()
        result = by[broker]
        print(f"{broker}: CPU during each step, % of one core (2 cores = 200%); load average before "
              f"{result['load_before']}, after {result['load_after']}")
        steps: list[Step] = result["steps"]
        names = list(steps[0].cpu)
        print("| step | offered | answered as expected | not | pacer lag max | connections opened | "
              + " | ".join(names) + " | client µs/request | API µs/request |")
        print("|" + "---|" * (8 + len(names)))
        for step in steps:
            # Every request answered, whatever its status: what the client and the API handled.
            requests = max(1, sum(n for k, n in step.statuses.items() if k.startswith(("begin ", "commit "))))
            client_us = step.client_cpu_s / requests * 1e6
            api_us = step.cpu["API (topology serve)"] / 100 * step.wall_s / requests * 1e6
            expected = step.statuses["begin 201"] if not step.label.startswith("pairs") else len(step.pair)
            print(f"| {step.label} | {step.offered:,} | {expected:,} | {step.failed:,} | {step.lag * 1000:.1f} ms | "
                  f"{step.opened} | " + " | ".join(f"{step.cpu[n]:.0f}%" for n in names)
                  + f" | {client_us:,.0f} | {api_us:,.0f} |")
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "runs": [{
            "broker": r["broker"], "load_before": r["load_before"], "load_after": r["load_after"],
            "floor_ms": {f"p{q}": round(percentile(r["floor"], q) * 1000, 2) for q in (50, 90, 99)},
            "steps": [{
                "label": s.label, "offered": s.offered, "statuses": dict(s.statuses), "wall_s": round(s.wall_s, 2),
                "pacer_lag_max_ms": round(s.lag * 1000, 1), "connections_opened": s.opened,
                "cpu_percent_of_a_core": {k: round(v, 1) for k, v in s.cpu.items()},
                **{f"{what}_ms": {f"p{q}": round(percentile(values, q) * 1000, 1) for q in (50, 90, 99)}
                   for what, values in (("begin", s.begin), ("commit", s.commit), ("pair", s.pair)) if values},
            } for s in r["steps"]],
        } for r in results],
    }
    if "tansu" in by and "apache" in by:
        summary["apache_to_tansu_begin_p99"] = [
            format_ratio(percentile(a.begin, 99), percentile(t.begin, 99)) if a.begin and t.begin else "n/a"
            for a, t in zip(by["apache"]["steps"], by["tansu"]["steps"], strict=True)]
    return summary


def rates(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_broker_argument(parser)
    parser.add_argument("--rate", type=float, default=200, help="begins per second")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--pairs", type=rates, default=[20.0, 50.0, 150.0],
                        help="begin+commit pairs per second, one step per rate ('' for none)")
    parser.add_argument("--pair-seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections opened up front")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    brokers = selected_brokers(args.broker)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # an open-loop client may need many connections
    admin = os.environ.get("TOPOLOGY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"brokers: {', '.join(brokers)}; load average {load_average()}", flush=True)
    runs = [on_broker(name, args, admin) for name in interleaved(brokers, args.rounds)]
    if args.rounds > 1:
        for run_ in runs:
            first = run_["steps"][0]
            print(f"round on {run_['broker']}: {first.label} begin p50 "
                  f"{percentile(first.begin, 50) * 1000 if first.begin else float('nan'):,.0f} ms; "
                  f"load average before {run_['load_before']}")
    # The best round per broker: the lowest median begin of the first step.
    results = best_per_broker(runs, lambda r: r["broker"],
                              lambda r: -percentile(r["steps"][0].begin, 50) if r["steps"][0].begin else -math.inf)
    summary = report(results)
    summary["rounds"] = args.rounds
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps({"apache_to_tansu_begin_p99": summary.get("apache_to_tansu_begin_p99"),
                      "loads": {r["broker"]: [r["load_before"], r["load_after"]] for r in summary["runs"]}}))


if __name__ == "__main__":
    main()
