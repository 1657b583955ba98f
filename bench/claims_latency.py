"""Open-loop harness of synchronous claims (issue 13): begin + commit pairs for new users at
fixed offered rates, up to twice the knee, with admission control, CPU per request of every
process, and the HTTP floor of the same server in the same run.

    python -m bench.claims_latency [--broker tansu|apache|both] [--rounds 1] [--idle-pairs 20]
                                   [--rates 50,150,300] [--overload R] [--seconds 10]
                                   [--connections 32] [--env TOPOLOGY_X=value ...] [--json FILE]

Opt-in and slow; not part of the test run. For each broker in turn (``--broker``; both
when Apache Kafka is available, bench/__init__.py), a fresh broker and a fresh scratch
database on the local PostgreSQL (TOPOLOGY_BENCH_POSTGRES_URL), with the projector, the
read API and the decision relay as child processes (``topology project``, ``serve``,
``relay``, as ``topology up`` runs them; bench/stack.py), every setting at its default
unless ``--env`` names it; then:

1. the baseline, the HTTP floor: 500 GET /healthz round trips, one at a time, on one
   keep-alive connection of the same server;
2. steps of begin + commit pairs, each a new user's USERNAME and EMAIL under one lease
   (POST /v1/claims, then on its 201 POST /v1/leases/{id}/commit on the same connection):
   idle (--idle-pairs pairs/s), each of --rates (requests/s, so half as many pairs), and
   last twice the knee (the highest rate whose begin and commit p99 stayed within 200 ms
   with nothing but 201/200 answered), or --overload. Beside every step one GET /healthz
   at a time, 20 a second: the HTTP floor under the same load.

Reported per step: p50 / p99 / max of each call (admitted ones: 201 and 200), the count of
201 / 409 / 429 / 5xx, how fast each 429 came (the time-to-429), the CPU seconds per
answered request of each process (this client, the API, the projector, the relay, the
broker, the PostgreSQL backends of the scratch database; from /proc) and the machine's,
and the issue's three targets met or not.

The load generator is open loop: request k is due at k / rate after the start whatever
became of the earlier ones, and its latency is timed from when it was due, so a late
pacer cannot hide a slow server. It is a small HTTP/1.1 client on asyncio streams (uvloop
when installed): every request is built as bytes before the clock starts, each goes out on
an idle keep-alive connection, or on a new one when all are busy (no client-side queue),
and of an answer only the status line and Content-Length are read (pure helpers:
``parse_head``, ``request_bytes``; tests/unit/test_bench_harness.py). httpx costs more CPU
per request than the server under test, and on two cores that CPU is taken from it.

Figures from a shared machine are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import resource
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import psycopg

from bench import add_broker_argument, best_per_broker, interleaved, load_average, selected_brokers
from bench.router_sync import cpu_seconds, machine_busy
from bench.stack import scratch_stack, tokens
from bench.steady_latency import due, percentile, scheduled_at

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


def begin_body(username: str, lease_id: uuid.UUID, cell_id: str = "cell-1", owner_id: int = 1) -> bytes:
    """A sign-up as the monolith sends it: a new user's USERNAME and EMAIL under one lease."""
    return json.dumps({"cell_id": cell_id, "owner_type": "USER", "owner_id": owner_id, "lease_id": str(lease_id),
                       "claims": [{"bucket": "USERNAME", "value": username},
                                  {"bucket": "EMAIL", "value": f"{username}@example.com"}]}).encode()


