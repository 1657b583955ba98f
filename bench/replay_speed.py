"""Rebuild speed against PostgreSQL's COPY of the rows it produces, measured in the same run.

    python -m bench.replay_speed [--events 5000000] [--chunk-events 200000] [--profile FILE] [--keep]

Opt-in and slow; not part of the test run. Uses the local PostgreSQL
(TOPOLOGY_BENCH_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/postgres),
in a scratch database it drops afterwards (unless --keep).

1. Generates the log of N events quickly: a decision log in the claim mix of a busy
   deployment (namespace claims committed, conflicts rejected, releases, two-claim
   leases granted then committed or rolled back, sequence ranges) plus cell updates,
   Avro-encoded with the real codec and COPYed straight into ``topology_outbox`` and
   ``event_archive`` (what ``topology rebuild --source archive`` reads).
2. The rebuild: ``projector.rebuild`` from offset 0 into a shadow schema, every chunk
   committed with its checkpoint, exactly as ``topology rebuild --no-switch`` runs it (the
   one replay pipeline of projector/replay.py: ``topology replay`` and ``verify`` run it too).
3. The baseline: the rows the rebuild produced (cells, claims, leases, sequence
   ranges), exported beforehand, COPYed into the scratch database's empty live tables
   (same migrations, same indexes). Only the COPYs in are timed.
4. The switch: those live tables now hold what the shadow holds, so ``topology rebuild``
   resumes the shadow, finds nothing left to apply and switches; reported is how long
   it held the live projector (the routing diff of every committed namespace included).

Reports both times and their ratio (target: the rebuild within 2x of the COPY), and the switch.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import io
import json
import os
import platform
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pydantic import SecretStr

from topology_store.projector.migrate import upgrade_to_head
from topology_store.projector.rebuild import DEFAULT_SCHEMA, rebuild_async
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.models import parse_event

TABLES = ("cells", "claims", "leases", "sequence_ranges")
CELLS = 100
SECRET = b"bench-secret"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}"


@dataclass
class Expected:
    """Row counts the generated log must rebuild to (a sanity check of the run)."""

    claims: int = 0
    leases: int = 0
    ranges: int = 0
    cells: int = CELLS
    mix: dict[str, int] = field(default_factory=dict)


def _envelope(rng: random.Random, at: datetime) -> dict[str, Any]:
    return {"event_id": uuid.UUID(int=rng.getrandbits(128), version=4), "occurred_at": at, "source": "decider",
            "trace_id": None}


def decision_log(count: int, seed: int, expected: Expected) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event type, Avro payload) of ``count`` decisions that are consistent with each
    other: commits and rollbacks name leases granted before, releases name held claims."""
    rng = random.Random(seed)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    held: list[tuple[str, str, int]] = []  # committed namespaces: (path, cell, owner)
    open_leases: list[dict[str, Any]] = []
    namespaces = users = 0
    sequence_end: dict[str, int] = {}
    for _ in range(count):
        at += timedelta(milliseconds=1)
        roll = rng.random()
        envelope = _envelope(rng, at)
        request = uuid.UUID(int=rng.getrandbits(128), version=4)
        if roll < 0.52 or (roll < 0.62 and not held):  # a new namespace claimed
            namespaces += 1
            cell, owner = f"cell-{rng.randrange(CELLS)}", rng.randrange(1, 10**9)
            path = f"ns-{namespaces}"
            held.append((path, cell, owner))
            expected.claims += 1
            yield "ClaimsCommitted", {**envelope, "request_id": request, "cell_id": cell, "owner_type": "GROUP",
                                      "owner_id": owner, "claims": [{"bucket": "NAMESPACE", "value": path}]}
        elif roll < 0.57:  # another cell tried to take a held one
            path, cell, _ = held[rng.randrange(len(held))]
            yield "RequestRejected", {**envelope, "request_id": request, "request_type": "ClaimCreated",
                                      "reason": "CONFLICT", "message": f"already claimed in cell {cell}",
                                      "conflicts": [{"bucket": "NAMESPACE", "value": path, "cell_id": cell}]}
        elif roll < 0.62:  # released by its holder
            path, cell, owner = held.pop(rng.randrange(len(held)))
            expected.claims -= 1
            yield "ClaimsDestroyed", {**envelope, "request_id": request, "cell_id": cell, "owner_type": "GROUP",
                                      "owner_id": owner, "claims": [{"bucket": "NAMESPACE", "value": path}]}
        elif roll < 0.80 or not open_leases:  # a sign-up: username and e-mail under one lease
            users += 1
            email = "hmac-sha256:" + hmac.new(SECRET, f"user-{users}@example.com".encode(), hashlib.sha256).hexdigest()
            lease = {"lease_id": uuid.UUID(int=rng.getrandbits(128), version=4),
                     "cell_id": f"cell-{rng.randrange(CELLS)}", "owner_type": "USER", "owner_id": users,
                     "claims": [{"bucket": "USERNAME", "value": f"user-{users}"}, {"bucket": "EMAIL", "value": email}]}
            open_leases.append(lease)
            expected.claims += 2
            expected.leases += 1
            yield "LeaseGranted", {**envelope, "request_id": request, **lease,
                                   "expires_at": at + timedelta(hours=24)}
        elif roll < 0.98:  # the cell commits it (mostly) or rolls it back
            lease = open_leases.pop(rng.randrange(len(open_leases)))
            if rng.random() < 0.8:
                yield "LeaseCommitted", {**envelope, "request_id": request, **lease}
            else:
                expected.claims -= 2
                yield "LeaseReleased", {**envelope, "request_id": request, **lease, "cause": "ROLLBACK"}
        else:  # an id range
            name = rng.choice(["projects.id", "users.id", "ci_builds.id"])
            start = sequence_end.get(name, 1)
            sequence_end[name] = start + rng.randrange(1, 100_000)
            expected.ranges += 1
            yield "SequenceRangeGranted", {**envelope, "request_id": request, "cell_id": f"cell-{rng.randrange(CELLS)}",
                                           "sequence_name": name, "start": start, "end": sequence_end[name]}


