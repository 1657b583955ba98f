"""Projector apply throughput against the two physical limits, measured in the same run,
on Tansu and on Apache Kafka.

    python -m bench.projector_throughput [--broker tansu|apache|both] [--rounds 1]
                                         [--events 1000000] [--batch 5000] [--profile] [--json FILE]

Opt-in and slow; not part of the test run. For each broker in turn (``--broker``; both
when Apache Kafka is available, see bench/__init__.py) it starts a fresh broker and a
fresh scratch database on the local PostgreSQL (TOPOLOGY_BENCH_POSTGRES_URL, default
postgresql://postgres@127.0.0.1:5432/postgres), which it drops, and runs the same
workload (the same N records, built once):

1. Pre-loads N ClaimCreated events (distinct namespaces, 8 partitions) into the broker.
2. Baseline (a), the log-read limit: a bare aiokafka consumer reads and decodes them
   (EventCodec.decode) and does nothing else.
3. The projector (in this process) from start to caught up: the stored positions
   cover every record. The start includes joining the consumer group (about 5 s on
   Tansu), which is why small N understate the rate; the rate after its first committed
   batch is reported beside it, and so are the CPU this process used per event (the
   projector's; on a shared machine it moves less than the rate) and the broker's.
4. Baseline (b), the ingest limit: PostgreSQL COPY of every row the projector wrote
   (all its tables, binary format) into empty tables with the same indexes; plus,
   for reference, COPY of the claims rows alone.

Reports events/s of each and the projector's ratio to the slower baseline of its own
run, per broker, in one table with the ratio Apache Kafka / Tansu, and the load average
before and after each run (the figures of a shared machine are noisy; compare the
ratios). With --profile, runs the projector under pyinstrument and prints the hot spots.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
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
from bench.router_sync import cpu_seconds
from topology_store.projector.consumer import Projector
from topology_store.projector.main import tune_gc_for_batches
from topology_store.projector.migrate import upgrade_to_head
from topology_store.projector.store import ProjectionStore
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics
from topology_store.schemas.codec import EventCodec

PARTITIONS = 8


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}"


def claim_records(count: int) -> list[tuple[bytes, bytes]]:
    codec = EventCodec()
    now = datetime.now(UTC).replace(microsecond=0)
    records = []
    for n in range(count):
        value = f"bench-{n}"
        payload = {
            "event_id": uuid.uuid4(), "occurred_at": now, "source": "bench", "trace_id": None,
            "bucket": "NAMESPACE", "value": value, "cell_id": f"cell-{n % 100}", "owner_type": "GROUP",
            "owner_id": n,
        }
        records.append((f"NAMESPACE:{value}".encode(), codec.encode("ClaimCreated", payload)))
    return records


async def preload(settings: Settings, records: list[tuple[bytes, bytes]]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=20,
                                max_batch_size=1 << 20, compression_type=None)
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        for key, value in records:
            pending.append(await producer.send(settings.claims_topic, value=value, key=key,
                                               headers=[("event_type", b"ClaimCreated")]))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def bare_read(settings: Settings, total: int) -> float:
    codec = EventCodec()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 << 20, fetch_max_bytes=32 << 20)
    await consumer.start()
    tps = [TopicPartition(settings.claims_topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, 0)
    started = time.perf_counter()
    seen = 0
    try:
        while seen < total:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batch.values():
                for record in records:
                    codec.decode(record.value)
            seen += sum(len(r) for r in batch.values())
    finally:
        await consumer.stop()
    return time.perf_counter() - started


def copy_claim_rows(admin_url: str, database: str, records: list[tuple[bytes, bytes]]) -> float:
    """COPY of the routing table alone (the claims rows): the narrowest ingest figure."""
    codec = EventCodec()
    rows = []
    for _, value in records:
        p = codec.decode(value).payload
        rows.append((p["bucket"], p["value"], p["cell_id"], p["owner_type"], p["owner_id"], p["occurred_at"], 1))
    with psycopg.connect(psycopg.conninfo.make_conninfo(admin_url, dbname=database)) as conn:
        conn.execute("CREATE TABLE copy_target (LIKE claims INCLUDING ALL)")
        conn.commit()
        started = time.perf_counter()
        with conn.cursor().copy(
            "COPY copy_target (bucket, value, cell_id, owner_type, owner_id, claimed_at, version) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
        conn.commit()
        return time.perf_counter() - started


def copy_resulting_rows(settings: Settings) -> tuple[float, dict[str, int]]:
    """Baseline (b), the ingest limit: COPY every row the projector wrote (all tables:
    routing table, change log, processed events, archive, audit keys, decision outbox)
    into empty tables with the same indexes, in one transaction. Timed: the COPYs in."""
    counts: dict[str, int] = {}
    with psycopg.connect(settings.libpq_url) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename NOT IN ('alembic_version', 'copy_target') "
            "ORDER BY tablename")]
        dumps: dict[str, bytes] = {}
        for table in tables:
            buffer = io.BytesIO()
            with conn.cursor().copy(sql.SQL("COPY {} TO STDOUT (FORMAT binary)").format(sql.Identifier(table))) as out:
                for chunk in out:
                    buffer.write(chunk)
            counts[table] = int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
                                .fetchone()[0])  # type: ignore[index]
            dumps[table] = buffer.getvalue()
        conn.execute("CREATE SCHEMA bench_copy")
        for table in tables:
            conn.execute(sql.SQL("CREATE TABLE bench_copy.{} (LIKE public.{} INCLUDING ALL)").format(
                sql.Identifier(table), sql.Identifier(table)))
        conn.commit()
        started = time.perf_counter()
        for table in tables:
            with conn.cursor().copy(sql.SQL("COPY bench_copy.{} FROM STDIN (FORMAT binary)").format(
                    sql.Identifier(table))) as copy:
                copy.write(dumps[table])
        conn.commit()
        return time.perf_counter() - started, {t: n for t, n in counts.items() if n}


@dataclass
class Projected:
    elapsed_s: float  # start to caught up
    first_s: float  # start to the first committed batch seen
    first_count: int  # events that batch covered
    cpu_s: float  # this process's CPU meanwhile: the projector's (its polling here is negligible)
    broker_cpu_s: float


async def project(settings: Settings, total: int, profile: bool, broker_pid: int | None = None) -> Projected:
    """The projector from start to caught up, timed; the first committed batch seen splits
    off the start (group join, first fetch), and the CPU it used is measured beside the wall
    time (on a shared machine its CPU per event moves less than its rate)."""
    engine = create_engine(settings.sqlalchemy_url)
    tune_gc_for_batches()  # as `topology project` does
    stop = asyncio.Event()
    projector = Projector(settings, ProjectionStore(engine, settings.claim_secret))
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="enabled")
        profiler.start()
    broker_cpu = cpu_seconds([broker_pid]) if broker_pid else 0.0
    cpu = time.process_time()
    started = time.perf_counter()
    first: tuple[float, int] | None = None
    task = asyncio.create_task(projector.run(stop))
    try:
        with psycopg.connect(settings.libpq_url) as conn:
            while True:
                # The stored positions, not count(*): cheap however far the run got.
                count = conn.execute("SELECT coalesce(sum(next_offset), 0) FROM partition_offsets").fetchone()[0]  # type: ignore[index]
                conn.commit()
                if count and first is None:
                    first = (time.perf_counter() - started, int(count))
                if count >= total:
                    break
                if task.done():
                    task.result()
                await asyncio.sleep(0.2)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        broker_cpu = (cpu_seconds([broker_pid]) if broker_pid else 0.0) - broker_cpu
    finally:
        stop.set()
        await task
        await engine.dispose()
        if profiler is not None:
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False, show_all=False)[:6000])
    first_s, first_count = first if first is not None else (elapsed, total)
    return Projected(elapsed, first_s, first_count, cpu, broker_cpu)


PRELOAD = "preload (producer, raw bytes)"
BASELINE_A = "baseline a: bare consumer read + decode"
BASELINE_B = "baseline b: COPY of all resulting rows"
CLAIMS_COPY = "  (COPY of the claims rows alone)"
PROJECTOR = "projector: start to caught up"
STEADY = "  (projector after its first batch)"


def steady_rate(total: int, elapsed_s: float, first_s: float, first_count: int) -> float | None:
    """Events per second after the first committed batch (the group join and the first
    fetch left out); None when the first look already saw nearly everything."""
    if elapsed_s - first_s <= 0 or total - first_count < total / 10:
        return None
    return (total - first_count) / (elapsed_s - first_s)


def on_broker(name: str, args: argparse.Namespace, admin_url: str,
              records: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The whole workload on a fresh broker of kind ``name`` and a fresh scratch database."""
    database = f"bench_{uuid.uuid4().hex[:8]}"
    log = Path(tempfile.mkdtemp(prefix=f"bench-projector-{name}-")) / f"{name}.log"
    result: dict[str, Any] = {"broker": name, "load_before": load_average(), "log": str(log)}
    print(f"[{name}] starting; load average {result['load_before']}", flush=True)
    with running_broker(name, log) as broker:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        try:
            url = psycopg.conninfo.conninfo_to_dict(admin_url)
            settings = Settings(
                kafka_bootstrap=broker.bootstrap,
                database_url=f"postgresql://{url.get('user', 'postgres')}@{url.get('host', '127.0.0.1')}:"
                f"{url.get('port', 5432)}/{database}",
                claims_partitions=PARTITIONS, batch_max_events=args.batch, projector_metrics_port=0,
                consumer_group="bench", producer_idempotence="off",
            )
            upgrade_to_head(settings.sqlalchemy_url)
            asyncio.run(ensure_topics(settings))
            load_s = asyncio.run(preload(settings, records))
            read_s = asyncio.run(bare_read(settings, args.events))
            claims_copy_s = copy_claim_rows(admin_url, database, records)
            projected = asyncio.run(project(settings, args.events, args.profile, broker.pid))
            copy_s, rows = copy_resulting_rows(settings)
        finally:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    print(f"[{name}] rows the projector wrote: {sum(rows.values()):,} "
          f"({', '.join(f'{t} {n:,}' for t, n in rows.items())})", flush=True)
    rates: dict[str, float | None] = {
        PRELOAD: args.events / load_s,
        BASELINE_A: args.events / read_s,
        BASELINE_B: args.events / copy_s,
        CLAIMS_COPY: args.events / claims_copy_s,
        PROJECTOR: args.events / projected.elapsed_s,
        STEADY: steady_rate(args.events, projected.elapsed_s, projected.first_s, projected.first_count),
    }
    slower = min(args.events / read_s, args.events / copy_s)
    result.update(rates=rates, ratio=args.events / projected.elapsed_s / slower, first_batch_s=projected.first_s,
                  cpu_us_per_event=projected.cpu_s / args.events * 1e6,
                  cpu_share=100 * projected.cpu_s / projected.elapsed_s,
                  broker_cpu_us_per_event=projected.broker_cpu_s / args.events * 1e6,
                  load_after=load_average())
    return result


