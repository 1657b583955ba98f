"""Crashes: the projector is SIGKILLed at random moments, and members come and go
while events flow; every event is still applied exactly once, and the tables equal
both a replay of the log and a clean, uninterrupted run (README "Reliability"). The
replay (``topology replay``, the one pipeline of projector/replay.py) is itself
stopped midway and resumed.

Default run: 52,000 records, 12 SIGKILLs; two churning members over 20,000; one
deterministic zombie. ``TOPOLOGY_SOAK=1`` adds a longer run: 250,000 records,
40 SIGKILLs, a second member stopped and started throughout, events published
while all this happens. ``TOPOLOGY_SOAK_SEED`` replays a failing run's moments.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.integration.processes import scalar, start, stop, wait_until
from tests.integration.test_projector import Member
from tests.integration.workload import Workload, build_workload
from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.projector.consumer import Projector
from topology_store.projector.replay import LIVE_SCHEMA, compare, replay, table_rows, verify
from topology_store.projector.store import FencedError, ProjectionStore
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics
from topology_store.schemas.models import Event

pytestmark = [pytest.mark.integration, pytest.mark.both_brokers]  # SIGKILLs, rebalances: on Tansu too (conftest)

# Short sessions, so a SIGKILLed member's partitions move in seconds, not in the
# 10 s default (the settings exist for this; production keeps the default).
FAST_GROUP = {"consumer_session_timeout_ms": 2000, "consumer_heartbeat_interval_ms": 400}


def seed() -> int:
    chosen = int(os.environ.get("TOPOLOGY_SOAK_SEED") or random.randrange(2**32))
    print(f"\nsoak seed {chosen} (TOPOLOGY_SOAK_SEED={chosen} repeats these moments)")
    return chosen


async def publish(settings: Settings, events: list[Event]) -> None:
    async with EventPublisher(settings) as publisher:
        async for outcome in publisher.publish_many(events):
            assert not isinstance(outcome, PublishFailed), outcome


def processed(settings: Settings) -> int:
    return int(scalar(settings, "SELECT count(*) FROM processed_events"))


def caught_up(settings: Settings, work: Workload) -> bool:
    """Every distinct event decided and every record (redeliveries too) consumed."""
    return processed(settings) == work.distinct_events and int(
        scalar(settings, "SELECT coalesce(sum(next_offset), 0) FROM partition_offsets")) == len(work.events)


def assert_exactly_once(settings: Settings, work: Workload) -> None:
    with psycopg.connect(settings.libpq_url) as conn:
        outcomes = Counter(dict(conn.execute("SELECT outcome, count(*) FROM processed_events GROUP BY 1").fetchall()))
        archived, distinct_archived = conn.execute(
            "SELECT count(*), count(DISTINCT (topic, partition, \"offset\")) FROM event_archive").fetchone()
        outbox, distinct_outbox = conn.execute(
            "SELECT count(*), count(DISTINCT event_id) FROM topology_outbox").fetchone()
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
    assert outcomes == work.outcomes  # one decision per distinct event, each the one the workload implies
    assert archived == distinct_archived == len(work.events)  # every record consumed once
    assert outbox == distinct_outbox  # no claim decision recorded twice
    assert dead == (0,)
    result = verify(settings)
    assert result.equal, (result.missing, result.unexpected)


async def clean_run(settings: Settings, database_url: str, work: Workload) -> Settings:
    """The same log, projected without interruption into an empty database."""
    clean = settings.model_copy(update={"database_url": database_url, "batch_max_events": 5000,
                                        "consumer_group": settings.consumer_group + "-clean"})
    async with Member(clean):
        for _ in range(3000):
            if await asyncio.to_thread(caught_up, clean, work):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the clean run did not finish")
    return clean


LEASE_END = 6  # expires_at's place in table_rows' leases rows


def decided_again(rows: dict[str, list[tuple[str, ...]]]) -> dict[str, list[tuple[str, ...]]]:
    """The tables as a second decider of the same log must reproduce them: everything
    but a grant's end, which counts from the decider's clock when that is later than the
    request's log time (adr/0017), so a clean run deciding later grants later ends."""
    return {**rows, "leases": [row[:LEASE_END] + row[LEASE_END + 1:] for row in rows["leases"]]}


