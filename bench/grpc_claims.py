"""Open-loop harness of GitLab's claim calls over gRPC (issue 12): BeginUpdate + CommitUpdate
pairs for new users at fixed offered rates, next to the same-run floor of a no-op unary RPC
on the same server, with the CPU per call of every process, the load client's included.

    python -m bench.grpc_claims [--broker apache|tansu|both] [--rounds 1] [--rates 50,150,300]
                                [--seconds 10] [--channels 4] [--deadline 30] [--calls pairs|getcells]
                                [--load-client go|python] [--records routes,usernames,emails]
                                [--env TOPOLOGY_X=value ...] [--json FILE]

Opt-in and slow; not part of the test run. For each broker (Apache Kafka unless ``--broker``
says otherwise), the stack as ``topology up`` runs it (bench/stack.py: a fresh broker and
scratch database, ``topology project``, ``topology serve`` with ``TOPOLOGY_GRPC_PORT`` set,
``topology relay``; every setting at its default unless ``--env`` names it), one cell
registered (``cell-1``, GitLab's cell id 1 unless TOPOLOGY_GRPC_CELL_IDS says otherwise: the
id is read back from ``ClaimService.GetCells``); then:

1. the floor: 500 ``HealthService.LivenessProbe`` calls (GitLab's no-op unary, on the same
   gRPC server), one at a time;
2. one step per ``--rates`` value (pairs/s; a pair is two calls): new users, each a
   ``BeginUpdate`` creating the three records Rails writes for a sign-up (ROUTES
   ``user-<n>``, USERNAMES ``user-<n>``, EMAILS ``user-<n>@example.com``; Subject USER n;
   Source RAILS_TABLE_ROUTES / _USERS / _EMAILS with the primary key n as 8 bytes big-endian),
   then on OK a ``CommitUpdate`` of the lease it returned. Beside every step one
   LivenessProbe at a time, 20 a second: the floor under the same load.

Reported per step: p50 / p99 / max of each call (OK answers only; BeginUpdate timed from
when it was due, CommitUpdate from the BeginUpdate's answer), the count of OK /
ALREADY_EXISTS / RESOURCE_EXHAUSTED / UNAVAILABLE / DEADLINE_EXCEEDED / other of each call
(the first message of each non-OK status is printed), the CPU milliseconds per answered call
of each process (the load client, the server, the projector, the relay, the broker, the
scratch database's PostgreSQL backends; from /proc) and the machine's busy share, and the
issue's target: p99 of each call <= 200 ms at 150 pairs/s (300 calls/s), all answered OK.

The load client is a process of its own, driven over a pipe one command at a time, so its
CPU is measured apart from the harness's and the servers'. By default it is compiled
(bench/grpcload/main.go: Go and grpc-go, built with ``go build`` at the start; the module
proxy serves its modules the first time; run with GOMAXPROCS=1 unless the environment sets
it, which halves its cross-thread wake-ups): a Python gRPC client costs about as much CPU
per call as the Python server it measures, and on two cores that CPU is taken from the
server; on this machine (a virtual machine where every system call and wake-up is dear) the
Go client costs about half the Python one's, 0.4-0.6 ms a call against a stub server.
``--load-client python`` runs the same protocol on a raw ``grpc.aio`` channel instead. Both
open ``--channels`` HTTP/2 connections, send requests the harness built and serialized
before the clock starts (bytes through a pass-through codec) and never parse an answer: a
CommitUpdate is the BeginUpdate answer's bytes followed by the request's ``cell_id`` field;
BeginUpdateResponse and CommitUpdateRequest number their fields alike (cell_id 1,
lease_uuid 2), and of a scalar field given twice the last one counts.

Open loop: pair k is due at k / rate after the start whatever became of the earlier ones
(bench.steady_latency's ``due``/``scheduled_at``), and its latency is timed from when it
was due, so a late pacer cannot hide a slow server. ``--calls getcells`` offers pairs of
``ClaimService.GetCells`` instead (a read RPC through the same authorization), for a server
that does not serve BeginUpdate yet. ``--deadline`` is each call's gRPC deadline (Rails gives
a claim call about 0.3 s; the default is long, so the figures show the whole distribution).

Figures from a shared machine are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench import add_broker_argument, best_per_broker, interleaved, load_average
from bench.claims_latency import CLIENT, MACHINE, CpuMeter, cpu_share, quantiles, rates
from bench.steady_latency import due, percentile, scheduled_at

TOKEN = f"bench-{uuid.uuid4().hex}"
HOST = "127.0.0.1"
CELL_NAME = "cell-1"
clock = time.perf_counter

CLAIMS = "gitlab.cells.topology_service.claims.v1.ClaimService"
HEALTH = "gitlab.cells.topology_service.HealthService"
BEGIN = f"/{CLAIMS}/BeginUpdate"
COMMIT = f"/{CLAIMS}/CommitUpdate"
GET_CELLS = f"/{CLAIMS}/GetCells"
LIVENESS = f"/{HEALTH}/LivenessProbe"

#: The statuses counted apart (issue 12); any other is "other".
COUNTED = ("OK", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED")
CALLS = ("begin", "commit")
CALL_NAMES = {"begin": "BeginUpdate", "commit": "CommitUpdate"}
PROBE_EVERY_S = 0.05  # the floor under load: 20 LivenessProbe calls a second beside the claims
TARGET_P99_MS = 200.0  # issue 12 (the HTTP path's target of issue 13): each call at 150 pairs/s
TARGET_PAIRS_PER_S = 150.0
SETTLE_QUICK_S = 0.25


# --- pure helpers (tests/unit/test_grpc_claims_bench.py) ---------------------------------------------


def rails_key(n: int) -> bytes:
    """A Rails primary key as Rails sends it in ``Source.rails_primary_key_id``: 8 bytes, big-endian."""
    return n.to_bytes(8, "big", signed=True)


#: The records of a sign-up, as Rails writes them; ``--records`` may leave some out.
RECORDS = ("routes", "usernames", "emails")


def signup(n: int, cell_id: int, kinds: Sequence[str] = RECORDS) -> Any:
    """The BeginUpdateRequest of user ``n``'s sign-up: route, username and e-mail in one lease
    (those of them named in ``kinds``). The route is a top-level path, so the decider keeps it
    as a namespace claim: it changes the routing table (adr/0022)."""
    from topology_store.schemas.generated.proto.claims.v1 import messages_pb2 as m
    from topology_store.schemas.generated.proto.claims.v1 import service_pb2 as s

    name = f"user-{n}"
    subject = m.Subject(type=m.Subject.USER, id=n)
    records = [
        m.Metadata(bucket=m.Bucket(type=bucket, value=value), subject=subject,
                   source=m.Source(type=source, rails_primary_key_id=rails_key(n)))
        for kind, bucket, value, source in (
            ("routes", m.Bucket.ROUTES, name, m.Source.RAILS_TABLE_ROUTES),
            ("usernames", m.Bucket.USERNAMES, name, m.Source.RAILS_TABLE_USERS),
            ("emails", m.Bucket.EMAILS, f"{name}@example.com", m.Source.RAILS_TABLE_EMAILS))
        if kind in kinds
    ]
    return s.BeginUpdateRequest(create_records=records, cell_id=cell_id)


def signup_bytes(first: int, count: int, cell_id: int, kinds: Sequence[str] = RECORDS) -> list[bytes]:
    """The serialized sign-ups of users ``first`` .. ``first + count - 1``."""
    return [signup(n, cell_id, kinds).SerializeToString() for n in range(first, first + count)]


def record_kinds(text: str) -> tuple[str, ...]:
    """``--records``: a comma-separated subset of :data:`RECORDS`, in their order."""
    named = {v.strip() for v in text.split(",") if v.strip()}
    if not named or named - set(RECORDS):
        raise ValueError(f"--records takes some of {','.join(RECORDS)}, not {text!r}")
    return tuple(kind for kind in RECORDS if kind in named)


def commit_suffix(cell_id: int) -> bytes:
    """What follows a BeginUpdate answer's bytes to make them the CommitUpdateRequest of its lease."""
    from topology_store.schemas.generated.proto.claims.v1 import service_pb2 as s

    return s.CommitUpdateRequest(cell_id=cell_id).SerializeToString()