def report(results: list[dict[str, Any]], events: int, batch: int) -> dict[str, Any]:
    brokers = [r["broker"] for r in results]
    by = {r["broker"]: r for r in results}
    rows: list[Any] = [(name, {b: by[b]["rates"][name] for b in brokers}) for name in results[0]["rates"]]
    rows.append(("projector / slower baseline (same run)", {b: by[b]["ratio"] for b in brokers}, "{:.2f}".format))
    rows.append(("start to first committed batch", {b: by[b]["first_batch_s"] for b in brokers}, "{:.1f} s".format))
    rows.append(("projector CPU per event (its process)", {b: by[b]["cpu_us_per_event"] for b in brokers},
                 "{:.0f} µs".format))
    rows.append(("  its CPU over wall time (% of one core)", {b: by[b]["cpu_share"] for b in brokers},
                 "{:.0f}%".format))
    rows.append(("broker CPU per event meanwhile", {b: by[b]["broker_cpu_us_per_event"] for b in brokers},
                 "{:.0f} µs".format))
    print()
    print(f"{events:,} ClaimCreated events, {batch:,} per batch; events/s unless said otherwise:")
    for line in broker_table(rows, brokers, "{:,.0f}".format):
        print(line)
    for r in results:
        print(f"load average, {r['broker']} run: before {r['load_before']}; after {r['load_after']}")
    return {"events": events, "batch": batch, "runs": [{
        "broker": r["broker"], **{k.strip(): round(v) for k, v in r["rates"].items() if v is not None},
        "ratio_to_slower_baseline": round(r["ratio"], 3), "first_batch_s": round(r["first_batch_s"], 1),
        "projector_cpu_us_per_event": round(r["cpu_us_per_event"], 1),
        "projector_cpu_percent_of_a_core": round(r["cpu_share"]),
        "broker_cpu_us_per_event": round(r["broker_cpu_us_per_event"], 1),
        "load_before": r["load_before"], "load_after": r["load_after"]} for r in results]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_broker_argument(parser)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    brokers = selected_brokers(args.broker)
    admin_url = os.environ.get("TOPOLOGY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    print(f"machine: {machine()}; brokers: {', '.join(brokers)}", flush=True)
    records = claim_records(args.events)  # the same records on every broker
    runs = [on_broker(name, args, admin_url, records) for name in interleaved(brokers, args.rounds)]
    if args.rounds > 1:
        for run in runs:
            print(f"round on {run['broker']}: projector {run['rates'][PROJECTOR]:,.0f} events/s, "
                  f"{run['ratio']:.2f} of the slower baseline; load average before {run['load_before']}")
    results = best_per_broker(runs, lambda r: r["broker"], lambda r: r["rates"][PROJECTOR])
    summary = report(results, args.events, args.batch)
    summary["rounds"] = args.rounds
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
