"""One order for every lease decision, and idempotency that cannot be fooled (adr/0017), on
the real broker and PostgreSQL.

- The member owning a lease's partition is held while ticks for another lease and
  requests on other partitions are decided; the lease's commit, sent before its end,
  still commits when the member goes on.
- One request on two partitions, decided by two members at the same instant, is
  decided once: no unique violation, no poison isolation, no dead letter.
- A request id reused for another command is refused (HTTP 409 ``request_id_reused``,
  ``topology claim`` exit 6), never answered with that command's decision.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from tests.conftest import CLAIMS_AUTH, settings_env
from tests.integration.processes import read_api, start, stop
from tests.integration.test_projector import count, wait_for
from topology_store.core.fold import PositionedEvent
from topology_store.producer.publisher import EventPublisher
from topology_store.projector.archive import RawRecord
from topology_store.projector.consumer import Projector
from topology_store.projector.metrics import ProjectorMetrics
from topology_store.projector.store import CommitResult, DeadLetter, PartitionAdvance, ProjectionStore
from topology_store.projector.ticks import publish_ticks
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EVENT_TYPE_HEADER, EventCodec
from topology_store.schemas.models import ClaimBucket, ClaimRef, ClaimsRequested, LeaseCommitRequested, OwnerType

pytestmark = pytest.mark.integration


class HeldStore(ProjectionStore):
    """The real store, except that a batch touching a held partition waits at a gate
    first: its member is stuck, as if paused, while the rest of the group goes on."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(create_engine(settings.sqlalchemy_url), settings.claim_secret)
        self.held: set[tuple[str, int]] = set()
        self.gate = asyncio.Event()
        self.waiting = 0

    async def commit_batch(
        self,
        events: Sequence[PositionedEvent],
        dead_letters: Sequence[DeadLetter],
        advances: dict[tuple[str, int], PartitionAdvance],  # type: ignore[override]
        archive: Sequence[RawRecord] = (),
        **kwargs: Any,
    ) -> CommitResult:
        if self.held & set(advances):
            self.waiting += 1
            await self.gate.wait()
            self.waiting -= 1
        return await super().commit_batch(events, dead_letters, advances, archive, **kwargs)


class HeldMember:
    """A projector group member in this process over a :class:`HeldStore`."""

    def __init__(self, settings: Settings) -> None:
        self.store = HeldStore(settings)
        self.metrics = ProjectorMetrics()
        self.projector = Projector(settings, self.store, self.metrics)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.projector.run(self.stop))

    def owned(self, topic: str) -> set[int]:
        return {tp.partition for tp in self.projector.positions if tp.topic == topic}

    def isolated(self) -> float:
        return self.metrics.registry.get_sample_value("topology_projector_isolated_records_total") or 0.0

    async def close(self) -> None:
        self.store.gate.set()
        self.stop.set()
        await self.task
        await self.store._engine.dispose()


@asynccontextmanager
async def two_members(settings: Settings) -> AsyncIterator[tuple[HeldMember, HeldMember]]:
    """Two members that split the claim-requests partitions between them."""
    first = HeldMember(settings)
    second = HeldMember(settings)
    topic, total = settings.claim_requests_topic, settings.claim_requests_partitions
    try:
        deadline = time.monotonic() + 60
        while not (first.owned(topic) and second.owned(topic)
                   and len(first.owned(topic) | second.owned(topic)) == total):
            assert time.monotonic() < deadline, "the two members never split the partitions"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)  # let the assignment settle (a last rebalance round)
        assert first.owned(topic) and second.owned(topic)
        yield first, second
    finally:
        await first.close()
        await second.close()


def lease_on(settings: Settings, partitions: set[int]) -> uuid.UUID:
    """A lease id whose commands go to one of ``partitions`` (the Java client's murmur2 rule)."""
    every = list(range(settings.claim_requests_partitions))
    partitioner = DefaultPartitioner()
    while True:
        lease_id = uuid.uuid4()
        if partitioner(str(lease_id).encode("utf-8"), every, every) in partitions:
            return lease_id


def begin(lease_id: uuid.UUID, cell: str, owner: int, values: Sequence[str], ttl_ms: int) -> ClaimsRequested:
    return ClaimsRequested(source=cell, lease_id=lease_id, cell_id=cell, owner_type=OwnerType.USER, owner_id=owner,
                           claims=[ClaimRef(bucket=ClaimBucket.NAMESPACE, value=v) for v in values],
                           lease_ttl_ms=ttl_ms)


def decision(settings: Settings, request_id: uuid.UUID) -> tuple[str, list[dict[str, Any]]] | None:
    with psycopg.connect(settings.libpq_url) as conn:
        row = conn.execute("SELECT outcome, detail FROM processed_events WHERE event_id = %s",
                           (request_id,)).fetchone()
    return None if row is None else (row[0], row[1] or [])