def pair_requests(count: int, tag: str, commit: bool, token: str = TOKEN) -> list[tuple[bytes, bytes | None]]:
    """``count`` (begin, commit-or-None) requests for new users; the lease id is chosen here, so
    the commit is built before the begin is answered and no answer body is parsed."""
    requests: list[tuple[bytes, bytes | None]] = []
    for n in range(count):
        lease = uuid.uuid4()
        begin = request_bytes("POST", "/v1/claims", begin_body(f"u-{tag}-{n}-{lease.hex[:8]}", lease, owner_id=n + 1),
                              token)
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
    shed: list[float] = field(default_factory=list)  # time to each 429, from its due time
    errors: list[float] = field(default_factory=list)  # time to each 5xx, from its due time
    statuses: Counter[str] = field(default_factory=Counter)
    lag: float = 0.0  # the latest any request went out after it was due
    wall_s: float = 0.0
    client_cpu_s: float = 0.0  # this process's CPU from the first release to the last answer
    opened: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # percent of one core
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process over the step
    floor: list[float] = field(default_factory=list)  # GET /healthz round trips during the step

    @property
    def failed(self) -> int:
        """Answers neither granted nor refused by admission control (429 is counted apart)."""
        return sum(n for key, n in self.statuses.items() if key not in ("begin 201", "commit 200", "begin 429"))

    def count(self, call: str, status: str) -> int:
        """Answers of ``call`` (begin, commit) whose status starts with ``status`` (e.g. "5")."""
        return sum(n for key, n in self.statuses.items() if key.startswith(f"{call} {status}"))

    @property
    def answered(self) -> int:
        """Requests answered with any HTTP status: what the servers handled."""
        return sum(n for key, n in self.statuses.items() if key.startswith(("begin ", "commit ")))


async def offer(port: int, label: str, rate: float, requests: Sequence[tuple[bytes, bytes | None]],
                connections: int, timeout_s: float, probe_every_s: float = 0.0) -> Step:
    """Offer ``requests`` open loop at ``rate`` per second: request k is released at k / rate
    after the start (``due``), never later because earlier ones are unanswered.
    ``probe_every_s``: meanwhile, one GET /healthz at a time on a connection of its own (the
    HTTP floor under the same load: what the server's loop alone costs)."""
    pool = Pool(port)
    await pool.fill(connections)
    step = Step(label, rate, len(requests))
    probing = asyncio.create_task(probe(port, step.floor, probe_every_s)) if probe_every_s > 0 else None

    async def one(begin: bytes, finish: bytes | None, at: float) -> None:
        step.lag = max(step.lag, clock() - at)
        connection = None
        try:
            async with asyncio.timeout(timeout_s):
                connection = await pool.get()
                head = await exchange(connection, begin)
                begun = clock()
                step.statuses[f"begin {head.status}"] += 1
                if head.status == 429:
                    step.shed.append(begun - at)
                elif head.status >= 500:
                    step.errors.append(begun - at)
                if head.status == 201:
                    step.begin.append(begun - at)
                    if finish is not None:
                        head = await exchange(connection, finish)
                        done = clock()
                        step.statuses[f"commit {head.status}"] += 1
                        if head.status >= 500:
                            step.errors.append(done - begun)
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
    if probing is not None:
        probing.cancel()
    step.wall_s = clock() - start
    step.client_cpu_s = time.process_time() - cpu_started
    step.opened = pool.opened
    pool.close()
    return step


async def probe(port: int, into: list[float], every_s: float) -> None:
    """GET /healthz every ``every_s`` until cancelled, one at a time, timed into ``into``."""
    pool = Pool(port)
    request = request_bytes("GET", "/healthz")
    try:
        while True:
            started = clock()
            connection = await pool.get()
            head = await exchange(connection, request)
            pool.put(connection)
            if head.status == 200:
                into.append(clock() - started)
            await asyncio.sleep(max(0.0, every_s - (clock() - started)))
    except (OSError, ValueError, asyncio.IncompleteReadError):
        pass
    finally:
        pool.close()


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
    """asyncio.run on uvloop when installed: the client's CPU per request is what it costs.
    The client's heap is moved out of the collector's view first: a full collection over it
    would stall the pacer and the clocks of every request in flight (runtime/collector.py)."""
    gc.collect()
    gc.freeze()
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
    """CPU seconds of named processes over a step."""

    def __init__(self, processes: dict[str, Callable[[], list[int]]]) -> None:
        self.processes = processes
        self.before: dict[str, dict[int, float]] = {}
        self.busy = 0.0

    def _read(self) -> dict[str, dict[int, float]]:
        return {name: {pid: cpu_seconds([pid]) for pid in pids()} for name, pids in self.processes.items()}

    def start(self) -> None:
        self.before = self._read()
        self.busy = machine_busy()

    def stop(self, client_cpu_s: float) -> dict[str, float]:
        """CPU seconds of each process since :meth:`start`, the client's and the machine's."""
        after = self._read()
        used = {CLIENT: client_cpu_s}
        for name, pids in after.items():
            # A backend that started during the step counts from zero; one that ended is lost.
            used[name] = sum(seconds - self.before.get(name, {}).get(pid, 0.0) for pid, seconds in pids.items())
        used[MACHINE] = machine_busy() - self.busy
        return used


