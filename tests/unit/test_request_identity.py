"""Idempotency that cannot be fooled, and ticks that land where their leases are (adr/0017):

- ``core.claims.request_digest``: a retry of a request (new ``occurred_at``, any spelling
  of the same claims, in any order) has the same digest; any change to what it asks
  changes it; the digest is keyed by the claim secret;
- ``service.commands.begin``: a begin without a lease id derives it from its request id;
- ``ClaimsService``: a request id decided already for another command is answered
  :class:`RequestReused`, never with that command's decision (through the service's
  ports, with the decisions it would read);
- ``projector.ticks``: one tick per partition, naming only that partition's leases and
  keyed by the first; a lease named recently is not named again until the retick time.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from tests.unit.claims_support import SECRET, T0, begin, commit, destroy, ns, ref, rollback, sequence, transfer
from topology_store.core.claims import request_digest
from topology_store.projector.ticks import recently_named, ticks_for
from topology_store.schemas.models import MAX_LEASES_PER_TICK, ClaimBucket, Event, LeaseExpiryTick, protect_value
from topology_store.service import commands
from topology_store.service.claims import ClaimsService, Decided, RequestDecision, RequestReused

# --- request_digest --------------------------------------------------------------------------


def test_a_retry_of_the_same_request_has_the_same_digest() -> None:
    request_id, lease_id = uuid.uuid4(), uuid.uuid4()
    first = begin((ref("Ada", ClaimBucket.USERNAME), ref("Ada@Example.com", ClaimBucket.EMAIL)),
                  event_id=request_id, lease_id=lease_id)
    hashed = protect_value(ClaimBucket.EMAIL, "ada@example.com", SECRET)
    retry = begin((ref(hashed, ClaimBucket.EMAIL), ref("ADA", ClaimBucket.USERNAME)), event_id=request_id,
                  lease_id=lease_id).model_copy(update={"occurred_at": T0 + timedelta(minutes=5),
                                                        "source": "another-door", "trace_id": "t"})
    assert request_digest(first, SECRET) == request_digest(retry, SECRET)


def _changed(command: Event, **fields: Any) -> Event:
    return type(command).model_validate({**command.model_dump(), **fields})


@pytest.mark.parametrize(
    ("command", "change"),
    [
        (begin(ns("a", "b")), {"claims": ns("a", "c")}),
        (begin(ns("a")), {"owner_id": 99}),
        (begin(ns("a")), {"cell_id": "cell-9"}),
        (begin(ns("a")), {"lease_ttl_ms": 5000}),
        (begin(ns("a")), {"lease_id": uuid.UUID(int=5)}),
        (commit(uuid.UUID(int=1)), {"lease_id": uuid.UUID(int=2)}),
        (commit(uuid.UUID(int=1)), {"cell_id": "cell-2"}),
        (destroy(ns("a")), {"claims": ns("b")}),
        (transfer(), {"to_cell_id": "cell-2"}),
        (sequence(size=10), {"size": 11}),
    ],
    ids=["claims", "owner", "cell", "ttl", "lease", "commit-lease", "commit-cell", "destroy", "transfer", "sequence"],
)
def test_any_change_to_what_a_request_asks_changes_its_digest(command: Event, change: dict[str, Any]) -> None:
    assert request_digest(command, SECRET) != request_digest(_changed(command, **change), SECRET)


def test_a_commit_and_a_rollback_of_one_lease_differ_and_the_digest_is_keyed() -> None:
    lease = uuid.UUID(int=7)
    assert request_digest(commit(lease), SECRET) != request_digest(rollback(lease), SECRET)
    assert request_digest(commit(lease), SECRET) != request_digest(commit(lease), b"another-secret")
    assert len(request_digest(commit(lease), SECRET)) == 32


# --- the lease id of a begin -------------------------------------------------------------------


def _begin(**extra: Any) -> Any:
    return commands.begin(source="t", cell_id="cell-1", owner_type="USER", owner_id=1,
                          claims=[{"bucket": "USERNAME", "value": "ada"}], lease_ttl_ms=60_000, **extra)


def test_a_begin_without_a_lease_id_derives_it_from_its_request_id() -> None:
    request_id = uuid.uuid4()
    first, retry = _begin(request_id=request_id), _begin(request_id=request_id)
    assert first.lease_id == retry.lease_id == commands.lease_id_for(request_id)
    assert first.partition_key == retry.partition_key  # the same Kafka key, so the same partition
    assert _begin(request_id=uuid.uuid4()).lease_id != first.lease_id
    fresh = _begin()
    assert fresh.lease_id == commands.lease_id_for(fresh.event_id)
    given = uuid.uuid4()
    assert _begin(request_id=request_id, lease_id=given).lease_id == given


# --- ClaimsService: a request id reused ----------------------------------------------------------


class Published:
    topic, partition, offset = "t", 0, 0


class Publisher:
    def __init__(self) -> None:
        self.sent: list[Event] = []

    async def publish(self, event: Event) -> Published:
        self.sent.append(event)
        return Published()


class Decisions:
    """The decisions recorded so far, by request id, as the service's port reads them."""

    listening = True

    def __init__(self, recorded: dict[uuid.UUID, RequestDecision]) -> None:
        self.recorded = recorded

    async def find(self, request_id: uuid.UUID) -> RequestDecision | None:
        return self.recorded.get(request_id)

    async def wait(self, request_id: uuid.UUID, timeout_s: float, check_first: bool = True) -> RequestDecision | None:
        return self.recorded.get(request_id)


