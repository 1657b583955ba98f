"""Projector apply throughput against the two physical limits, measured in the same run.

    python -m bench.projector_throughput [--events 1000000] [--batch 5000] [--profile]

Opt-in and slow; not part of the test run. It starts its own embedded Kafka broker
and uses the local PostgreSQL (TOPOLOGY_BENCH_POSTGRES_URL, default
postgresql://postgres@127.0.0.1:5432/postgres), in a scratch database it drops.

1. Pre-loads N ClaimCreated events (distinct namespaces, 8 partitions) into the broker.
2. Baseline (a), the log-read limit: a bare aiokafka consumer reads and decodes them
   (EventCodec.decode) and does nothing else.
3. The projector (in this process) from start to caught up: the stored positions
   cover every record. The start includes joining the consumer group (about 5 s on
   Tansu), which is why small N understate the rate.
4. Baseline (b), the ingest limit: PostgreSQL COPY of every row the projector wrote
   (all its tables, binary format) into empty tables with the same indexes; plus,
   for reference, COPY of the claims rows alone.

Reports events/s of each and the projector's ratio to the slower baseline. With
--profile, runs the projector under pyinstrument and prints the hot spots.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import time
import uuid
from datetime import UTC, datetime

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from psycopg import sql

from topology_store.cli.devstack import EmbeddedKafka
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


async def project(settings: Settings, total: int, profile: bool) -> float:
    engine = create_engine(settings.sqlalchemy_url)
    tune_gc_for_batches()  # as `topology project` does
    stop = asyncio.Event()
    projector = Projector(settings, ProjectionStore(engine, settings.claim_secret))
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="enabled")
        profiler.start()
    started = time.perf_counter()
    task = asyncio.create_task(projector.run(stop))
    try:
        with psycopg.connect(settings.libpq_url) as conn:
            while True:
                # The stored positions, not count(*): cheap however far the run got.
                count = conn.execute("SELECT coalesce(sum(next_offset), 0) FROM partition_offsets").fetchone()[0]  # type: ignore[index]
                conn.commit()
                if count >= total:
                    break
                if task.done():
                    task.result()
                await asyncio.sleep(0.2)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await task
        await engine.dispose()
        if profiler is not None:
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False, show_all=False)[:6000])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    admin_url = os.environ.get("TOPOLOGY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    database = f"bench_{uuid.uuid4().hex[:8]}"
    kafka = EmbeddedKafka().start()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        url = psycopg.conninfo.conninfo_to_dict(admin_url)
        settings = Settings(
            kafka_bootstrap=kafka.bootstrap,
            database_url=f"postgresql://{url.get('user', 'postgres')}@{url.get('host', '127.0.0.1')}:"
            f"{url.get('port', 5432)}/{database}",
            claims_partitions=PARTITIONS, batch_max_events=args.batch, projector_metrics_port=0,
            consumer_group="bench", producer_idempotence="off",
        )
        upgrade_to_head(settings.sqlalchemy_url)
        asyncio.run(ensure_topics(settings))
        print(f"machine: {machine()}")
        records = claim_records(args.events)
        load_s = asyncio.run(preload(settings, records))
        read_s = asyncio.run(bare_read(settings, args.events))
        claims_copy_s = copy_claim_rows(admin_url, database, records)
        project_s = asyncio.run(project(settings, args.events, args.profile))
        copy_s, rows = copy_resulting_rows(settings)
        print(f"rows the projector wrote: {sum(rows.values()):,} ({', '.join(f'{t} {n:,}' for t, n in rows.items())})")
        rates = {
            "preload (producer, raw bytes)": args.events / load_s,
            "baseline a: bare consumer read + decode": args.events / read_s,
            "baseline b: COPY of all resulting rows": args.events / copy_s,
            "  (COPY of the claims rows alone)": args.events / claims_copy_s,
            "projector: start to caught up": args.events / project_s,
        }
        slower = min(rates["baseline a: bare consumer read + decode"], rates["baseline b: COPY of all resulting rows"])
        for name, rate in rates.items():
            print(f"{name:45s} {rate:>12,.0f} events/s")
        print(f"{'projector / slower baseline':45s} {rates['projector: start to caught up'] / slower:>12.2f}")
        print(json.dumps({"events": args.events, "batch": args.batch, **{k.strip(): round(v) for k, v in rates.items()},
                          "ratio_to_slower_baseline": round(rates["projector: start to caught up"] / slower, 3)}))
    finally:
        kafka.stop()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))


if __name__ == "__main__":
    main()