def status_group(name: str) -> str:
    """A gRPC status name (or a client-side failure) as the report counts it."""
    return name if name in COUNTED else "other"


def tally(statuses: Counter[str], call: str) -> list[int]:
    """The counts of ``call``'s answers in :data:`COUNTED` order, then other."""
    groups: Counter[str] = Counter()
    for key, n in statuses.items():
        who, _, status = key.partition(" ")
        if who == call:
            groups[status_group(status)] += n
    return [groups[name] for name in (*COUNTED, "other")]


def release_plan(rate: float, total: int, elapsed: Sequence[float]) -> list[int]:
    """How many of ``total`` calls an open-loop pacer has released at each of the ``elapsed``
    seconds since the start (what :func:`offer` does between its sleeps)."""
    released, plan = 0, []
    for at in elapsed:
        released = max(released, due(rate, at, total))
        plan.append(released)
    return plan


@dataclass
class Step:
    """One offered step as the load client measured it; latencies in seconds."""

    label: str
    rate: float  # pairs per second
    offered: int
    begin: list[float] = field(default_factory=list)  # OK answers, from the due time
    commit: list[float] = field(default_factory=list)  # OK answers, from the begin's answer
    pair: list[float] = field(default_factory=list)  # from the due time to the commit's OK
    probe: list[float] = field(default_factory=list)  # LivenessProbe beside the step
    shed: list[float] = field(default_factory=list)  # BeginUpdate's RESOURCE_EXHAUSTED, from the due time
    statuses: Counter[str] = field(default_factory=Counter)  # "begin OK", "commit ALREADY_EXISTS", ...
    messages: dict[str, str] = field(default_factory=dict)  # the first message of each non-OK status
    lag: float = 0.0  # the latest any pair went out after it was due
    wall_s: float = 0.0
    client_cpu_s: float = 0.0  # the client's own count (process_time, its threads included)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process over the step
    cpu: dict[str, float] = field(default_factory=dict)  # percent of one core

    @property
    def answered(self) -> int:
        """Calls answered with any status (claims only, not the probes): what the servers handled."""
        return sum(n for key, n in self.statuses.items() if key.split(" ", 1)[0] in CALLS)

    @property
    def failed(self) -> int:
        return sum(n for key, n in self.statuses.items() if not key.endswith(" OK"))

    @classmethod
    def from_json(cls, label: str, rate: float, data: dict[str, Any]) -> Step:
        return cls(label, rate, data["offered"], data["begin"], data["commit"], data["pair"], data["probe"],
                   data["shed"], Counter(data["statuses"]), data["messages"], data["lag"], data["wall_s"],
                   data["cpu_s"])

    def to_json(self) -> dict[str, Any]:
        return {"offered": self.offered, "begin": self.begin, "commit": self.commit, "pair": self.pair,
                "probe": self.probe, "shed": self.shed, "statuses": dict(self.statuses), "messages": self.messages, "lag": self.lag,
                "wall_s": self.wall_s, "cpu_s": self.client_cpu_s}


