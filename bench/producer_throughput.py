"""Producer throughput: the producer library against a bare aiokafka producer, same run (issue 7).

    python -m bench.producer_throughput [--events 100000] [--rounds 3] [--profile]

Opt-in; not part of the test run. Starts its own embedded Kafka broker (topics as
`topology topics` creates them: the claims topic has 8 partitions); no database.

Events: ClaimCreated on distinct namespaces, given as plain mappings, as a client
holds them before it calls the library. Alternating rounds (bare first), each timed
from the first send to the last acknowledgement, the producer already started:

- library: parse_event (validation) + EventPublisher.publish_many (Avro encoding,
  partition key, headers, one outcome per event once acknowledged), acks=all;
- baseline: a bare AIOKafkaProducer sending the same bytes (encoded before the clock
  starts) with the same keys, headers and settings — acks=all, the library's
  linger_ms, gzip, default batch size, the same window of sends in flight.

Idempotence is off on both sides: the embedded Tansu broker refuses InitProducerId, so
the library's `auto` mode would fall back to exactly this (README, adr/0006).

Reports events/s per round, the median of each, and library / bare. --profile runs
one more library round under pyinstrument and prints where its time went.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.steady_latency import format_ratio, machine, say
from topology_store.cli.devstack import EmbeddedKafka
from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics
from topology_store.schemas.codec import EVENT_TYPE_HEADER, EventCodec
from topology_store.schemas.models import Event, parse_event

Record = tuple[str, bytes, bytes, list[tuple[str, bytes]]]  # topic, key, value, headers


# --- pure helpers (tests/unit/test_bench_harness.py) -------------------------------------------------


def alternating(rounds: int) -> list[str]:
    """Round order: bare, library, bare, library, ... so drift in a shared machine's
    load hits both sides alike instead of one side's block of rounds."""
    return [side for _ in range(rounds) for side in ("bare", "library")]


def rate(events: int, seconds: float) -> float:
    return events / seconds if seconds > 0 else float("inf")


# --- the two producers -----------------------------------------------------------------------------


def client_events(count: int, round_tag: str) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [{"type": "ClaimCreated", "event_id": str(uuid.uuid4()), "occurred_at": now.isoformat(), "source": "bench",
             "bucket": "NAMESPACE", "value": f"{round_tag}-{n}", "cell_id": f"cell-{n % 100 + 1}",
             "owner_type": "GROUP", "owner_id": n}
            for n in range(count)]


def encode_all(settings: Settings, events: Sequence[Event]) -> list[Record]:
    """The bytes the library would send: the same codec, key and header, done ahead."""
    codec = EventCodec()
    return [(settings.topic_for(e.EVENT_TYPE), e.partition_key.encode(), codec.encode(e.EVENT_TYPE, e.to_avro()),
             [(EVENT_TYPE_HEADER, e.EVENT_TYPE.encode("ascii"))]) for e in events]


async def library_round(settings: Settings, data: list[dict[str, Any]], window: int) -> tuple[float, float]:
    """(seconds to the last acknowledgement, of which validation)."""
    async with EventPublisher(settings, window=window) as publisher:
        started = time.perf_counter()
        events = [parse_event(item) for item in data]
        validated = time.perf_counter()
        failed = 0
        async for outcome in publisher.publish_many(events):
            failed += isinstance(outcome, PublishFailed)
        elapsed = time.perf_counter() - started
    if failed:
        raise RuntimeError(f"{failed} events not acknowledged")
    return elapsed, validated - started


async def bare_round(settings: Settings, records: list[Record], window: int) -> float:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=False,
        linger_ms=settings.producer_linger_ms, request_timeout_ms=settings.producer_request_timeout_ms,
        compression_type="gzip",
    )
    await producer.start()
    try:
        started = time.perf_counter()
        pending: list[asyncio.Future[Any]] = []
        for topic, key, value, headers in records:
            pending.append(await producer.send(topic, value=value, key=key, headers=headers))
            # The library's window: at most this many unacknowledged sends, settled in order.
            if len(pending) >= window:
                for future in pending:
                    await future
                pending = []
        for future in pending:
            await future
        return time.perf_counter() - started
    finally:
        await producer.stop()