async def decided(settings: Settings, request_id: uuid.UUID, timeout_s: float = 60) -> tuple[str, list[dict[str, Any]]]:
    deadline = time.monotonic() + timeout_s
    while (found := decision(settings, request_id)) is None:
        assert time.monotonic() < deadline, f"{request_id} never decided"
        await asyncio.sleep(0.05)
    return found


def lease_row(settings: Settings, lease_id: uuid.UUID) -> tuple[str, str | None]:
    with psycopg.connect(settings.libpq_url) as conn:
        row = conn.execute("SELECT status, cause FROM leases WHERE lease_id = %s", (lease_id,)).fetchone()
    assert row is not None
    return row[0], row[1]


async def log_end(settings: Settings, partition: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(settings.claim_requests_topic, partition)
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


async def test_a_commit_sent_before_the_lease_end_commits_while_its_partition_member_is_held(
    topics: Settings,
) -> None:
    settings = topics.model_copy(update={"lease_tick_interval_s": 0.3, "batch_wait_ms": 20})
    engine = create_engine(settings.sqlalchemy_url)
    stop_ticks = asyncio.Event()
    ticks = asyncio.create_task(publish_ticks(settings, engine, stop_ticks))
    try:
        async with two_members(settings) as (held, going), EventPublisher(settings) as publisher:
            topic = settings.claim_requests_topic
            lease_a = lease_on(settings, held.owned(topic))
            lease_b, lease_c = lease_on(settings, going.owned(topic)), lease_on(settings, going.owned(topic))
            begin_a = begin(lease_a, "cell-1", 1, ["held-value"], ttl_ms=2000)
            begin_b = begin(lease_b, "cell-2", 2, ["other-value"], ttl_ms=1000)
            for command in (begin_a, begin_b):
                await publisher.publish(command)
            for command in (begin_a, begin_b):
                assert (await decided(settings, command.event_id))[0] == "applied"
            (grant,) = (await decided(settings, begin_a.event_id))[1]

            a_end = datetime.fromisoformat(grant["expires_at"])

            # The member owning A's partition stops; A's commit reaches the log before A's end.
            a_partition = await publisher.partition_for(topic, str(lease_a).encode())
            held.store.held.add((topic, a_partition))
            commit_a = LeaseCommitRequested(source="cell-1", lease_id=lease_a, cell_id="cell-1")
            published = await publisher.publish(commit_a)
            assert published.partition == a_partition and a_partition in held.owned(topic)
            assert datetime.now(UTC) < a_end, "the commit was not sent before A's end"
            commit_offset = published.offset

            # Meanwhile, past A's end: B's own tick expires B on the other member, and C's
            # begin for A's value (on the other member too) must not take it from A.
            while lease_row(settings, lease_b) != ("RELEASED", "EXPIRED"):
                await asyncio.sleep(0.05)
            while datetime.now(UTC) <= a_end:
                await asyncio.sleep(0.05)
            begin_c = begin(lease_c, "cell-3", 3, ["held-value"], ttl_ms=60_000)
            await publisher.publish(begin_c)
            outcome_c, detail_c = await decided(settings, begin_c.event_id)
            assert outcome_c == "rejected" and detail_c[-1]["conflicts"][0]["cell_id"] == "cell-1"
            # A's own tick is in the log now, behind the commit on A's partition.
            deadline = time.monotonic() + 30
            while await log_end(settings, a_partition) <= commit_offset + 1:
                assert time.monotonic() < deadline, "no tick naming A reached its partition"
                await asyncio.sleep(0.2)
            assert decision(settings, commit_a.event_id) is None  # still held
            assert lease_row(settings, lease_a) == ("OPEN", None)

            held.store.gate.set()  # the member goes on, in its partition's order
            outcome, detail = await decided(settings, commit_a.event_id)
            assert outcome == "applied" and [d["type"] for d in detail] == ["LeaseCommitted"], detail
            assert lease_row(settings, lease_a) == ("COMMITTED", None)
            await wait_for(settings, f"SELECT count(*) FROM processed_events WHERE event_type = 'LeaseExpiryTick' "
                           f"AND partition = {a_partition} AND outcome = 'unchanged'", 1, timeout_s=30)
            assert count(settings, "SELECT count(*) FROM dead_letters") == 0
    finally:
        stop_ticks.set()
        await ticks
        await engine.dispose()


async def test_one_request_on_two_partitions_is_decided_once_without_poison(topics: Settings) -> None:
    settings = topics.model_copy(update={"batch_wait_ms": 20})
    codec = EventCodec()
    async with two_members(settings) as (first, second):
        topic = settings.claim_requests_topic
        p1, p2 = min(first.owned(topic)), min(second.owned(topic))
        request = begin(uuid.uuid4(), "cell-1", 1, ["twice"], ttl_ms=60_000)
        for member in (first, second):
            member.store.held.update({(topic, p1), (topic, p2)})
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            # The same record on two partitions (a copy under another key used to land so).
            for partition in (p1, p2):
                await producer.send_and_wait(
                    topic, value=codec.encode(request.EVENT_TYPE, request.to_avro()),
                    key=request.partition_key.encode(), partition=partition,
                    headers=[(EVENT_TYPE_HEADER, request.EVENT_TYPE.encode())])
        finally:
            await producer.stop()
        deadline = time.monotonic() + 30
        while not (first.store.waiting and second.store.waiting):
            assert time.monotonic() < deadline, "both members never held their copy"
            await asyncio.sleep(0.02)
        first.store.gate.set()
        second.store.gate.set()  # both decide at once; the registry lock orders them
        for partition in (p1, p2):
            await wait_for(settings, f"SELECT count(*) FROM partition_offsets WHERE topic = '{topic}' "
                           f"AND partition = {partition} AND next_offset = 1", 1, timeout_s=60)
        assert count(settings, f"SELECT count(*) FROM processed_events WHERE event_id = '{request.event_id}'") == 1
        assert count(settings, "SELECT count(*) FROM topology_outbox WHERE event_type = 'LeaseGranted'") == 1
        assert count(settings, "SELECT count(*) FROM dead_letters") == 0
        assert first.isolated() == second.isolated() == 0


# --- a request id reused for another command ------------------------------------------------


@pytest.fixture
def stack(topics: Settings, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    settings = topics.model_copy(update={"decision_wait_s": 20.0})
    projector = start(["project"], settings, tmp_path / "projector.log")
    try:
        with read_api(settings, tmp_path / "api.log") as url:
            yield url, settings
    finally:
        assert stop(projector) == 0, (tmp_path / "projector.log").read_text()[-3000:]


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url, headers=CLAIMS_AUTH, json=body, timeout=30)


def cli(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "topology_store.cli", "claim", *argv], env=settings_env(settings),
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_reused_request_id_is_refused_never_answered_with_another_command_decision(
    stack: tuple[str, Settings],
) -> None:
    url, settings = stack
    request_id = str(uuid.uuid4())
    body = {"request_id": request_id, "cell_id": "cell-1", "owner_type": "USER", "owner_id": 1,
            "claims": [{"bucket": "USERNAME", "value": "reuse"}, {"bucket": "EMAIL", "value": "Reuse@Example.com"}]}
    granted = post(f"{url}/v1/claims", body)
    assert granted.status_code == 201, granted.text
    lease_id = granted.json()["decisions"][0]["lease_id"]
    # No lease id given: it derives from the request id, so the retry below is the same
    # request on the same partition.
    assert lease_id == str(uuid.uuid5(uuid.UUID("7d4f6c1e-2b1a-5c8e-9f3d-6a0b1c2d3e4f"), request_id))

    # The same request again (the e-mail spelled otherwise, the claims in another order): a retry.
    retry = post(f"{url}/v1/claims", {**body, "claims": [{"bucket": "EMAIL", "value": "reuse@example.COM"},
                                                         {"bucket": "USERNAME", "value": "Reuse"}]})
    assert retry.status_code == 201 and retry.json() == granted.json()

    # A commit under the begin's request id: refused, not answered with the LeaseGranted.
    commit = post(f"{url}/v1/leases/{lease_id}/commit", {"cell_id": "cell-1", "request_id": request_id})
    assert commit.status_code == 409, commit.text
    error = commit.json()["error"]
    assert error["code"] == "request_id_reused" and "ClaimsRequested" in error["message"]
    assert "LeaseGranted" not in commit.text
    # A begin of other claims under the same id: refused too.
    other = post(f"{url}/v1/claims", {**body, "claims": [{"bucket": "USERNAME", "value": "someone-else"}]})
    assert other.status_code == 409 and other.json()["error"]["code"] == "request_id_reused"
    assert httpx.get(f"{url}/v1/claims/USERNAME/someone-else", headers=CLAIMS_AUTH).status_code == 404

    # The command line, with --wait (it reads the decision): exit 6, the reason on stderr.
    done = cli(settings, "commit", lease_id, "--cell", "cell-1", "--request-id", request_id, "--wait", "20")
    assert done.returncode == 6, (done.stdout, done.stderr)
    assert "request_id_reused" in done.stderr and "LeaseGranted" not in done.stdout

    # The lease was never committed by any of them; a commit of its own commits it.
    assert httpx.get(f"{url}/v1/claims/USERNAME/reuse", headers=CLAIMS_AUTH).json()["status"] == "LEASED"
    committed = post(f"{url}/v1/leases/{lease_id}/commit", {"cell_id": "cell-1"})
    assert committed.status_code == 200 and committed.json()["decisions"][0]["type"] == "LeaseCommitted"
    again = cli(settings, "commit", lease_id, "--cell", "cell-1", "--wait", "20")
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["outcome"] == "unchanged"