def within_target(step: Step) -> bool:
    """Both calls' p99 within the target, and every call answered OK."""
    return (bool(step.begin) and bool(step.commit) and step.failed == 0
            and percentile(step.begin, 99) * 1000 <= TARGET_P99_MS
            and percentile(step.commit, 99) * 1000 <= TARGET_P99_MS)


def verdict(steps: Sequence[Step], calls: str = "pairs") -> str:
    at = next((s for s in steps if s.rate == TARGET_PAIRS_PER_S), None)
    what = f"{TARGET_PAIRS_PER_S:g} pairs/s ({2 * TARGET_PAIRS_PER_S:g} calls/s), p99 of each call <= " \
           f"{TARGET_P99_MS:g} ms, all OK"
    if calls != "pairs":
        return f"{what}: not measured (--calls {calls} offers GetCells, not claims)"
    if at is None:
        return f"{what}: not measured (no step at {TARGET_PAIRS_PER_S:g} pairs/s)"
    return f"{what}: {'met' if within_target(at) else 'NOT met'} ({describe(at)})"


def describe(step: Step) -> str:
    parts = [step.label]
    for call in CALLS:
        values = getattr(step, call)
        if values:
            parts.append(f"{CALL_NAMES[call]} p50 {percentile(values, 50) * 1000:.1f} / "
                         f"p99 {percentile(values, 99) * 1000:.1f} ms")
    parts.append(", ".join(f"{k} {n}" for k, n in sorted(step.statuses.items())))
    return "; ".join(parts)


