"""Cost growth: apply cost per event and full snapshot build time at 10k, 100k and 1M live routes (issue 7).

    python -m bench.cost_growth [--sizes 10000,100000,1000000] [--extra 20000] [--batch 5000]
                                [--repeats 3] [--plot docs/cost-growth.png] [--output FILE]

About 4 minutes with the defaults on a 2-core machine (the 1M fill is most of it).

Opt-in and slow; not part of the test run. Uses the local PostgreSQL
(TOPOLOGY_BENCH_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/postgres),
in a scratch database it drops. No broker: what a table's size can slow down is the
projector's transaction, so events go straight into the real ProjectionStore, prepared
the way projector.consumer.Projector prepares a fetched batch (a ConsumerRecord per
event, read_record = decode + validate, the record archived) — Kafka's own cost per
event does not depend on the table and is measured by bench.projector_throughput.

For each size, ascending, in one database:

1. fill: ClaimCreated events on distinct namespaces through ProjectionStore.commit_batch
   in --batch sized batches until the table holds that many live routes. Every table
   the projector writes (claims, processed_events, event_archive, event_keys, the
   decision outbox, the routing change log) grows exactly as in production, not only
   the routing table; the fill's own cost per event is recorded along the way.
   Then VACUUM (ANALYZE), so each size is measured in the steady state autovacuum
   would keep, not in the middle of an autovacuum run.
2. apply: --extra more ClaimCreated events in --batch sized batches; the time inside
   commit_batch is the apply cost (the decode before it is reported separately).
   Baseline, the same run and size: COPY of the same batches' claims rows into the
   claims table (same indexes, rolled back) — the physical floor of adding rows to
   a table that large.
3. snapshot: a fresh query_api.snapshot.SnapshotCache's first refresh (the full load
   a starting read API does) plus building the full JSON representation. Baseline: a
   bare psycopg fetch of the same NAMESPACE rows. Both best of --repeats: on a shared
   machine other work only ever adds time.

Every figure is reported next to its baseline and as a ratio to the smallest size. The
apply cost per event may grow no more than an index lookup, log(N): that allowance,
log(N) / log(N0), is printed next to each ratio. Writes a two-panel plot (--plot).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from aiokafka.structs import ConsumerRecord

from bench.steady_latency import create_database, drop_database, format_ratio, machine, say
from topology_store.core.fold import PositionedEvent
from topology_store.projector.archive import RawRecord
from topology_store.projector.consumer import read_record
from topology_store.projector.main import tune_gc_for_batches
from topology_store.projector.migrate import upgrade_to_head
from topology_store.projector.store import DeadLetter, PartitionAdvance, ProjectionStore
from topology_store.query_api.snapshot import NAMESPACES_QUERY, SnapshotCache
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EVENT_TYPE_HEADER, EventCodec
from topology_store.schemas.router_sync import JSON

PARTITIONS = 8
CELLS = 100


# --- pure helpers (tests/unit/test_bench_harness.py) -------------------------------------------------


def log_allowance(size: int, reference: int) -> float:
    """How much an index lookup's cost grows from ``reference`` rows to ``size`` rows
    (B-tree depth ~ log N): the most the per-event apply cost may grow."""
    return math.log(size) / math.log(reference)


def fill_plan(sizes: Sequence[int], extra: int) -> list[tuple[int, int]]:
    """(events to fill before measuring, live routes then) per size, ascending: the
    extra events applied at one size count toward the next size's fill."""
    plan = []
    live = 0
    for size in sorted(sizes):
        if size < live:
            raise ValueError(f"size {size} is below the {live} routes the previous size leaves")
        plan.append((size - live, size))
        live = size + extra
    return plan


def per_event_us(seconds: float, events: int) -> float:
    return seconds / events * 1e6


# --- events ----------------------------------------------------------------------------------------


@dataclass
class Log:
    """Synthesizes the claims topic: records as a consumer fetches them."""

    topic: str
    codec: EventCodec = field(default_factory=EventCodec)
    offsets: list[int] = field(default_factory=lambda: [0] * PARTITIONS)
    produced: int = 0

    def batch(self, count: int) -> list[ConsumerRecord[bytes, bytes]]:
        now = datetime.now(UTC).replace(microsecond=0)
        timestamp = int(now.timestamp() * 1000)
        records = []
        for _ in range(count):
            n = self.produced
            self.produced += 1
            value = f"growth-{n}"
            payload = {"event_id": uuid.uuid4(), "occurred_at": now, "source": "bench", "trace_id": None,
                       "bucket": "NAMESPACE", "value": value, "cell_id": f"cell-{n % CELLS + 1}",
                       "owner_type": "GROUP", "owner_id": n}
            key = f"NAMESPACE:{value}".encode()
            body = self.codec.encode("ClaimCreated", payload)
            partition = n % PARTITIONS
            records.append(ConsumerRecord(self.topic, partition, self.offsets[partition], timestamp, 0, key, body, None,
                                          len(key), len(body), [(EVENT_TYPE_HEADER, b"ClaimCreated")]))
            self.offsets[partition] += 1
        return records