CLIENT = "client (this process)"
MACHINE = "machine (all processes)"
API = "API (topology serve)"


def measured(meter: CpuMeter, port: int, label: str, rate: float, requests: list[tuple[bytes, bytes | None]],
             connections: int, timeout_s: float) -> Step:
    meter.start()
    step = run(offer(port, label, rate, requests, connections, timeout_s, probe_every_s=PROBE_EVERY_S))
    step.cpu_s = meter.stop(step.client_cpu_s)
    step.cpu = {name: cpu_share(seconds, step.wall_s) for name, seconds in step.cpu_s.items()}
    return step


PROBE_EVERY_S = 0.05  # the HTTP floor under load: 20 GET /healthz per second beside the claims
TARGET_IDLE_P50_MS = 30.0  # issue 13: idle (20 pairs/s), p50 of each call
TARGET_P99_MS = 200.0  # issue 13: p99 of each call at 300 requests/s, and of every admitted one past the knee
TARGET_SHED_MS = 10.0  # issue 13: past the knee, the rest get 429 within this


def within_target(step: Step) -> bool:
    """Both calls' p99 within the target, and nothing but 201/200 answered."""
    return (bool(step.begin) and bool(step.commit) and step.failed == 0 and not step.shed
            and percentile(step.begin, 99) * 1000 <= TARGET_P99_MS
            and percentile(step.commit, 99) * 1000 <= TARGET_P99_MS)


def knee(steps: Sequence[Step]) -> float | None:
    """The highest offered rate (requests/s) that met the target, None when none did."""
    met = [step.rate * 2 for step in steps if within_target(step)]
    return max(met) if met else None


def on_broker(broker_name: str, args: argparse.Namespace, admin: str) -> dict[str, Any]:
    logs = Path(tempfile.mkdtemp(prefix=f"bench-claims-{broker_name}-"))
    result: dict[str, Any] = {"broker": broker_name, "logs": str(logs), "load_before": load_average()}
    print(f"[{broker_name}] starting; load average {result['load_before']}; logs in {logs}", flush=True)
    # Every setting at its default (what `topology up` runs) but the servers' addresses and
    # what --env names explicitly.
    overrides = dict(item.split("=", 1) for item in args.env)
    result["settings"] = overrides
    with scratch_stack(broker_name, admin, logs, {"TOPOLOGY_API_TOKENS": tokens(TOKEN), **overrides}) as stack:
        port, settings, children, broker, database = (stack.api_port, stack.settings, stack.children, stack.broker,
                                                      stack.database)
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
            API: lambda: [children["serve"].pid],
            "projector (topology project)": lambda: [children["project"].pid],
            "relay (topology relay)": lambda: [children["relay"].pid],
            f"broker ({broker_name})": lambda: [broker.pid] if broker.pid else [],
            "PostgreSQL (scratch database)": lambda: backend_pids(admin, database),
        })
        # Warm-up, unmeasured: the projector joins its group, the API's producer connects.
        run(offer(port, "warm-up", 5, pair_requests(20, "warmup", commit=True), 4, timeout_s))
        result["settle_s"] = [run(settle(port))]
        result["floor"] = run(floor(port))
        steps: list[Step] = []

        def step(pairs_per_s: float, label: str) -> None:
            result["settle_s"].append(run(settle(port)))
            steps.append(measured(meter, port, label, pairs_per_s,
                                  pair_requests(max(1, int(pairs_per_s * args.seconds)), f"r{len(steps)}",
                                                commit=True), args.connections, timeout_s))
            print(f"[{broker_name}] {describe(steps[-1])}", flush=True)

        step(args.idle_pairs, f"idle: {args.idle_pairs:g} pairs/s ({2 * args.idle_pairs:g} requests/s)")
        for rate in args.rates:
            step(rate / 2, f"{rate:g} requests/s")
        found = knee(steps[1:])
        overload = args.overload or 2 * (found or min(args.rates))
        result["knee"] = found
        step(overload / 2, f"{overload:g} requests/s (2x the knee)" if not args.overload and found else
             f"{overload:g} requests/s")
        result["steps"] = steps
        result["load_after"] = load_average()
    return result