def step_table(steps: Sequence[Step], names: tuple[str, str] = ("BeginUpdate", "CommitUpdate")) -> list[str]:
    """The latency and status table of one run, in Markdown."""
    counted = "OK / EXISTS / EXHAUSTED / UNAVAILABLE / DEADLINE / other"
    lines = [(f"| offered | {names[0]} p50 / p99 / max ms | {names[1]} p50 / p99 / max ms | LivenessProbe beside it, "
              f"p50 / p99 / max ms | {names[0]} {counted} | {names[1]} {counted} | RESOURCE_EXHAUSTED answered in, "
              "p50 / p99 / max ms | pacer lag max ms |"),
             "|---|---|---|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s.label} | {quantiles(s.begin)} | {quantiles(s.commit)} | {quantiles(s.probe)} | "
                     f"{' / '.join(map(str, tally(s.statuses, 'begin')))} | "
                     f"{' / '.join(map(str, tally(s.statuses, 'commit')))} | {quantiles(s.shed)} | {s.lag * 1000:.1f} |")
    return lines


def cpu_table(steps: Sequence[Step]) -> list[str]:
    """CPU milliseconds per answered call of each process, and the machine's busy share."""
    names = [n for n in steps[0].cpu_s if n != MACHINE]
    lines = ["| offered | calls answered | " + " | ".join(names) + " | machine |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for s in steps:
        answered = max(1, s.answered)
        lines.append(f"| {s.label} | {s.answered:,} | "
                     + " | ".join(f"{s.cpu_s[n] / answered * 1000:.2f}" for n in names)
                     + f" | {s.cpu.get(MACHINE, float('nan')):.0f}% |")
    return lines


# --- the load clients (each its own process) ---------------------------------------------------------
#
# Two speak the same protocol over a pipe (one JSON command a line in, one JSON answer a line
# out): the compiled one (bench/grpcload/main.go, Go and grpc-go; the default) and this Python
# one (``--load-client python``; ``grpc.aio``). Commands: ``{"op": "floor", "count": n}``,
# answered with the LivenessProbe round trips; ``{"op": "step", ...}`` (:func:`step_command`),
# answered with :meth:`Step.to_json`.


@dataclass(frozen=True)
class Calls:
    """What a step offers: the methods of a pair's two calls, and the bytes of its requests."""

    first: str
    second: str
    requests: list[bytes]  # one a pair; empty: every first request is empty (no fields)
    suffix: bytes  # appended to the first call's answer: the second call's request


def pair_calls(calls: str, first_user: int, count: int, cell_id: int, kinds: Sequence[str] = RECORDS) -> Calls:
    """The calls of ``count`` pairs: sign-ups of new users from ``first_user`` (``pairs``), or
    two GetCells (``getcells``: their requests have no fields, the second gets the first's
    answer, which GetCells ignores)."""
    if calls == "pairs":
        return Calls(BEGIN, COMMIT, signup_bytes(first_user, count, cell_id, kinds), commit_suffix(cell_id))
    if calls == "getcells":
        return Calls(GET_CELLS, GET_CELLS, [], b"")
    raise ValueError(f"unknown calls {calls!r}")


def step_command(calls: Calls, rate: float, count: int, deadline_s: float, probe_every_s: float) -> dict[str, Any]:
    return {"op": "step", "rate": rate, "count": count, "deadline_s": deadline_s, "probe_every_s": probe_every_s,
            "first": calls.first, "second": calls.second,
            "requests": [base64.b64encode(r).decode() for r in calls.requests],
            "suffix": base64.b64encode(calls.suffix).decode()}


class Client:
    """The Python load client: raw ``grpc.aio`` calls on bytes, one instance a process."""

    def __init__(self, target: str, token: str, channels: int) -> None:
        import grpc

        self.grpc = grpc
        # A subchannel pool of each channel's own: every channel its own HTTP/2 connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(max(1, channels))]
        self.probe_channel = grpc.aio.insecure_channel(target, options=options)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.liveness = self.probe_channel.unary_unary(LIVENESS)
        self.liveness_request = b""  # LivenessProbeRequest has no fields

    async def close(self) -> None:
        for channel in (*self.channels, self.probe_channel):
            await channel.close()

    async def floor(self, count: int) -> list[float]:
        latencies = []
        for _ in range(count):
            started = clock()
            await self.liveness(self.liveness_request, timeout=10)
            latencies.append(clock() - started)
        return latencies

    async def probe(self, into: list[float], every_s: float) -> None:
        while True:
            started = clock()
            try:
                await self.liveness(self.liveness_request, timeout=10)
                into.append(clock() - started)
            except self.grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(max(0.0, every_s - (clock() - started)))

    async def offer(self, calls: Calls, rate: float, count: int, deadline_s: float, probe_every_s: float) -> Step:
        """Offer ``count`` pairs open loop at ``rate`` pairs/s: pair k is released at k / rate
        after the start, never later because earlier ones are unanswered."""
        methods = [(c.unary_unary(calls.first), c.unary_unary(calls.second)) for c in self.channels]
        requests = calls.requests or [b""] * count
        suffix = calls.suffix
        step = Step("", rate, count)
        error = self.grpc.aio.AioRpcError
        metadata = self.metadata

        def failed(call: str, exc: BaseException) -> None:
            name = exc.code().name if isinstance(exc, error) else type(exc).__name__
            key = f"{call} {name}"
            step.statuses[key] += 1
            if key not in step.messages:
                step.messages[key] = (exc.details() if isinstance(exc, error) else str(exc)) or ""

        async def one(k: int, at: float) -> None:
            step.lag = max(step.lag, clock() - at)
            begin, commit = methods[k % len(methods)]
            try:
                answer = await begin(requests[k], timeout=deadline_s, metadata=metadata)
            except (error, OSError) as exc:
                failed("begin", exc)
                if isinstance(exc, error) and exc.code() == self.grpc.StatusCode.RESOURCE_EXHAUSTED:
                    step.shed.append(clock() - at)
                return
            begun = clock()
            step.statuses["begin OK"] += 1
            step.begin.append(begun - at)
            try:
                await commit(answer + suffix, timeout=deadline_s, metadata=metadata)
            except (error, OSError) as exc:
                failed("commit", exc)
                return
            done = clock()
            step.statuses["commit OK"] += 1
            step.commit.append(done - begun)
            step.pair.append(done - at)

        probing = asyncio.create_task(self.probe(step.probe, probe_every_s)) if probe_every_s > 0 else None
        tasks: list[asyncio.Task[None]] = []
        cpu_started = time.process_time()
        start = clock() + 0.005
        released = 0
        while released < count:
            upto = due(rate, clock() - start, count)
            for k in range(released, upto):
                tasks.append(asyncio.create_task(one(k, start + scheduled_at(k, rate))))
            released = max(released, upto)
            if released < count:
                await asyncio.sleep(max(0.0, start + scheduled_at(released, rate) - clock()))
        await asyncio.gather(*tasks)
        step.wall_s = clock() - start
        step.client_cpu_s = time.process_time() - cpu_started
        if probing is not None:
            probing.cancel()
        return step

    async def serve(self, commands: IO[str], answers: IO[str]) -> None:
        """The pipe protocol: one JSON command a line on ``commands``, one JSON answer a line on ``answers``."""
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, commands.readline):
            command = json.loads(line)
            if command["op"] == "floor":
                answer: Any = await self.floor(command["count"])
            elif command["op"] == "step":
                calls = Calls(command["first"], command["second"],
                              [base64.b64decode(r) for r in command["requests"]], base64.b64decode(command["suffix"]))
                answer = (await self.offer(calls, command["rate"], command["count"], command["deadline_s"],
                                           command["probe_every_s"])).to_json()
            else:
                raise ValueError(f"unknown command {command['op']!r}")
            answers.write(json.dumps(answer) + "\n")
            answers.flush()
        await self.close()