@dataclass
class Prepared:
    events: list[PositionedEvent]
    dead: list[DeadLetter]
    archive: list[RawRecord]
    advances: dict[tuple[str, int], PartitionAdvance]


def prepare(codec: EventCodec, settings: Settings, records: Sequence[ConsumerRecord[bytes, bytes]]) -> Prepared:
    """What Projector._commit builds from a fetched batch before calling the store."""
    prepared = Prepared([], [], [], {})
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for record in records:
        prepared.archive.append(RawRecord.of(record))
        item = read_record(codec, settings, record)
        (prepared.dead if isinstance(item, DeadLetter) else prepared.events).append(item)  # type: ignore[arg-type]
        first.setdefault(record.partition, record.offset)
        last[record.partition] = record.offset
    prepared.advances = {(settings.claims_topic, p): PartitionAdvance(first[p], last[p] + 1) for p in first}
    return prepared


# --- measuring -------------------------------------------------------------------------------------


@dataclass
class Applied:
    events: int = 0
    commit_s: float = 0.0
    decode_s: float = 0.0
    batches: list[tuple[int, float]] = field(default_factory=list)  # (live routes before, µs per event)
    claims_rows: list[tuple[Any, ...]] = field(default_factory=list)  # for the COPY baseline


async def apply(store: ProjectionStore, settings: Settings, log: Log, count: int, batch: int, live: int,
                keep_rows: bool = False) -> Applied:
    applied = Applied()
    while applied.events < count:
        take = min(batch, count - applied.events)
        records = log.batch(take)
        started = time.perf_counter()
        prepared = prepare(log.codec, settings, records)
        decoded = time.perf_counter()
        result = await store.commit_batch(prepared.events, prepared.dead, prepared.advances, prepared.archive)
        finished = time.perf_counter()
        if prepared.dead:
            raise RuntimeError(f"{len(prepared.dead)} dead letters: {prepared.dead[0].error}")
        applied.decode_s += decoded - started
        applied.commit_s += finished - decoded
        applied.batches.append((live + applied.events, per_event_us(finished - decoded, take)))
        applied.events += take
        if keep_rows:
            applied.claims_rows.extend(
                (p.event.bucket.value, p.event.value, p.event.cell_id, p.event.owner_type.value,  # type: ignore[attr-defined]
                 p.event.owner_id, p.event.occurred_at, result.version, "COMMITTED")  # type: ignore[attr-defined]
                for p in prepared.events)
    return applied


def copy_floor(settings: Settings, rows: list[tuple[Any, ...]], batch: int) -> float:
    """COPY of the applied batches' claims rows into claims, batch by batch, each rolled
    back: what adding those rows to a table of that size costs at the least. The
    rows are the ones just applied, so they are renamed to be new keys."""
    total = 0.0
    with psycopg.connect(settings.libpq_url) as conn:
        for start in range(0, len(rows), batch):
            buffer = io.StringIO()
            for bucket, value, cell, owner_type, owner_id, at, version, status in rows[start:start + batch]:
                buffer.write(f"{bucket}\tfloor-{value}\t{cell}\t{owner_type}\t{owner_id}\t{at.isoformat()}\t{version}\t"
                             f"{status}\n")
            data = buffer.getvalue()
            started = time.perf_counter()
            with conn.cursor().copy("COPY claims (bucket, value, cell_id, owner_type, owner_id, claimed_at, version, "
                                    "status) FROM STDIN") as copy:
                copy.write(data)
            total += time.perf_counter() - started
            conn.rollback()
    return total