def describe(step: Step) -> str:
    parts = [step.label]
    for call, values in (("begin", step.begin), ("commit", step.commit)):
        if values:
            parts.append(f"{call} p50 {percentile(values, 50) * 1000:.1f} / p99 {percentile(values, 99) * 1000:.1f} ms")
    parts.append(str(dict(step.statuses)))
    return "; ".join(parts)


# --- the report ----------------------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def quantiles(values: Sequence[float]) -> str:
    """p50 / p99 / max in ms, or a dash."""
    if not values:
        return "–"
    return " / ".join(ms(percentile(values, q) * 1000) for q in (50, 99)) + f" / {ms(max(values) * 1000)}"


def report(results: list[dict[str, Any]]) -> dict[str, Any]:
    for result in results:
        steps: list[Step] = result["steps"]
        print()
        print(f"{result['broker']}: load average before {result['load_before']}, after {result['load_after']}; "
              f"knee {result['knee'] or 'not reached'} requests/s; settings {result['settings'] or 'defaults'}")
        print(f"HTTP floor (GET /healthz, one at a time, idle): p50 / p99 / max {quantiles(result['floor'])} ms")
        print()
        print("| offered | begin p50 / p99 / max ms | commit p50 / p99 / max ms | GET /healthz beside it, "
              "p50 / p99 / max ms | begin 201 / 409 / 429 / 5xx | commit 200 / 409 / 5xx | other | 429 answered "
              "in, p50 / p99 / max ms |")
        print("|---|---|---|---|---|---|---|---|")
        for s in steps:
            other = s.failed - s.count("begin", "409") - s.count("begin", "5") - s.count("commit", "409") \
                - s.count("commit", "5")
            print(f"| {s.label} | {quantiles(s.begin)} | {quantiles(s.commit)} | {quantiles(s.floor)} | "
                  f"{s.count('begin', '201')} / {s.count('begin', '409')} / {s.count('begin', '429')} / "
                  f"{s.count('begin', '5')} | {s.count('commit', '200')} / {s.count('commit', '409')} / "
                  f"{s.count('commit', '5')} | {other} | {quantiles(s.shed)} |")
        names = [n for n in steps[0].cpu_s if n != MACHINE]
        print()
        print("CPU per request answered (ms of CPU; every begin and commit answered, whatever its status), and the "
              "machine's busy share (2 cores = 200%):")
        print("| offered | requests answered | " + " | ".join(names) + " | machine |")
        print("|---|---|" + "---|" * (len(names) + 1))
        for s in steps:
            answered = max(1, s.answered)
            print(f"| {s.label} | {s.answered:,} | "
                  + " | ".join(f"{s.cpu_s[n] / answered * 1000:.2f}" for n in names)
                  + f" | {s.cpu[MACHINE]:.0f}% |")
        print()
        for line in verdicts(steps):
            print(line)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "runs": [{
            "broker": r["broker"], "load_before": r["load_before"], "load_after": r["load_after"],
            "knee_requests_per_s": r["knee"], "settings": r["settings"],
            "floor_ms": {f"p{q}": round(percentile(r["floor"], q) * 1000, 2) for q in (50, 99)},
            "steps": [{
                "label": s.label, "pairs_per_s": s.rate, "offered_pairs": s.offered, "statuses": dict(s.statuses),
                "wall_s": round(s.wall_s, 2), "pacer_lag_max_ms": round(s.lag * 1000, 1),
                "connections_opened": s.opened,
                "cpu_ms_per_request": {k: round(v / max(1, s.answered) * 1000, 3) for k, v in s.cpu_s.items()},
                "cpu_percent_of_a_core": {k: round(v, 1) for k, v in s.cpu.items()},
                **{f"{what}_ms": {"p50": round(percentile(values, 50) * 1000, 1),
                                  "p99": round(percentile(values, 99) * 1000, 1),
                                  "max": round(max(values) * 1000, 1)}
                   for what, values in (("begin", s.begin), ("commit", s.commit), ("pair", s.pair),
                                        ("shed", s.shed), ("healthz", s.floor)) if values},
            } for s in r["steps"]],
            "verdicts": verdicts(r["steps"]),
        } for r in results],
    }