def _recorded(command: Event, digest: bytes | None) -> RequestDecision:
    return RequestDecision(command.event_id, command.EVENT_TYPE, "applied", None,
                           [{"type": "LeaseGranted", "lease_id": "x"}], digest)


@pytest.mark.parametrize("reuse_decided", [True, False], ids=["http", "cli"])
async def test_a_request_id_decided_for_another_command_is_refused(reuse_decided: bool) -> None:
    first = _begin(request_id=uuid.uuid4())
    publisher = Publisher()
    recorded = {first.event_id: _recorded(first, request_digest(first, SECRET))}
    service = ClaimsService(lambda: publisher, Decisions(recorded), wait_s=1.0, secret=SECRET)

    same = await service.submit(_begin(request_id=first.event_id), reuse_decided=reuse_decided)
    assert isinstance(same, Decided) and same.decision is recorded[first.event_id]

    a_commit = commands.commit(source="t", lease_id=first.lease_id, cell_id="cell-1", request_id=first.event_id)
    assert await service.submit(a_commit, reuse_decided=reuse_decided) == RequestReused(
        first.event_id, "ClaimsRequested", same_type=False)
    other = commands.begin(source="t", cell_id="cell-1", owner_type="USER", owner_id=1, request_id=first.event_id,
                           claims=[{"bucket": "USERNAME", "value": "grace"}], lease_ttl_ms=60_000)
    assert await service.submit(other, reuse_decided=reuse_decided) == RequestReused(
        first.event_id, "ClaimsRequested", same_type=True)
    # The HTTP door answers without publishing; the CLI publishes (a duplicate the log absorbs).
    assert len(publisher.sent) == (0 if reuse_decided else 3)


async def test_without_a_recorded_digest_only_the_type_tells() -> None:
    first = _begin(request_id=uuid.uuid4())
    recorded = {first.event_id: _recorded(first, None)}  # decided before migration 0008
    service = ClaimsService(lambda: Publisher(), Decisions(recorded), wait_s=1.0, secret=SECRET)
    other = commands.begin(source="t", cell_id="cell-1", owner_type="USER", owner_id=1, request_id=first.event_id,
                           claims=[{"bucket": "USERNAME", "value": "grace"}], lease_ttl_ms=60_000)
    assert isinstance(await service.submit(other), Decided)
    a_commit = commands.commit(source="t", lease_id=first.lease_id, cell_id="cell-1", request_id=first.event_id)
    assert isinstance(await service.submit(a_commit), RequestReused)


# --- projector.ticks ---------------------------------------------------------------------------