async def snapshot_build(settings: Settings) -> tuple[float, float, int, int]:
    """(full load s, JSON representation s, routes, JSON bytes) of a fresh read API cache."""
    engine = create_engine(settings.sqlalchemy_url)
    try:
        cache = SnapshotCache(engine, settings.libpq_url, settings.snapshot_poll_interval_s)
        started = time.perf_counter()
        snapshot = await cache.refresh()
        loaded = time.perf_counter()
        assert snapshot is not None
        body = snapshot.representations.raw(JSON)
        built = time.perf_counter()
        return loaded - started, built - loaded, snapshot.namespace_count, len(body)
    finally:
        await engine.dispose()


def bare_fetch(settings: Settings) -> float:
    """Baseline of the snapshot load: the same rows, fetched by psycopg, nothing built."""
    with psycopg.connect(settings.libpq_url) as conn:
        started = time.perf_counter()
        conn.execute(NAMESPACES_QUERY).fetchall()
        return time.perf_counter() - started


def vacuum(settings: Settings) -> float:
    started = time.perf_counter()
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
    return time.perf_counter() - started


def table_sizes(settings: Settings) -> dict[str, int]:
    with psycopg.connect(settings.libpq_url) as conn:
        rows = conn.execute("SELECT relname, pg_total_relation_size(relid) FROM pg_catalog.pg_statio_user_tables "
                            "ORDER BY 2 DESC").fetchall()
    return {name: int(size) for name, size in rows if size > 1 << 20}


async def run(settings: Settings, sizes: list[int], extra: int, batch: int, repeats: int) -> dict[str, Any]:
    tune_gc_for_batches()  # as `topology project` does
    engine = create_engine(settings.sqlalchemy_url)
    store = ProjectionStore(engine, settings.claim_secret)
    log = Log(settings.claims_topic)
    await store.stored_offsets([(settings.claims_topic, p) for p in range(PARTITIONS)])
    points: list[dict[str, Any]] = []
    fill_curve: list[tuple[int, float]] = []
    live = 0
    try:
        for to_fill, size in fill_plan(sizes, extra):
            say(f"filling {to_fill:,} events to {size:,} live routes")
            started = time.perf_counter()
            filled = await apply(store, settings, log, to_fill, batch, live)
            fill_s = time.perf_counter() - started
            fill_curve.extend(filled.batches)
            live = size
            vacuum_s = vacuum(settings)
            say(f"filled in {fill_s:.0f}s ({to_fill / fill_s:,.0f} events/s), VACUUM (ANALYZE) {vacuum_s:.1f}s; "
                f"applying {extra:,}")
            measured = await apply(store, settings, log, extra, batch, live, keep_rows=True)
            floor_s = copy_floor(settings, measured.claims_rows, batch)
            live += extra
            builds = [await snapshot_build(settings) for _ in range(repeats)]
            load_s, json_s, routes, json_bytes = min(builds, key=lambda b: b[0] + b[1])
            fetch_s = min(bare_fetch(settings) for _ in range(repeats))
            point = {
                "live_routes": size,
                "apply_us_per_event": per_event_us(measured.commit_s, extra),
                "apply_events_per_s": extra / measured.commit_s,
                "apply_batches_us_per_event": [round(us, 1) for _, us in measured.batches],  # the spread
                "decode_us_per_event": per_event_us(measured.decode_s, extra),
                "copy_floor_us_per_event": per_event_us(floor_s, extra),
                "snapshot_routes": routes,
                "snapshot_load_s": load_s,
                "snapshot_json_s": json_s,
                "snapshot_build_s": load_s + json_s,
                "snapshot_json_bytes": json_bytes,
                "bare_fetch_s": fetch_s,
                "fill_events_per_s": to_fill / fill_s if to_fill else None,
                "table_bytes": table_sizes(settings),
            }
            points.append(point)
            say(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in point.items()}))
    finally:
        await engine.dispose()
    return {"points": points, "fill_curve": fill_curve}


def report(points: list[dict[str, Any]]) -> None:
    base = points[0]
    print(f"\n{'live routes':>12s} | {'apply µs/ev':>11s} {'batches':>13s} {'events/s':>9s} {'COPY floor':>10s} {'apply/floor':>11s} "
          f"{'vs first':>8s} {'log allow':>9s} | {'snapshot s':>10s} {'bare fetch':>10s} {'snap/fetch':>10s} "
          f"{'µs/route vs first':>17s}")
    for p in points:
        per_route = p["snapshot_build_s"] / p["snapshot_routes"]
        base_route = base["snapshot_build_s"] / base["snapshot_routes"]
        batches = p["apply_batches_us_per_event"]
        print(f"{p['live_routes']:>12,d} | {p['apply_us_per_event']:>11.1f} {min(batches):>6.0f}–{max(batches):<6.0f} "
              f"{p['apply_events_per_s']:>9,.0f} "
              f"{p['copy_floor_us_per_event']:>10.1f} {format_ratio(p['apply_us_per_event'], p['copy_floor_us_per_event']):>11s} "
              f"{format_ratio(p['apply_us_per_event'], base['apply_us_per_event']):>8s} "
              f"{log_allowance(p['live_routes'], base['live_routes']):>8.2f}x | "
              f"{p['snapshot_build_s']:>10.3f} {p['bare_fetch_s']:>10.3f} "
              f"{format_ratio(p['snapshot_build_s'], p['bare_fetch_s']):>10s} "
              f"{format_ratio(per_route, base_route):>17s}")
    print("(snapshot s = first load of a fresh SnapshotCache + the full JSON representation, at live routes + extra)")