def python_client_main(target: str, token: str, channels: int) -> None:
    async def serve() -> None:  # grpc.aio channels belong to the loop they are made in
        await Client(target, token, channels).serve(sys.stdin, sys.stdout)

    asyncio.run(serve())


GRPCLOAD = Path(__file__).resolve().parent / "grpcload"


def go_tool() -> str | None:
    return shutil.which("go") or next((p for p in ("/usr/local/go/bin/go",) if os.access(p, os.X_OK)), None)


def build_grpcload(into: Path) -> Path:
    """``go build`` of bench/grpcload (its modules come from the Go module proxy the first time)."""
    go = go_tool()
    if go is None:
        raise RuntimeError("--load-client go needs the Go toolchain (go on PATH or /usr/local/go/bin/go); "
                           "or run with --load-client python")
    binary = into / "grpcload"
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=GRPCLOAD, check=True)
    return binary


def client_command(kind: str, target: str, token: str, channels: int, binary: Path | None) -> list[str]:
    if kind == "go":
        assert binary is not None
        return [str(binary), target, token, str(channels)]
    return [sys.executable, "-m", "bench.grpc_claims", "--serve-load", target, "--token", token,
            "--channels", str(channels)]


class ClientProcess:
    """The harness's end of the pipe to a load client."""

    def __init__(self, command: list[str], log: Path) -> None:
        self._log = open(log, "wb")  # noqa: SIM115 -- the client's stderr for its life; close() closes it
        # One Go thread running goroutines: fewer futex wake-ups between threads, less CPU per call.
        env = {"GOMAXPROCS": "1", **os.environ}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                        text=True, cwd=Path(__file__).resolve().parent.parent, env=env)
        self.pid = self.process.pid

    def ask(self, command: dict[str, Any]) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the load client exited ({self.process.wait()}): see {self._log.name}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