def verdicts(steps: Sequence[Step]) -> list[str]:
    """The issue's three targets, met or not, from the steps (idle first, overload last)."""
    lines = []
    idle = steps[0]
    if idle.begin and idle.commit:
        worst = max(percentile(idle.begin, 50), percentile(idle.commit, 50)) * 1000
        lines.append(f"idle p50 of each call <= {TARGET_IDLE_P50_MS:g} ms: "
                     f"{'met' if worst <= TARGET_IDLE_P50_MS else 'NOT met'} (worst p50 {worst:.1f} ms)")
    at300 = next((s for s in steps[1:-1] if s.rate * 2 == 300), None)
    if at300 is not None:
        lines.append(f"300 requests/s, p99 <= {TARGET_P99_MS:g} ms with no failure: "
                     f"{'met' if within_target(at300) else 'NOT met'} ({describe(at300)})")
    last = steps[-1]
    admitted_p99 = max((percentile(v, 99) * 1000 for v in (last.begin, last.commit) if v), default=float("nan"))
    shed_max = max(last.shed) * 1000 if last.shed else 0.0
    ok = admitted_p99 <= TARGET_P99_MS and shed_max <= TARGET_SHED_MS and last.failed == 0
    lines.append(f"{last.label}: admitted p99 <= {TARGET_P99_MS:g} ms and every 429 within {TARGET_SHED_MS:g} ms: "
                 f"{'met' if ok else 'NOT met'} (admitted p99 {admitted_p99:.1f} ms, {len(last.shed)} shed, slowest "
                 f"429 {shed_max:.1f} ms, {last.failed} failed)")
    return lines


def rates(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_broker_argument(parser)
    parser.add_argument("--idle-pairs", type=float, default=20, help="begin+commit pairs per second of the idle step")
    parser.add_argument("--rates", type=rates, default=[50.0, 150.0, 300.0],
                        help="offered requests per second (begins plus commits), one step each")
    parser.add_argument("--overload", type=float, default=0,
                        help="requests/s of the last step (default: twice the knee, the highest rate that met the "
                             "target; twice the lowest rate when none did)")
    parser.add_argument("--seconds", type=float, default=10, help="length of each step")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections opened up front")
    parser.add_argument("--env", action="append", default=[], metavar="TOPOLOGY_X=value",
                        help="a setting for the servers (repeatable), e.g. TOPOLOGY_BATCH_WAIT_MS=5")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    for item in args.env:
        if not item.startswith("TOPOLOGY_") or "=" not in item:
            parser.error(f"--env takes TOPOLOGY_NAME=value, not {item!r}")
    brokers = selected_brokers(args.broker)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # an open-loop client may need many connections
    admin = os.environ.get("TOPOLOGY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"brokers: {', '.join(brokers)}; load average {load_average()}", flush=True)
    runs = [on_broker(name, args, admin) for name in interleaved(brokers, args.rounds)]
    # The best round per broker: the lowest median begin of the idle step.
    results = best_per_broker(runs, lambda r: r["broker"],
                              lambda r: -percentile(r["steps"][0].begin, 50) if r["steps"][0].begin else -math.inf)
    summary = report(results)
    summary["rounds"] = args.rounds
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
