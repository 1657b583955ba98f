"""Router sync benchmarks at scale (adr/0009; results in docs/benchmarks.md).

    python -m bench.router_sync [--namespaces 1000000] [--cells 100] [--phases snapshot,revalidate,converge]

Opt-in and slow: not part of the test run. Needs PostgreSQL (TOPOLOGY_BENCH_POSTGRES_URL,
default the local server) and, for the revalidation phase, ``wrk`` and ``nginx`` on PATH
(``apt-get install wrk nginx-light``); the convergence phase starts the embedded Kafka
broker, a projector and the read API as child processes.

Phases:
- snapshot: seed N namespaces over C cells straight into PostgreSQL (COPY), start the
  read API, and measure the first full load, the refresh after a commit (from the change
  log), the full snapshot's size and build time per representation, and a delta of 100
  changes (size, refresh time, request latency, and the same delta computed from the log).
- revalidate: 304 revalidation throughput with wrk against the API, and in the same run
  against nginx serving the same snapshot bytes as a static file with an ETag; both
  servers pinned to the same single core, wrk to the other.
- converge: a producer writes ClaimCreated events at R events/s through Kafka; F
  followers long-poll deltas; for each event, the time from the producer's
  acknowledgement until every follower holds it (p50, p99).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from topology_store.cli.devstack import EmbeddedKafka, free_port
from topology_store.projector.migrate import upgrade_to_head
from topology_store.runtime.settings import Settings

TOKEN = "bench-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORDS = ("gitlab", "acme", "orbit", "nimbus", "pixel", "delta", "quartz", "ember", "atlas", "harbor",
         "lumen", "vertex", "cobalt", "falcon", "meadow", "summit")


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


# --- setup -----------------------------------------------------------------------------------------

def create_database(admin_url: str, name: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(admin_url, dbname=name)
    params = psycopg.conninfo.conninfo_to_dict(url)
    return f"postgresql://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}/{name}"


def seed(database_url: str, namespaces: int, cells: int) -> None:
    """N committed NAMESPACE claims over C active cells, at version 1, by COPY."""
    settings = Settings(database_url=database_url)
    upgrade_to_head(settings.sqlalchemy_url)
    started = time.perf_counter()
    with psycopg.connect(settings.libpq_url) as conn:
        with conn.cursor().copy(
            "COPY cells (cell_id, address, session_prefix, region, weight, state, state_reason, version) FROM STDIN"
        ) as copy:
            for n in range(1, cells + 1):
                copy.write_row((f"cell-{n}", f"https://cell-{n}.example.com", f"cell-{n}-",
                                "us-east1" if n % 2 else "europe-west4", 100, "ACTIVE", "bench", 1))
        buffer = io.StringIO()
        for n in range(namespaces):
            path = f"{WORDS[n % 16]}-{WORDS[(n // 16) % 16]}-{n}"
            buffer.write(f"NAMESPACE\t{path}\tcell-{n % cells + 1}\tGROUP\t{n}\t2026-01-01 00:00:00+00\t1\tCOMMITTED\n")
        buffer.seek(0)
        with conn.cursor().copy(
            "COPY claims (bucket, value, cell_id, owner_type, owner_id, claimed_at, version, status) FROM STDIN"
        ) as copy:
            while chunk := buffer.read(1 << 20):
                copy.write(chunk)
        conn.execute("UPDATE topology_version SET version = 1, committed_at = now() WHERE id = 1")
        conn.commit()
        conn.execute("ANALYZE")
    say(f"seeded {namespaces} namespaces over {cells} cells in {time.perf_counter() - started:.1f}s")


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    values = {f"TOPOLOGY_{k.upper()}": (v.get_secret_value() if hasattr(v, "get_secret_value") else str(v))
              for k, v in settings.model_dump().items() if v is not None}
    return {**os.environ, **values, **extra}


def pinned(command: list[str], cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu, *command] if cpu is not None and shutil.which("taskset") else command


def start_api(settings: Settings, port: int, log: Path, cpu: str | None = None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        pinned([sys.executable, "-m", "topology_store.cli", "serve"], cpu),
        env=child_env(settings, TOPOLOGY_API_PORT=str(port)),
        stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"read API exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("read API not ready")


def stop(process: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def metrics(api: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(f"{api}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


class Committer:
    """Commits batches through the real projection store (in-process)."""

    def __init__(self, settings: Settings) -> None:
        from topology_store.projector.store import ProjectionStore
        from topology_store.runtime.database import create_engine

        self.loop = asyncio.new_event_loop()
        self.engine = create_engine(settings.sqlalchemy_url)
        self.store = ProjectionStore(self.engine, settings.claim_secret)
        self.offset = 0
        self.topic = f"bench-{uuid.uuid4().hex[:6]}"
        self.loop.run_until_complete(self.store.stored_offsets([(self.topic, 0)]))

    def commit(self, events: list[Any]) -> int:
        from topology_store.core.fold import PositionedEvent
        from topology_store.projector.store import PartitionAdvance

        positioned = [PositionedEvent(e, self.topic, 0, self.offset + n) for n, e in enumerate(events)]
        advance = {(self.topic, 0): PartitionAdvance(self.offset, self.offset + len(events))}
        result = self.loop.run_until_complete(self.store.commit_batch(positioned, [], advance))
        self.offset += len(events)
        return int(result.version)

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.dispose())
        self.loop.close()


def claims(prefix: str, count: int, cells: int) -> list[Any]:
    from topology_store.schemas.models import ClaimBucket, ClaimCreated, OwnerType

    return [ClaimCreated(source="bench", bucket=ClaimBucket.NAMESPACE, value=f"{prefix}-{n}",
                         cell_id=f"cell-{n % cells + 1}", owner_type=OwnerType.GROUP, owner_id=10**9 + n)
            for n in range(count)]


def wait_version(api: str, version: int) -> float:
    """Until the API serves ``version`` (a long-poll for the delta into it: small)."""
    started = time.perf_counter()
    response = httpx.get(f"{api}/v1/snapshot", params={"since": version - 1, "wait": "60s"}, headers=AUTH, timeout=90)
    assert response.status_code == 200 and int(response.headers["X-Topology-Version"]) >= version, response.status_code
    return time.perf_counter() - started


# --- phases ----------------------------------------------------------------------------------------

def phase_snapshot(settings: Settings, work: Path, cells: int, results: dict[str, Any]) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    process = start_api(settings, port, work / "api-snapshot.log")
    results["api_start_to_ready_s"] = time.perf_counter() - started
    committer = Committer(settings)
    try:
        first = metrics(api)
        results["full_load_s"] = first["topology_api_snapshot_build_seconds_sum"]

        # One commit: the API moves to it from the change log, not by reloading.
        before = metrics(api)
        committed = time.perf_counter()
        version = committer.commit(claims("one", 1, cells))
        wait_version_started = time.perf_counter()
        latency = wait_version(api, version)
        after = metrics(api)
        results["refresh_one_change_s"] = (after["topology_api_snapshot_build_seconds_sum"]
                                           - before["topology_api_snapshot_build_seconds_sum"])
        results["commit_to_served_s"] = wait_version_started - committed + latency

        sizes: dict[str, int] = {}
        build: dict[str, float] = {}
        for fmt, accept in (("json", "application/json"), ("msgpack", "application/msgpack")):
            for encoding in ("identity", "gzip", "zstd"):
                t0 = time.perf_counter()
                with httpx.stream("GET", f"{api}/v1/snapshot", headers={**AUTH, "Accept": accept,
                                                                         "Accept-Encoding": encoding}) as r:
                    body = b"".join(r.iter_raw())
                first_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                with httpx.stream("GET", f"{api}/v1/snapshot", headers={**AUTH, "Accept": accept,
                                                                         "Accept-Encoding": encoding}) as r:
                    again = b"".join(r.iter_raw())
                cached_s = time.perf_counter() - t0
                assert again == body
                sizes[f"{fmt}/{encoding}"] = len(body)
                build[f"{fmt}/{encoding} first_request_s"] = first_s
                build[f"{fmt}/{encoding} cached_request_s"] = cached_s
        m = metrics(api)
        for key, value in m.items():
            match = re.fullmatch(r'topology_api_encoding_seconds_sum\{encoding="(\w+)",format="(\w+)",kind="snapshot"\}',
                                 key)
            if match:
                build[f"{match.group(2)}/{match.group(1)} server_build_s"] = value
        results["snapshot_bytes"] = sizes
        results["snapshot_build"] = build

        # A delta of 100 changes.
        base = version
        before = metrics(api)
        version = committer.commit(claims("hundred", 100, cells))
        wait_version(api, version)
        after = metrics(api)
        results["refresh_100_changes_s"] = (after["topology_api_snapshot_build_seconds_sum"]
                                            - before["topology_api_snapshot_build_seconds_sum"])
        delta_sizes = {}
        for encoding in ("identity", "gzip", "zstd"):
            with httpx.stream("GET", f"{api}/v1/snapshot", params={"since": base},
                              headers={**AUTH, "Accept-Encoding": encoding}) as r:
                delta_sizes[encoding] = len(b"".join(r.iter_raw()))
        with httpx.stream("GET", f"{api}/v1/snapshot", params={"since": base},
                          headers={**AUTH, "Accept": "application/msgpack", "Accept-Encoding": "identity"}) as r:
            delta_sizes["msgpack"] = len(b"".join(r.iter_raw()))
        results["delta_100_bytes"] = delta_sizes
        with httpx.Client(headers=AUTH) as client:
            timings = []
            for _ in range(200):
                t0 = time.perf_counter()
                r = client.get(f"{api}/v1/snapshot", params={"since": base})
                timings.append(time.perf_counter() - t0)
                assert r.status_code == 200
            results["delta_100_request_s"] = {"p50": percentile(timings, 50), "p99": percentile(timings, 99)}
            # The same changes from an older base: not the delta the refresh made, so computed from the log.
            t0 = time.perf_counter()
            r = client.get(f"{api}/v1/snapshot", params={"since": base - 1})
            results["delta_101_from_log_first_request_s"] = time.perf_counter() - t0
            assert r.status_code == 200 and len(r.json()["namespaces"]) == 101
        results["api_rss_mb"] = int(Path(f"/proc/{process.pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
        results["snapshot_version"] = version
    finally:
        committer.close()
        stop(process)


def wrk(url: str, headers: dict[str, str], seconds: int, connections: int, cpu: str | None) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    out = subprocess.run(pinned([*command, url], cpu), capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    return {
        "requests_per_s": rps,
        "errors": float(non_2xx.group(1)) if non_2xx else 0.0,
        "p50_ms": float(p50.group(1)) * scale[p50.group(2)] * 1000 if p50 else -1,
        "p99_ms": float(p99.group(1)) * scale[p99.group(2)] * 1000 if p99 else -1,
    }


def phase_revalidate(settings: Settings, work: Path, results: dict[str, Any], seconds: int, connections: int,
                     rounds: int = 3) -> None:
    if not (shutil.which("wrk") and shutil.which("nginx")):
        results["revalidate"] = "skipped: wrk and nginx are needed (apt-get install wrk nginx-light)"
        return
    server_cpu, load_cpu = ("0", "1") if (os.cpu_count() or 1) >= 2 else (None, None)
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    process = start_api(settings, port, work / "api-wrk.log", cpu=server_cpu)
    try:
        response = httpx.get(f"{api}/v1/snapshot", headers={**AUTH, "Accept-Encoding": "identity"}, timeout=60)
        etag = response.headers["ETag"]
        static = work / "static"
        static.mkdir(exist_ok=True)
        for path in (work, static):  # nginx workers run as an unprivileged user
            path.chmod(0o755)
        (static / "snapshot.json").write_bytes(response.content)
        (static / "snapshot.json").chmod(0o644)
        check = httpx.get(f"{api}/v1/snapshot", headers={**AUTH, "If-None-Match": etag})
        assert check.status_code == 304
        api_runs = []
    except BaseException:
        stop(process)
        raise

    nginx_port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server {{
    listen 127.0.0.1:{nginx_port};
    location / {{ root {static}; etag on; add_header Cache-Control no-cache; }}
  }}
}}
""")
    nginx = subprocess.Popen(pinned(["nginx", "-c", str(conf)], server_cpu), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{nginx_port}/snapshot.json"
        for _ in range(100):
            try:
                static_etag = httpx.get(url).headers["ETag"]
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert httpx.get(url, headers={"If-None-Match": static_etag}).status_code == 304
        nginx_runs = []
        for _ in range(rounds):  # alternate, so both see the same machine
            api_runs.append(wrk(f"{api}/v1/snapshot", {**AUTH, "If-None-Match": etag}, seconds, connections, load_cpu))
            nginx_runs.append(wrk(url, {"If-None-Match": static_etag}, seconds, connections, load_cpu))
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(10)
        stop(process)
    api_best = max(api_runs, key=lambda r: r["requests_per_s"])
    nginx_best = max(nginx_runs, key=lambda r: r["requests_per_s"])
    results["revalidate"] = {
        "api": api_best,
        "nginx": nginx_best,
        "api_runs_per_s": [r["requests_per_s"] for r in api_runs],
        "nginx_runs_per_s": [r["requests_per_s"] for r in nginx_runs],
        "ratio_api_to_nginx": api_best["requests_per_s"] / nginx_best["requests_per_s"],
        "ratio_per_round": [a["requests_per_s"] / n["requests_per_s"] for a, n in zip(api_runs, nginx_runs)],
        "setup": f"both servers pinned to CPU {server_cpu}, wrk -t1 -c{connections} -d{seconds}s pinned to CPU "
                 f"{load_cpu}; API with bearer token + If-None-Match, nginx with If-None-Match; "
                 f"{rounds} alternating rounds, best of each",
    }


FOLLOWER = r'''
# F long-polling followers in one process, each on its own keep-alive connection, speaking
# the protocol with a minimal HTTP/1.1 client (httpx costs ~10x more CPU per response, and
# on a 2-core machine the followers' CPU is taken from the servers under test).
import asyncio, json, sys, time
import orjson

try:
    import uvloop
    uvloop.install()
except ImportError:
    pass

async def main(host, port, token, followers, since, expected, out, deadline_s):
    held = {}  # namespace -> number of followers holding it
    last = {}  # namespace -> when the last follower got it (wall clock)
    done = asyncio.Event()
    async def follow(n):
        version = since
        reader, writer = await asyncio.open_connection(host, port)
        while not done.is_set():
            writer.write((f"GET /v1/snapshot?since={version}&wait=30s HTTP/1.1\r\nHost: {host}\r\n"
                          f"Authorization: Bearer {token}\r\nAccept-Encoding: identity\r\n\r\n").encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            now = time.time()
            if status == 200:
                delta = orjson.loads(body)
                assert delta["since"] == version
                version = delta["version"]
                for path in delta["namespaces"]:
                    if path.startswith("conv-"):
                        count = held[path] = held.get(path, 0) + 1
                        if count == followers:
                            last[path] = now
                if len(last) >= expected:
                    done.set()
            elif status != 304:
                raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        writer.close()
    tasks = [asyncio.create_task(follow(n)) for n in range(followers)]
    print("ready", flush=True)
    try:
        await asyncio.wait_for(done.wait(), deadline_s)
    except TimeoutError:
        pass
    for t in tasks:
        t.cancel()
    json.dump(last, open(out, "w"))

host, port, token, followers, since, expected, out, deadline = sys.argv[1:]
asyncio.run(main(host, int(port), token, int(followers), int(since), int(expected), out, float(deadline)))
'''


def phase_converge(settings: Settings, work: Path, cells: int, results: dict[str, Any], rate: int,
                   seconds: int, followers: int) -> None:
    from topology_store.producer.publisher import EventPublisher
    from topology_store.runtime.topics import ensure_topics

    with ExitStack() as stack:
        kafka = EmbeddedKafka(log_path=work / "tansu.log").start()
        stack.callback(kafka.stop)
        run = uuid.uuid4().hex[:6]
        conv = settings.model_copy(update={
            "kafka_bootstrap": kafka.bootstrap, "cells_topic": f"bench-{run}.cells", "claims_topic": f"bench-{run}.claims",
            "consumer_group": f"bench-{run}", "producer_idempotence": "off", "projector_metrics_port": 0,
            "batch_wait_ms": 20,
        })
        asyncio.run(ensure_topics(conv))
        projector = subprocess.Popen([sys.executable, "-m", "topology_store.cli", "project"], env=child_env(conv),
                                     stdout=open(work / "projector.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        stack.callback(stop, projector)
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        api_process = start_api(conv, port, work / "api-converge.log")
        stack.callback(stop, api_process)
        version = httpx.get(f"{api}/readyz").json()["version"]

        async def warm_up() -> None:  # the projector has joined its group and the pipeline flows
            async with EventPublisher(conv) as publisher:
                await publisher.publish(claims("warmup", 1, cells)[0])

        asyncio.run(warm_up())
        for _ in range(5):  # joining the consumer group can take a while on a loaded machine
            response = httpx.get(f"{api}/v1/snapshot", params={"since": version, "wait": "60s"}, headers=AUTH,
                                 timeout=90)
            if response.status_code == 200:
                break
        else:
            raise RuntimeError("the warm-up event never reached the API: see projector.log")
        version = httpx.get(f"{api}/readyz").json()["version"]
        total = rate * seconds
        follower_file = work / "follower.py"
        follower_file.write_text(FOLLOWER)
        out = work / "converged.json"
        follower = subprocess.Popen([sys.executable, str(follower_file), "127.0.0.1", str(port), TOKEN,
                                     str(followers), str(version),
                                     str(total), str(out), str(seconds + 60)],
                                    stdout=subprocess.PIPE, stderr=open(work / "follower.log", "ab"))  # noqa: SIM115
        stack.callback(stop, follower)
        assert follower.stdout is not None and follower.stdout.readline().strip() == b"ready"
        time.sleep(2)  # every follower is parked in its long-poll

        events = claims("conv", total, cells)
        acked: dict[str, float] = {}

        async def produce() -> None:
            async with EventPublisher(conv) as publisher:
                async def one(event: Any) -> None:
                    await publisher.publish(event)
                    acked[event.value] = time.time()

                pending = set()
                started = time.monotonic()
                tick = 0.01
                per_tick = max(1, int(rate * tick))
                for offset in range(0, total, per_tick):
                    target = started + (offset / rate)
                    delay = target - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    for event in events[offset:offset + per_tick]:
                        pending.add(asyncio.create_task(one(event)))
                await asyncio.gather(*pending)
                results["converge_produce_s"] = time.monotonic() - started

        watched = {"read API": [api_process.pid], "projector": [projector.pid], "followers": [follower.pid],
                   "producer (this process)": [os.getpid()],
                   "broker": [kafka._process.pid] if kafka._process is not None else []}
        cpu_before = {name: cpu_seconds(pids) for name, pids in watched.items()}
        postgres_before = {pid: cpu_seconds([pid]) for pid in postgres_pids()}
        busy_before = machine_busy()
        wall = time.monotonic()
        asyncio.run(produce())
        wall = time.monotonic() - wall
        results["converge_cpu_share"] = {
            name: round((cpu_seconds(pids) - cpu_before[name]) / wall, 3) for name, pids in watched.items()
        }
        # Backends that ended meanwhile are not counted; new ones count from zero.
        postgres_after = {pid: cpu_seconds([pid]) for pid in postgres_pids()}
        results["converge_cpu_share"]["postgresql (all backends, any database)"] = round(
            sum(cpu - postgres_before.get(pid, 0.0) for pid, cpu in postgres_after.items()) / wall, 3)
        results["converge_cpu_share"]["whole machine (cores busy)"] = round((machine_busy() - busy_before) / wall, 3)
        follower.wait(seconds + 90)
        converged: dict[str, float] = json.loads(out.read_text())
        # Where the time went: the version holding each event, and when that version committed.
        with psycopg.connect(conv.libpq_url) as conn:
            committed_at = {
                value: at.timestamp()
                for value, at in conn.execute(
                    "SELECT c.value, v.committed_at FROM claims c JOIN routing_versions v ON v.version = c.version "
                    "WHERE c.bucket = 'NAMESPACE' AND c.value LIKE 'conv-%'"
                )
            }
    latencies = [(converged[k] - acked[k]) * 1000 for k in acked if k in converged]
    to_commit = [(committed_at[k] - acked[k]) * 1000 for k in acked if k in committed_at]
    to_followers = [(converged[k] - committed_at[k]) * 1000 for k in converged if k in committed_at]
    results["converge_breakdown_ms"] = {
        "ack_to_projector_commit_p50": percentile(to_commit, 50) if to_commit else None,
        "ack_to_projector_commit_p99": percentile(to_commit, 99) if to_commit else None,
        "commit_to_all_followers_p50": percentile(to_followers, 50) if to_followers else None,
        "commit_to_all_followers_p99": percentile(to_followers, 99) if to_followers else None,
    }
    results["converge"] = {
        "events": total,
        "rate_per_s": rate,
        "followers": followers,
        "converged_events": len(latencies),
        "p50_ms": percentile(latencies, 50) if latencies else None,
        "p90_ms": percentile(latencies, 90) if latencies else None,
        "p99_ms": percentile(latencies, 99) if latencies else None,
        "max_ms": max(latencies) if latencies else None,
        "mean_ms": statistics.fmean(latencies) if latencies else None,
    }


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU of processes (from /proc), 0 for those gone."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def machine_busy() -> float:
    """Busy CPU-seconds of the whole machine since boot (/proc/stat), divided later by wall time."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in ("postgres", "postmaster"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    pg = "?"
    try:
        with psycopg.connect(os.environ.get("TOPOLOGY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")) as conn:
            pg = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    except psycopg.Error:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "python": platform.python_version(),
            "postgresql": pg, "kernel": platform.release()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespaces", type=int, default=1_000_000)
    parser.add_argument("--cells", type=int, default=100)
    parser.add_argument("--phases", default="snapshot,revalidate,converge")
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--wrk-connections", type=int, default=64)
    parser.add_argument("--rate", type=int, default=1000, help="events per second in the convergence phase")
    parser.add_argument("--seconds", type=int, default=20, help="length of the convergence phase")
    parser.add_argument("--followers", type=int, default=100)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    admin = os.environ.get("TOPOLOGY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    results: dict[str, Any] = {"machine": machine(), "namespaces": args.namespaces, "cells": args.cells}
    work = Path(tempfile.mkdtemp(prefix="topology-bench-"))
    database = f"topology_bench_{uuid.uuid4().hex[:6]}"
    url = create_database(admin, database)
    try:
        seed(url, args.namespaces, args.cells)
        settings = Settings(database_url=url, api_tokens=json.dumps({TOKEN: ["snapshot:read"]}),
                            snapshot_poll_interval_s=5.0, api_host="127.0.0.1")
        phases = args.phases.split(",")
        if "snapshot" in phases:
            phase_snapshot(settings, work, args.cells, results)
            say(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1))
        if "revalidate" in phases:
            phase_revalidate(settings, work, results, args.wrk_seconds, args.wrk_connections)
            say(json.dumps(results.get("revalidate"), indent=1))
        if "converge" in phases:
            phase_converge(settings, work, args.cells, results, args.rate, args.seconds, args.followers)
            say(json.dumps(results.get("converge"), indent=1))
            say(json.dumps(results.get("converge_breakdown_ms"), indent=1))
    except BaseException:
        say(f"failed; logs kept in {work}")
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