class Users:
    """Numbers of new users, never one twice in a run."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, count: int) -> int:
        first, self.next = self.next, self.next + count
        return first


# --- one broker ------------------------------------------------------------------------------------


def register_cell(settings: Any, name: str) -> None:
    from topology_store.producer.publisher import EventPublisher, PublishFailed
    from topology_store.schemas.models import CellRegistered

    async def publish() -> None:
        async with EventPublisher(settings) as publisher:
            async for outcome in publisher.publish_many([CellRegistered(
                    source="bench", cell_id=name, address=f"http://{name}.example.com", session_prefix=f"{name}-",
                    region="bench")]):
                if isinstance(outcome, PublishFailed):
                    raise outcome

    asyncio.run(publish())


def wait_for_cell(target: str, alive: Callable[[], None], timeout_s: float = 120) -> int:
    """GitLab's id of the one cell, once the door is SERVING and GetCells lists it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from topology_store.schemas.generated.proto import cell_info_pb2

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        get_cells = channel.unary_unary(GET_CELLS, request_serializer=cell_info_pb2.GetCellsRequest.SerializeToString,
                                        response_deserializer=cell_info_pb2.GetCellsResponse.FromString)
        while time.monotonic() < deadline:
            alive()
            try:
                serving = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if serving.status == health_pb2.HealthCheckResponse.SERVING:
                    cells = get_cells(cell_info_pb2.GetCellsRequest(), timeout=2,
                                      metadata=(("authorization", f"Bearer {TOKEN}"),)).cells
                    if cells:
                        return int(cells[0].id)
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"the gRPC door did not list the registered cell within {timeout_s:g} s")


def measured(meter: CpuMeter, client: ClientProcess, label: str, rate: float, calls: Calls, count: int,
             deadline_s: float) -> Step:
    meter.start()
    started = time.process_time()
    step = Step.from_json(label, rate, client.ask(step_command(calls, rate, count, deadline_s, PROBE_EVERY_S)))
    used = meter.stop(time.process_time() - started)
    used["harness (waiting on the pipe)"] = used.pop(CLIENT)
    step.cpu_s = used
    step.cpu = {name: cpu_share(seconds, step.wall_s) for name, seconds in used.items()}
    return step


#: Answers that say the servers are still busy: a lone pair answered so, however fast, has not settled.
BUSY = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")


def quiet(lone: dict[str, Any]) -> bool:
    """Was a lone pair (:meth:`Step.to_json`) answered within 250 ms a call, and not shed or
    timed out? (Any other status, UNIMPLEMENTED included, is an answer of an idle server.)"""
    busy = any(key.split(" ", 1)[1] in BUSY for key in lone["statuses"])
    return not busy and lone["wall_s"] < 2 * SETTLE_QUICK_S