def same_tables(live: Settings, clean: Settings) -> None:
    with psycopg.connect(live.libpq_url) as a, psycopg.connect(clean.libpq_url) as b:
        assert decided_again(table_rows(a, LIVE_SCHEMA)) == decided_again(table_rows(b, LIVE_SCHEMA))
        decisions = "SELECT event_id FROM topology_outbox"
        assert {r[0] for r in a.execute(decisions)} == {r[0] for r in b.execute(decisions)}


class _Stopped(Exception):
    pass


class _StopAfter(io.StringIO):
    """A replay's progress output that stops the run once ``chunks`` chunks have committed."""

    def __init__(self, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks

    def write(self, text: str) -> int:
        if f"chunk {self.chunks} committed" in text:
            raise _Stopped(text)
        return super().write(text)


def assert_a_resumed_replay_equals_the_live_tables(settings: Settings, chunk_events: int = 5_000) -> None:
    """``topology replay`` of what the kills left behind, stopped after three chunks and
    resumed, reaches the live tables exactly."""
    with pytest.raises(_Stopped):
        replay(settings, "soak_replay", chunk_events=chunk_events, out=_StopAfter(3))
    out = io.StringIO()
    replayed = replay(settings, "soak_replay", chunk_events=chunk_events, out=out)
    assert f"resuming soak_replay from its checkpoint: {3 * chunk_events:,} events already applied" in out.getvalue()
    assert replayed.cells and replayed.registry.claims
    result = compare(settings, LIVE_SCHEMA, "soak_replay")
    assert result.equal, (result.missing, result.unexpected)


def in_transaction(settings: Settings) -> bool:
    """Whether a projector connection is inside a transaction right now."""
    return bool(scalar(settings, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND pid <> pg_backend_pid() AND state IN ('active', 'idle in transaction')"))


def kill_at_progress(settings: Settings, work: Workload, targets: list[int], rng: random.Random, log_dir: Path,
                     extra: dict[str, str] | None = None) -> list[int]:
    """For each target count of decided events: (re)start the projector, let it work
    past the target, wait a random moment more, SIGKILL it. Returns the counts at
    the kills. Random targets and random extra delays land the kills anywhere: in
    group joins, fetches, the domain fold and the middle of a transaction."""
    at_kill: list[int] = []
    in_flight: list[bool] = []
    for number, target in enumerate(targets):
        mid_transaction = False
        process = start(["project"], settings, log_dir / f"projector-{number}.log", **(extra or {}))
        try:
            wait_until(lambda: processed(settings) >= target or process.poll() is not None, timeout_s=120,
                       interval_s=0.01, what=f"progress past {target}")
            assert process.poll() is None, (log_dir / f"projector-{number}.log").read_text()[-3000:]
            time.sleep(rng.uniform(0, 0.4))
            mid_transaction = in_transaction(settings)  # evidence only: where the kill landed
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        at_kill.append(processed(settings))
        in_flight.append(mid_transaction)
    print(f"{sum(in_flight)} of {len(targets)} kills landed while a batch transaction was open")
    return at_kill


def run_soak(settings: Settings, work: Workload, kills: int, rng: random.Random, log_dir: Path,
             new_database: Callable[[], str]) -> None:
    started = time.monotonic()
    asyncio.run(publish(settings, work.events))
    published = time.monotonic()
    distinct = work.distinct_events
    # Spaced targets between 3 % and 90 % of the stream: every kill is mid-stream.
    step = (int(distinct * 0.9) - int(distinct * 0.03)) // kills
    targets = [int(distinct * 0.03) + i * step + rng.randrange(0, max(1, step // 2)) for i in range(kills)]
    at_kill = kill_at_progress(settings, work, targets, rng, log_dir)
    assert len(at_kill) == kills and all(count < distinct for count in at_kill), at_kill

    final = start(["project"], settings, log_dir / "projector-final.log")
    try:
        wait_until(lambda: caught_up(settings, work), timeout_s=300, interval_s=0.2, what="the stream to be applied")
    finally:
        assert stop(final) == 0, (log_dir / "projector-final.log").read_text()[-3000:]
    applied = time.monotonic()
    print(f"{len(work.events)} records ({distinct} distinct events), {kills} SIGKILLs at {at_kill}: "
          f"published in {published - started:.1f}s, applied in {applied - published:.1f}s "
          f"({distinct / (applied - published):.0f} events/s including restarts)")

    assert_exactly_once(settings, work)
    assert_a_resumed_replay_equals_the_live_tables(settings)
    clean = asyncio.run(clean_run(settings, new_database(), work))
    same_tables(settings, clean)
    print(f"verified in {time.monotonic() - applied:.1f}s")


def test_sigkill_at_random_moments_applies_every_event_exactly_once(
    topics: Settings, tmp_path: Path, new_database: Callable[[], str]
) -> None:
    rng = random.Random(seed())
    work = build_workload(52_000, seed=rng.randrange(2**32))
    settings = topics.model_copy(update={"batch_max_events": 1000, **FAST_GROUP})
    run_soak(settings, work, kills=12, rng=rng, log_dir=tmp_path, new_database=new_database)


def assignments(log_path: Path) -> int:
    """How often a member logged a new assignment (each rebalance that gave it partitions)."""
    return log_path.read_text(errors="replace").count("assigned {'") if log_path.exists() else 0


def churn(settings: Settings, work: Workload, rng: random.Random, log_dir: Path, rounds: int,
          kill_first: bool = False) -> tuple[int, int]:
    """Member A runs throughout (SIGKILLed too when ``kill_first``); member B is
    stopped (SIGTERM or SIGKILL) and started again each round while a chunk of the
    events is published. Returns (graceful stops, kills)."""
    size = -(-len(work.events) // rounds)  # consecutive slices keep every key's order
    chunks = [work.events[i:i + size] for i in range(0, len(work.events), size)]
    graceful = killed = 0
    first = start(["project"], settings, log_dir / "member-a-0.log")
    try:
        for number, chunk in enumerate(chunks):
            second_log = log_dir / f"member-b-{number}.log"
            second = start(["project"], settings, second_log)
            # Partitions move to B (a rebalance: A gives some up) before the chunk flows.
            wait_until(lambda: assignments(second_log) > 0 or second.poll() is not None, timeout_s=60,
                       what="member B to be assigned partitions")
            asyncio.run(publish(settings, chunk))
            time.sleep(rng.uniform(0.2, 1.5))  # both work; then B leaves or dies mid-stream
            if rng.random() < 0.5:
                assert stop(second) == 0, (log_dir / f"member-b-{number}.log").read_text()[-3000:]
                graceful += 1
            else:
                second.send_signal(signal.SIGKILL)
                second.wait(10)
                killed += 1
            if kill_first and rng.random() < 0.3:
                first.send_signal(signal.SIGKILL)
                first.wait(10)
                killed += 1
                first_log = log_dir / f"member-a-{number + 1}.log"
                first = start(["project"], settings, first_log)
                # Up (its signal handling installed) before the next SIGTERM can reach it.
                wait_until(lambda: "projector consuming" in first_log.read_text(errors="replace")
                           or first.poll() is not None, timeout_s=60, what="member A to restart")
        wait_until(lambda: caught_up(settings, work), timeout_s=300, interval_s=0.2, what="the stream to be applied")
    finally:
        assert stop(first) == 0
    return graceful, killed


def test_two_members_with_one_stopped_and_started_repeatedly_apply_every_event_exactly_once(
    topics: Settings, tmp_path: Path, new_database: Callable[[], str]
) -> None:
    rng = random.Random(seed())
    work = build_workload(20_000, seed=rng.randrange(2**32))
    settings = topics.model_copy(update={"batch_max_events": 500, **FAST_GROUP})
    began = time.monotonic()
    graceful, killed = churn(settings, work, rng, tmp_path, rounds=6)
    print(f"{len(work.events)} records through two members; B stopped {graceful}x by SIGTERM, "
          f"{killed}x by SIGKILL, in {time.monotonic() - began:.1f}s")
    assert graceful + killed == 6
    assert_exactly_once(settings, work)
    same_tables(settings, asyncio.run(clean_run(settings, new_database(), work)))


def stored_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    with psycopg.connect(settings.libpq_url) as conn:
        return {(t, p): o for t, p, o in conn.execute("SELECT topic, partition, next_offset FROM partition_offsets")}


class _HeldStore(ProjectionStore):
    """The real store, with commits held at a gate: a member stuck mid-commit (a
    long GC pause, a slow disk) while the group moves its partitions away."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.held = threading.Event()
        self.held_advances: dict[tuple[str, int], int] = {}  # partition -> where the held batch starts
        self.fenced = 0

    async def commit_batch(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self.held.is_set():
            self.held_advances = {tp: advance.expected for tp, advance in args[2].items()}
            self.held.set()
        while not self.gate.is_set():
            await asyncio.sleep(0.02)
        try:
            return await super().commit_batch(*args, **kwargs)
        except FencedError:
            self.fenced += 1
            raise


async def test_a_member_that_lost_its_partitions_mid_commit_is_fenced_and_writes_nothing(topics: Settings) -> None:
    settings = topics.model_copy(update=FAST_GROUP)
    work = build_workload(3_000, seed=3)
    await publish(settings, work.events)
    engine = create_engine(settings.sqlalchemy_url)
    zombie_store = _HeldStore(engine, settings.claim_secret)
    zombie = Projector(settings, zombie_store)
    stop_zombie = asyncio.Event()
    zombie_task = asyncio.create_task(zombie.run(stop_zombie))
    try:
        # The zombie has read its first batch and is stuck before committing it.
        await asyncio.to_thread(zombie_store.held.wait, 60)
        async with Member(settings):  # a second member joins; partitions are rebalanced
            # Wait until the new member has committed one of the partitions the held
            # batch covers: the zombie's read of it is now stale.
            for _ in range(1200):
                stored = await asyncio.to_thread(stored_offsets, settings)
                if any(stored.get(tp, 0) > start for tp, start in zombie_store.held_advances.items()):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the second member never took over a partition of the held batch")
            zombie_store.gate.set()  # the stale batch now tries to commit
            for _ in range(1200):
                if await asyncio.to_thread(caught_up, settings, work):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("not caught up")
    finally:
        zombie_store.gate.set()
        stop_zombie.set()
        await zombie_task
        await engine.dispose()
    # The stale commit was refused as a whole, and nothing was applied twice.
    assert zombie_store.fenced >= 1 and zombie.metrics.fenced._value.get() >= 1  # noqa: SLF001
    assert_exactly_once(settings, work)


@pytest.mark.soak
def test_soak_many_sigkills_and_a_churning_second_member(
    topics: Settings, tmp_path: Path, new_database: Callable[[], str]
) -> None:
    rng = random.Random(seed())
    work = build_workload(250_000, seed=rng.randrange(2**32))
    settings = topics.model_copy(update={"batch_max_events": 2000, **FAST_GROUP})
    run_soak(settings, work, kills=40, rng=rng, log_dir=tmp_path, new_database=new_database)

    more = topics.model_copy(update={
        "batch_max_events": 500, **FAST_GROUP,
        "claims_topic": topics.claims_topic + "-churn", "cells_topic": topics.cells_topic + "-churn",
        "claim_requests_topic": topics.claim_requests_topic + "-churn",
        "claim_decisions_topic": topics.claim_decisions_topic + "-churn",
        "database_url": new_database(), "consumer_group": topics.consumer_group + "-churn",
    })
    churned = build_workload(100_000, seed=rng.randrange(2**32))
    asyncio.run(ensure_topics(more))
    graceful, killed = churn(more, churned, rng, tmp_path, rounds=25, kill_first=True)
    print(f"churn: {len(churned.events)} records, {graceful} SIGTERMs, {killed} SIGKILLs")
    assert_exactly_once(more, churned)
    same_tables(more, asyncio.run(clean_run(more, new_database(), churned)))
