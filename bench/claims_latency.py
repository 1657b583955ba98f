"""Latency of a synchronous claim: POST /v1/claims until the decision, at a fixed offered rate.

    python -m bench.claims_latency [--rate 200] [--seconds 20]

Opt-in and slow; not part of the test run. Starts an embedded Kafka broker, a
projector and the read API as child processes on the local PostgreSQL (scratch
database, dropped afterwards), then offers --rate begin requests per second, each
for a fresh namespace, and reports p50/p90/p99 of the time until the answer. The
baseline measured in the same run is a GET /healthz round trip on the same server
(the HTTP floor). The reference Topology Service targets 20 ms for its calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

from topology_store.cli.devstack import EmbeddedKafka, free_port
from topology_store.projector.migrate import upgrade_to_head
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics

TOKEN = f"bench-{uuid.uuid4().hex}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def offer(url: str, rate: int, seconds: float, make_body: object) -> list[float]:
    latencies: list[float] = []
    failures = 0
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal failures
        started = time.perf_counter()
        try:
            response = await client.post(f"{url}/v1/claims", json=make_body(), headers=headers)  # type: ignore[operator]
        except httpx.HTTPError:
            failures += 1
            return
        if response.status_code == 201:
            latencies.append(time.perf_counter() - started)
        else:
            failures += 1

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:
        tasks = []
        start = time.perf_counter()
        for n in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client)))
        await asyncio.gather(*tasks)
    if failures:
        print(f"{failures} requests did not get 201", file=sys.stderr)
    return latencies


async def floor(url: str, count: int = 500) -> list[float]:
    latencies = []
    async with httpx.AsyncClient() as client:
        for _ in range(count):
            started = time.perf_counter()
            await client.get(f"{url}/healthz")
            latencies.append(time.perf_counter() - started)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    admin = os.environ.get("TOPOLOGY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    database = f"bench_{uuid.uuid4().hex[:8]}"
    kafka = EmbeddedKafka().start()
    children: list[subprocess.Popen[bytes]] = []
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        port = free_port()
        settings = Settings(
            kafka_bootstrap=kafka.bootstrap, database_url=f"postgresql://postgres@127.0.0.1:5432/{database}",
            producer_idempotence="off", projector_metrics_port=0, api_port=port, batch_wait_ms=5,
        )
        upgrade_to_head(settings.sqlalchemy_url)
        asyncio.run(ensure_topics(settings))
        env = {**os.environ, "TOPOLOGY_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
               "TOPOLOGY_DATABASE_URL": settings.database_url, "TOPOLOGY_PRODUCER_IDEMPOTENCE": "off",
               "TOPOLOGY_PROJECTOR_METRICS_PORT": "0", "TOPOLOGY_API_PORT": str(port), "TOPOLOGY_BATCH_WAIT_MS": "5",
               "TOPOLOGY_API_TOKENS": json.dumps({TOKEN: ["snapshot:read", "claims:read", "claims:write"]}),
               "TOPOLOGY_LOG_FORMAT": "text"}
        logs = Path(tempfile.mkdtemp(prefix="bench-claims-"))
        for command in ("project", "serve"):
            log = open(logs / f"{command}.log", "wb")  # noqa: SIM115 - owned by the child
            children.append(subprocess.Popen([sys.executable, "-m", "topology_store.cli", command], env=env,
                                             stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)

        def body() -> dict[str, object]:
            return {"cell_id": "cell-1", "owner_type": "GROUP", "owner_id": 1,
                    "claims": [{"bucket": "NAMESPACE", "value": f"ns-{uuid.uuid4().hex[:16]}"}]}

        asyncio.run(offer(url, 5, 4, body))  # warm-up: the projector joins its group
        healthz = asyncio.run(floor(url))
        claims = asyncio.run(offer(url, args.rate, args.seconds, body))
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        for name, values in (("GET /healthz (HTTP floor)", healthz), (f"POST /v1/claims @ {args.rate}/s", claims)):
            print(f"{name:32s} n={len(values):5d} p50={percentile(values, .5)*1000:7.1f} ms "
                  f"p90={percentile(values, .9)*1000:7.1f} ms p99={percentile(values, .99)*1000:7.1f} ms "
                  f"mean={statistics.fmean(values)*1000:7.1f} ms")
        print(f"p99 claim / reference target 20 ms: {percentile(claims, .99) * 1000 / 20:.1f}x")
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(20)
        kafka.stop()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))


if __name__ == "__main__":
    main()