def settle(client: ClientProcess, make: Callable[[int], Calls], deadline_s: float, limit_s: float = 90.0) -> float:
    """Wait until the pipeline is idle again (a lone pair :func:`quiet` twice in a row), so one
    step's backlog does not count against the next. Returns the wait."""
    started = time.monotonic()
    quick = 0
    while quick < 2 and time.monotonic() - started < limit_s:
        lone = client.ask(step_command(make(1), 1.0, 1, deadline_s, 0))
        quick = quick + 1 if quiet(lone) else 0
        if quick < 2:
            time.sleep(0.2)
    return time.monotonic() - started


LOAD_CLIENT = "load client (own process)"


def on_broker(broker_name: str, args: argparse.Namespace, admin: str) -> dict[str, Any]:
    from bench.stack import scratch_stack, tokens
    from topology_store.cli.devstack import free_port

    logs = Path(tempfile.mkdtemp(prefix=f"bench-grpc-claims-{broker_name}-"))
    result: dict[str, Any] = {"broker": broker_name, "logs": str(logs), "load_before": load_average(),
                              "load_client": args.load_client}
    print(f"[{broker_name}] starting; load average {result['load_before']}; logs in {logs}", flush=True)
    binary = build_grpcload(logs) if args.load_client == "go" else None
    overrides = dict(item.split("=", 1) for item in args.env)
    grpc_port = free_port()
    env = {"TOPOLOGY_GRPC_PORT": str(grpc_port), "TOPOLOGY_API_TOKENS": tokens(TOKEN), **overrides}
    result["settings"] = overrides
    result["records"] = "+".join(args.records)
    target = f"{HOST}:{grpc_port}"
    users = Users()
    with scratch_stack(broker_name, admin, logs, env) as stack:
        register_cell(stack.settings, CELL_NAME)
        cell_id = wait_for_cell(target, stack.alive)
        result["cell"] = f"{CELL_NAME} (GitLab's cell id {cell_id})"

        def make(count: int) -> Calls:
            return pair_calls(args.calls, users.take(count), count, cell_id, args.records)

        client = ClientProcess(client_command(args.load_client, target, TOKEN, args.channels, binary),
                               logs / "client.log")
        try:
            meter = CpuMeter({LOAD_CLIENT: lambda: [client.pid], **stack.processes(admin)})
            # Warm-up, unmeasured: the projector joins its group, the door's producer connects.
            client.ask(step_command(make(20), 5, 20, args.deadline, 0))
            result["settle_s"] = [settle(client, make, args.deadline)]
            result["floor"] = client.ask({"op": "floor", "count": 500})
            print(f"[{broker_name}] floor (LivenessProbe, one at a time): p50 / p99 / max "
                  f"{quantiles(result['floor'])} ms", flush=True)
            steps: list[Step] = []
            for rate in args.rates:
                result["settle_s"].append(settle(client, make, args.deadline))
                count = max(1, int(rate * args.seconds))
                steps.append(measured(meter, client, f"{rate:g} pairs/s ({2 * rate:g} calls/s)", rate, make(count),
                                      count, args.deadline))
                print(f"[{broker_name}] {describe(steps[-1])}", flush=True)
                stack.alive()
            result["steps"] = steps
        finally:
            client.close()
        result["load_after"] = load_average()
    return result


# --- the report ------------------------------------------------------------------------------------