def cell_log(count: int, seed: int) -> Iterator[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(count):
        at += timedelta(milliseconds=30)
        envelope = _envelope(rng, at)
        if n < CELLS:
            yield "CellRegistered", {**envelope, "source": "ops", "cell_id": f"cell-{n}",
                                     "address": f"https://cell-{n}.example.com", "session_prefix": f"c{n}",
                                     "region": rng.choice(["eu", "us", "ap"])}
        else:
            yield "CellUpdated", {**envelope, "source": "ops", "cell_id": f"cell-{rng.randrange(CELLS)}",
                                  "address": None, "region": None, "weight": rng.randrange(0, 200)}


def generate(conn: psycopg.Connection[Any], settings: Settings, events: int, seed: int) -> Expected:
    """COPY the log into event_archive (cells topic) and topology_outbox (decisions)."""
    codec = EventCodec()
    expected = Expected()
    cell_count = max(CELLS, events * 3 // 100)
    decisions = events - cell_count
    # A sample of every type decodes into a valid event: the generator speaks the contract.
    sampled: set[str] = set()
    with conn.cursor() as cursor:
        with cursor.copy('COPY event_archive (topic, partition, "offset", key, value, log_time) FROM STDIN') as copy:
            for offset, (event_type, payload) in enumerate(cell_log(cell_count, seed)):
                value = codec.encode(event_type, payload)
                if event_type not in sampled:
                    sampled.add(event_type)
                    parse_event(codec.decode(value).payload, event_type)
                copy.write_row((settings.cells_topic, 0, offset, payload["cell_id"].encode(), value,
                                payload["occurred_at"]))
        # The decider draws outbox ids under its own lock; so does this single writer
        # (producer/outbox.sql: the trigger then leaves the given ids alone).
        cursor.execute("SET LOCAL topology.outbox_ids_drawn_under_lock = 'on'")
        with cursor.copy("COPY topology_outbox (id, event_id, event_type, partition_key, payload) FROM STDIN") as copy:
            for outbox_id, (event_type, payload) in enumerate(decision_log(decisions, seed + 1, expected), start=1):
                value = codec.encode(event_type, payload)
                if event_type not in sampled:
                    sampled.add(event_type)
                    parse_event(codec.decode(value).payload, event_type)
                expected.mix[event_type] = expected.mix.get(event_type, 0) + 1
                copy.write_row((outbox_id, payload["event_id"], event_type,
                                str(payload.get("request_id") or payload.get("lease_id")), value))
        cursor.execute("SELECT setval('topology_outbox_id_seq', %s)", (decisions,))
    conn.commit()
    expected.mix["cells records"] = cell_count
    return expected


def copy_baseline(settings: Settings, source_schema: str, target: str = "public") -> tuple[float, dict[str, int]]:
    """Export the rebuilt rows, then time COPYing them into the empty projection tables
    of ``target`` (created by the same migrations: same indexes and constraints)."""
    exported: dict[str, bytes] = {}
    counts: dict[str, int] = {}
    with psycopg.connect(settings.libpq_url) as conn:
        for table in TABLES:
            buffer = io.BytesIO()
            with conn.cursor().copy(sql.SQL("COPY {}.{} TO STDOUT").format(
                    sql.Identifier(source_schema), sql.Identifier(table))) as copy:
                for block in copy:
                    buffer.write(block)
            exported[table] = buffer.getvalue()
            counts[table] = int(conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
                sql.Identifier(source_schema), sql.Identifier(table))).fetchone()[0])  # type: ignore[index]
        conn.commit()
        started = time.perf_counter()
        for table in TABLES:
            with conn.cursor().copy(sql.SQL("COPY {}.{} FROM STDIN").format(
                    sql.Identifier(target), sql.Identifier(table))) as copy:
                data = exported[table]
                for at in range(0, len(data), 1 << 20):
                    copy.write(data[at:at + (1 << 20)])
        conn.commit()
        seconds = time.perf_counter() - started
    return seconds, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--chunk-events", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--profile", help="write a cProfile of the rebuild to this file (and print the top)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--output", help="also write the figures as JSON to this file")
    args = parser.parse_args()

    admin = os.environ.get("TOPOLOGY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    database = f"topology_bench_replay_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    url = make_conninfo(admin, dbname=database)
    settings = Settings(database_url=_url_from_conninfo(url), claim_hmac_secret=SecretStr(SECRET.decode()))
    figures: dict[str, Any] = {"machine": machine(), "events": args.events, "chunk_events": args.chunk_events,
                               "load_average_at_start": os.getloadavg()}
    try:
        upgrade_to_head(settings.sqlalchemy_url)
        started = time.perf_counter()
        with psycopg.connect(settings.libpq_url) as conn:
            expected = generate(conn, settings, args.events, args.seed)
        with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        figures["generate_seconds"] = round(time.perf_counter() - started, 1)
        figures["mix"] = expected.mix
        print(f"generated {args.events:,} events in {figures['generate_seconds']}s: {expected.mix}", flush=True)

        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        started = time.perf_counter()
        result = asyncio.run(rebuild_async(settings, switch=False, chunk_events=args.chunk_events))
        rebuild_seconds = time.perf_counter() - started
        if profiler is not None:
            import pstats

            profiler.disable()
            profiler.dump_stats(args.profile)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        copy_seconds, counts = copy_baseline(settings, DEFAULT_SCHEMA)
        # The live tables now equal the shadow; the live projector "consumed" the cells topic.
        with psycopg.connect(settings.libpq_url) as conn:
            conn.execute("INSERT INTO partition_offsets (topic, partition, next_offset) VALUES (%s, 0, %s)",
                         (settings.cells_topic, expected.mix["cells records"]))
        switched = asyncio.run(rebuild_async(settings, switch=True, chunk_events=args.chunk_events))
        assert switched.resumed and switched.events_this_run == 0 and switched.routing_changes == {
            "cells": 0, "namespaces": 0}, switched
        assert result.events_total == args.events, (result.events_total, args.events)
        wanted = {"cells": expected.cells, "claims": expected.claims, "leases": expected.leases,
                  "sequence_ranges": expected.ranges}
        assert counts == wanted, (counts, wanted)
        figures.update(
            rebuild_seconds=round(rebuild_seconds, 2), rebuild_events_per_s=round(args.events / rebuild_seconds),
            copy_seconds=round(copy_seconds, 2), rows=counts, rows_total=sum(counts.values()),
            copy_rows_per_s=round(sum(counts.values()) / copy_seconds),
            ratio=round(rebuild_seconds / copy_seconds, 2),
            switch_locked_seconds=switched.switch_locked_seconds, resume_and_switch_seconds=switched.seconds,
            load_average_at_end=os.getloadavg(),
        )
    finally:
        if not args.keep:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    print(json.dumps(figures, indent=2))
    if args.output:
        with open(args.output, "w") as out:
            json.dump(figures, out, indent=2)


def _url_from_conninfo(conninfo: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    params = {key: str(value) for key, value in conninfo_to_dict(conninfo).items() if value is not None}
    auth = params.get("user", "postgres") + (f":{params['password']}" if params.get("password") else "")
    return f"postgresql://{auth}@{params.get('host', '127.0.0.1')}:{params.get('port', '5432')}/{params['dbname']}"


if __name__ == "__main__":
    main()