def unit_costs(count: int = 20_000) -> dict[str, float]:
    """CPU per event of the library's own steps, without a broker (µs)."""
    settings = Settings()
    data = client_events(count, "unit")
    started = time.perf_counter()
    events = [parse_event(item) for item in data]
    parsed = time.perf_counter()
    codec = EventCodec()
    payloads = [e.to_avro() for e in events]
    dumped = time.perf_counter()
    for event, payload in zip(events, payloads, strict=True):
        codec.encode(event.EVENT_TYPE, payload)
    encoded = time.perf_counter()
    for event in events:
        settings.topic_for(event.EVENT_TYPE)
        event.partition_key.encode("utf-8")
    keyed = time.perf_counter()
    return {"parse_event (validation)": (parsed - started) / count * 1e6,
            "to_avro (model_dump)": (dumped - parsed) / count * 1e6,
            "Avro encode": (encoded - dumped) / count * 1e6,
            "topic + key": (keyed - encoded) / count * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="events per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each side")
    parser.add_argument("--window", type=int, default=1000, help="sends in flight (EventPublisher's default)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--output", help="write every figure as JSON here")
    args = parser.parse_args(argv)
    kafka = EmbeddedKafka().start()
    try:
        settings = Settings(kafka_bootstrap=kafka.bootstrap, producer_idempotence="off")
        asyncio.run(ensure_topics(settings))
        say(f"machine: {machine()}")
        # One unmeasured small round each: metadata, connections, the broker's first batches.
        warm = client_events(2000, "warm")
        asyncio.run(library_round(settings, warm, args.window))
        asyncio.run(bare_round(settings, encode_all(settings, [parse_event(d) for d in warm]), args.window))
        results: dict[str, list[float]] = {"bare": [], "library": []}
        validation: list[float] = []
        for n, side in enumerate(alternating(args.rounds)):
            data = client_events(args.events, f"r{n}")
            if side == "bare":
                records = encode_all(settings, [parse_event(d) for d in data])
                results["bare"].append(rate(args.events, asyncio.run(bare_round(settings, records, args.window))))
            else:
                elapsed, validate_s = asyncio.run(library_round(settings, data, args.window))
                results["library"].append(rate(args.events, elapsed))
                validation.append(validate_s / elapsed)
            say(f"round {n // 2 + 1} {side:7s} {results[side][-1]:>10,.0f} events/s")
        bare, library = statistics.median(results["bare"]), statistics.median(results["library"])
        costs = unit_costs()
        print(f"\n{'':34s} {'median':>10s}  rounds (events/s)")
        print(f"{'baseline: bare aiokafka, same bytes':34s} {bare:>10,.0f}  "
              + ", ".join(f"{r:,.0f}" for r in results["bare"]))
        print(f"{'library: parse + publish_many':34s} {library:>10,.0f}  "
              + ", ".join(f"{r:,.0f}" for r in results["library"]))
        print(f"{'library / bare':34s} {format_ratio(library, bare):>10s}  per round: "
              + ", ".join(format_ratio(lib, b) for b, lib in zip(results["bare"], results["library"], strict=True)))
        # Without validation: what publish_many alone sustains, for callers holding models already.
        publish_only = statistics.median(r / (1 - share) for r, share in zip(results["library"], validation, strict=True))
        print(f"validation share of a library round: {statistics.median(validation):.0%}; publish_many alone "
              f"{publish_only:,.0f} events/s ({format_ratio(publish_only, bare)} of bare)")
        print("library CPU per event without a broker: " + ", ".join(f"{k} {v:.1f} µs" for k, v in costs.items()))
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="enabled")
            data = client_events(args.events, "profile")
            profiler.start()
            asyncio.run(library_round(settings, data, args.window))
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False, show_all=False)[:8000])
        summary = {"machine": machine(), "events_per_round": args.events, "window": args.window,
                   "linger_ms": settings.producer_linger_ms, "compression": "gzip", "acks": "all",
                   "idempotence": False, "bare_events_per_s": results["bare"],
                   "library_events_per_s": results["library"], "bare_median": bare, "library_median": library,
                   "ratio": library / bare, "validation_share": statistics.median(validation),
                   "publish_many_only_median": publish_only,
                   "library_unit_costs_us": costs}
        print(json.dumps(summary))
        if args.output:
            with open(args.output, "w") as out:
                json.dump(summary, out, indent=2)
    finally:
        kafka.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