def plot(points: list[dict[str, Any]], fill_curve: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a benchmark host
    import matplotlib.pyplot as plt

    sizes = [p["live_routes"] for p in points]
    base = points[0]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    # The fill's batches below the first size are left out: a log axis down to 0 rows
    # would squeeze the measured points into a corner.
    shown = [(x, y) for x, y in fill_curve if x >= sizes[0] / 2]
    if shown:
        left.plot([x for x, _ in shown], [y for _, y in shown], color="0.75", linewidth=0.8,
                  label="fill batches (as the table grows)")
    means = [p["apply_us_per_event"] for p in points]
    # Clamped: the batch figures are rounded, so the mean can sit a hair outside them.
    spread = [[max(0.0, m - min(p["apply_batches_us_per_event"])) for m, p in zip(means, points, strict=True)],
              [max(0.0, max(p["apply_batches_us_per_event"]) - m) for m, p in zip(means, points, strict=True)]]
    left.errorbar(sizes, means, yerr=spread, fmt="o-", color="C0", capsize=3,
                  label="apply (commit_batch), mean; bars: batch min–max")
    left.plot(sizes, [base["apply_us_per_event"] * log_allowance(s, sizes[0]) for s in sizes], "--", color="C3",
              label="first point × log N / log N₀ (allowance)")
    left.plot(sizes, [p["copy_floor_us_per_event"] for p in points], "s:", color="C2", label="baseline: COPY of the claims rows")
    left.set_xscale("log")
    left.set_ylim(bottom=0)
    left.set_xlabel("live routes")
    left.set_ylabel("µs per applied event")
    left.set_title("apply cost per event")
    left.legend(fontsize=8)
    routes = [p["snapshot_routes"] for p in points]  # the snapshot is taken after the extra events
    right.plot(routes, [p["snapshot_build_s"] for p in points], "o-", color="C0", label="full snapshot (load + JSON)")
    right.plot(routes, [p["snapshot_load_s"] for p in points], ".--", color="C1", label="  of which: load")
    right.plot(routes, [p["bare_fetch_s"] for p in points], "s:", color="C2", label="baseline: bare fetch of the rows")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("live routes")
    right.set_ylabel("seconds")
    right.set_title("snapshot build time")
    right.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="live routes, comma-separated")
    parser.add_argument("--extra", type=int, default=20_000, help="events applied and timed at each size")
    parser.add_argument("--batch", type=int, default=Settings.model_fields["batch_max_events"].default)
    parser.add_argument("--repeats", type=int, default=3, help="snapshot builds per size (the best counts)")
    parser.add_argument("--plot", type=Path, default=Path("docs/cost-growth.png"), help="'' for none")
    parser.add_argument("--output", type=Path, help="write every figure as JSON here")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    admin = os.environ.get("TOPOLOGY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    database, url = create_database(admin)
    started = time.perf_counter()
    try:
        settings = Settings(database_url=url)
        upgrade_to_head(settings.sqlalchemy_url)
        say(f"machine: {machine()}")
        results = asyncio.run(run(settings, sizes, args.extra, args.batch, args.repeats))
    finally:
        drop_database(admin, database)
    results.update({"machine": machine(), "sizes": sizes, "extra": args.extra, "batch": args.batch,
                    "wall_s": time.perf_counter() - started})
    report(results["points"])
    if str(args.plot) not in ("", "."):
        plot(results["points"], results["fill_curve"], args.plot,
             f"{machine()}; {args.extra:,} events per point, {args.batch:,}-event batches")
        say(f"plot: {args.plot}")
    say(f"total {results['wall_s']:.0f}s")
    text = json.dumps(results, indent=2, default=str)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