def report(results: list[dict[str, Any]], calls: str) -> dict[str, Any]:
    names = ("BeginUpdate", "CommitUpdate") if calls == "pairs" else ("GetCells", "GetCells (2nd)")
    for result in results:
        steps: list[Step] = result["steps"]
        print()
        print(f"{result['broker']}: load average before {result['load_before']}, after {result['load_after']}; "
              f"{result['cell']}; records {result['records']}; load client {result['load_client']}; "
              f"settings {result['settings'] or 'defaults'}")
        print(f"floor (LivenessProbe, one at a time, idle): p50 / p99 / max {quantiles(result['floor'])} ms")
        print()
        print("\n".join(step_table(steps, names)))
        messages = {k: v for s in steps for k, v in s.messages.items()}
        for key, message in sorted(messages.items()):
            print(f"  {key}: {message[:200]}")
        print()
        print("CPU ms per call answered (every call answered, whatever its status; the probes not counted), and "
              "the machine's busy share (2 cores = 200%):")
        print("\n".join(cpu_table(steps)))
        print()
        print(verdict(steps, calls))
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "calls": calls,
        "runs": [{
            "broker": r["broker"], "load_before": r["load_before"], "load_after": r["load_after"],
            "cell": r["cell"], "records": r["records"], "load_client": r["load_client"], "settings": r["settings"],
            "floor_ms": {f"p{q}": round(percentile(r["floor"], q) * 1000, 2) for q in (50, 99)}
            | {"max": round(max(r["floor"]) * 1000, 2)},
            "steps": [{
                "label": s.label, "pairs_per_s": s.rate, "offered_pairs": s.offered, "statuses": dict(s.statuses),
                "messages": s.messages, "wall_s": round(s.wall_s, 2), "pacer_lag_max_ms": round(s.lag * 1000, 1),
                "cpu_ms_per_call": {k: round(v / max(1, s.answered) * 1000, 3) for k, v in s.cpu_s.items()},
                "cpu_percent_of_a_core": {k: round(v, 1) for k, v in s.cpu.items()},
                **{f"{what}_ms": {"p50": round(percentile(values, 50) * 1000, 1),
                                  "p99": round(percentile(values, 99) * 1000, 1),
                                  "max": round(max(values) * 1000, 1)}
                   for what, values in (("begin", s.begin), ("commit", s.commit), ("pair", s.pair),
                                        ("liveness", s.probe), ("resource_exhausted", s.shed)) if values},
            } for s in r["steps"]],
            "settle_s": [round(v, 1) for v in r["settle_s"]],
            "verdict": verdict(r["steps"], calls),
        } for r in results],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_broker_argument(parser)
    parser.set_defaults(broker="apache")
    parser.add_argument("--rates", type=rates, default=[50.0, 150.0, 300.0],
                        help="offered BeginUpdate + CommitUpdate pairs per second, one step each")
    parser.add_argument("--seconds", type=float, default=10, help="length of each step")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels (HTTP/2 connections) of the load")
    parser.add_argument("--deadline", type=float, default=30.0, help="each call's gRPC deadline, seconds")
    parser.add_argument("--calls", choices=("pairs", "getcells"), default="pairs",
                        help="pairs: BeginUpdate + CommitUpdate; getcells: two ClaimService.GetCells instead")
    parser.add_argument("--records", type=record_kinds, default=RECORDS, metavar="routes,usernames,emails",
                        help="the records of each sign-up (default: all three, as Rails writes them; leaving out "
                             "routes shows what the routing table's change costs)")
    parser.add_argument("--env", action="append", default=[], metavar="TOPOLOGY_X=value",
                        help="a setting for the servers (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--load-client", choices=("go", "python"), default="go" if go_tool() else "python",
                        help="the load client: go (bench/grpcload, compiled at the start; the default when the Go "
                             "toolchain is here) or python (grpc.aio, in a process of its own)")
    # The Python load client's own process (started by the harness, not by hand).
    parser.add_argument("--serve-load", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--token", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_load:
        python_client_main(args.serve_load, args.token, args.channels)
        return
    for item in args.env:
        if not item.startswith("TOPOLOGY_") or "=" not in item:
            parser.error(f"--env takes TOPOLOGY_NAME=value, not {item!r}")
    from bench import selected_brokers

    brokers = selected_brokers(args.broker)
    admin = os.environ.get("TOPOLOGY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"brokers: {', '.join(brokers)}; calls: {args.calls}; load average {load_average()}", flush=True)
    runs = [on_broker(name, args, admin) for name in interleaved(brokers, args.rounds)]
    # The best round per broker: the lowest median first call of the first step.
    results = best_per_broker(runs, lambda r: r["broker"],
                              lambda r: -percentile(r["steps"][0].begin, 50) if r["steps"][0].begin else -math.inf)
    summary = report(results, args.calls)
    summary["rounds"] = args.rounds
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