def test_ticks_name_only_the_leases_of_one_partition_keyed_by_the_first() -> None:
    partitions = list(range(8))
    partitioner = DefaultPartitioner()
    leases = [uuid.uuid4() for _ in range(200)]
    by_partition: dict[int, list[uuid.UUID]] = {}
    for lease_id in leases:
        by_partition.setdefault(partitioner(str(lease_id).encode(), partitions, partitions), []).append(lease_id)
    ticks = ticks_for(by_partition, "projector@test")
    assert len(ticks) == len(by_partition)
    assert sorted(l for t in ticks for l in t.lease_ids) == sorted(leases)
    for tick in ticks:
        # Where the tick's key sends it is where every lease it names lives.
        home = partitioner(tick.partition_key.encode(), partitions, partitions)
        assert tick.partition_key == str(tick.lease_ids[0])
        assert {partitioner(str(l).encode(), partitions, partitions) for l in tick.lease_ids} == {home}


def test_a_partition_with_many_due_leases_gets_several_ticks() -> None:
    leases = [uuid.UUID(int=n) for n in range(MAX_LEASES_PER_TICK + 5)]
    ticks = ticks_for({3: leases}, "p")
    assert [len(t.lease_ids) for t in ticks] == [MAX_LEASES_PER_TICK, 5]
    assert all(isinstance(t, LeaseExpiryTick) for t in ticks)


def test_a_lease_named_recently_waits_for_the_retick_time() -> None:
    a, b = uuid.UUID(int=1), uuid.UUID(int=2)
    named: dict[uuid.UUID, float] = {a: 100.0, b: 95.0}
    assert recently_named(named, now_s=101.0, retick_s=2.0) == {a}
    assert named == {a: 100.0}  # b may be named again (if still due): forgotten
    assert recently_named(named, now_s=102.0, retick_s=2.0) == set()
    assert named == {}


class CountedDecisions(Decisions):
    """:class:`Decisions` that counts the lookups the service asks for."""

    def __init__(self, recorded: dict[uuid.UUID, RequestDecision]) -> None:
        super().__init__(recorded)
        self.looked_up: list[uuid.UUID] = []
        self.checked_first: list[bool] = []

    async def find(self, request_id: uuid.UUID) -> RequestDecision | None:
        self.looked_up.append(request_id)
        return await super().find(request_id)

    async def wait(self, request_id: uuid.UUID, timeout_s: float, check_first: bool = True) -> RequestDecision | None:
        self.checked_first.append(check_first)
        return await super().wait(request_id, timeout_s, check_first)


@pytest.mark.parametrize("new_id", [True, False], ids=["id-made-by-the-door", "id-from-the-client"])
async def test_only_a_request_id_from_the_client_is_looked_up_before_publishing(new_id: bool) -> None:
    command = _begin()
    publisher = Publisher()
    # The decision the projector would record once the command is published.
    decisions = CountedDecisions({command.event_id: _recorded(command, request_digest(command, SECRET))})
    service = ClaimsService(lambda: publisher, decisions, wait_s=1.0, secret=SECRET)
    decisions_before_publish = dict(decisions.recorded)
    if not new_id:
        decisions.recorded.clear()  # a client's id not decided yet: looked up, then published
    answer = await service.submit(command, new_id=new_id)
    # A door-made id is new: no lookup at all, neither before publishing nor before waiting.
    assert decisions.looked_up == ([] if new_id else [command.event_id])
    assert decisions.checked_first == [False]
    assert publisher.sent == [command]
    if new_id:
        assert isinstance(answer, Decided) and answer.decision is decisions_before_publish[command.event_id]


async def test_a_door_made_id_is_looked_up_while_the_decision_source_does_not_listen() -> None:
    """The database went away (the waiter's LISTEN failed): the lookup is the probe that
    refuses the request before it is published, as for a client's id."""
    command = _begin()
    publisher = Publisher()
    decisions = CountedDecisions({})
    decisions.listening = False
    service = ClaimsService(lambda: publisher, decisions, wait_s=1.0, secret=SECRET)
    await service.submit(command, new_id=True)
    assert decisions.looked_up == [command.event_id]
    assert decisions.checked_first == [False]
