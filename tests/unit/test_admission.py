"""Admission control of the claims service (service/admission.py, adr/0018): the bookkeeping
on a hand-moved clock, and ClaimsService refusing before it looks up or publishes anything."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import pytest

from topology_store.service import commands
from topology_store.service.admission import MAX_RETRY_AFTER_S, Admission, Budget, Overloaded, Ticket
from topology_store.service.claims import ClaimsService, Decided, RequestDecision


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        Budget(0, 1.0)
    with pytest.raises(ValueError, match="max_wait_age_s"):
        Budget(1, 0.0)


def test_in_flight_budget_sheds_new_work_and_frees_on_release() -> None:
    admission = Admission(Budget(max_in_flight=2, max_wait_age_s=10), clock=Clock())
    first, second = admission.admit(), admission.admit()
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    assert admission.in_flight == 2
    refused = admission.admit()
    assert refused == Overloaded(retry_after_s=1, reason="in_flight")
    assert admission.shed == {"in_flight": 1, "wait_age": 0} and admission.admitted == 2
    admission.release(first)
    admission.release(first)  # twice is harmless
    assert admission.in_flight == 1
    assert isinstance(admission.admit(), Ticket)
    assert admission.admitted == 3


def test_wait_age_budget_follows_the_oldest_in_flight() -> None:
    clock = Clock()
    admission = Admission(Budget(max_in_flight=100, max_wait_age_s=0.5), clock=clock)
    old = admission.admit()
    clock.now += 0.3
    young = admission.admit()
    assert isinstance(old, Ticket) and isinstance(young, Ticket)
    assert admission.oldest_wait_s() == pytest.approx(0.3)
    clock.now += 0.3  # the old one has waited 0.6 s, past the budget
    assert admission.spent() == "wait_age"
    assert admission.admit() == Overloaded(retry_after_s=1, reason="wait_age")
    admission.release(old)  # the young one (0.3 s) is now the oldest: within the budget
    assert admission.oldest_wait_s() == pytest.approx(0.3)
    assert isinstance(admission.admit(), Ticket)
    admission.release(young)
    clock.now += 0.2
    assert admission.in_flight == 1 and admission.oldest_wait_s() == pytest.approx(0.2)  # the last admitted
    assert admission.shed["wait_age"] == 1


def test_nothing_in_flight_has_no_age() -> None:
    admission = Admission(Budget(1, 0.1), clock=Clock())
    assert admission.oldest_wait_s() == 0.0 and admission.spent() is None


def test_commits_and_rollbacks_are_admitted_past_the_budget_and_counted() -> None:
    clock = Clock()
    admission = Admission(Budget(max_in_flight=1, max_wait_age_s=1.0), clock=clock)
    assert isinstance(admission.admit(), Ticket)
    essential = admission.admit(sheddable=False)
    assert isinstance(essential, Ticket)
    assert admission.in_flight == 2 and admission.admitted_essential == 1
    assert isinstance(admission.admit(), Overloaded)  # begins still shed while commits drain


def test_retry_after_grows_with_the_backlog_and_is_bounded() -> None:
    clock = Clock()
    admission = Admission(Budget(max_in_flight=1, max_wait_age_s=0.1), clock=clock)
    admission.admit()
    clock.now += 4.2
    assert admission.admit() == Overloaded(retry_after_s=5, reason="in_flight")
    clock.now += 3600
    refused = admission.admit()
    assert isinstance(refused, Overloaded) and refused.retry_after_s == MAX_RETRY_AFTER_S


# --- the service: a shed request is neither looked up nor published -------------------------------------


@dataclass
class Published:
    topic: str = "requests"
    partition: int = 0
    offset: int = 0


class RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[uuid.UUID] = []
        self.types: dict[uuid.UUID, str] = {}

    async def publish(self, event: object) -> Published:
        self.published.append(event.event_id)  # type: ignore[attr-defined]
        self.types[event.event_id] = event.EVENT_TYPE  # type: ignore[attr-defined]
        return Published(offset=len(self.published))


class GatedDecisions:
    """Decides each request when the test opens the gate, so requests stay in flight."""

    listening = True

    def __init__(self, publisher: RecordingPublisher | None = None) -> None:
        self.gate = asyncio.Event()
        self.looked_up: list[uuid.UUID] = []
        self.publisher = publisher

    async def find(self, request_id: uuid.UUID) -> RequestDecision | None:
        self.looked_up.append(request_id)
        return None

    async def wait(self, request_id: uuid.UUID, timeout_s: float, check_first: bool = True) -> RequestDecision | None:
        await self.gate.wait()
        # (A wait registers before its publish: after the gate opens it may not be published yet.)
        request_type = self.publisher.types.get(request_id, "ClaimsRequested") if self.publisher else "ClaimsRequested"
        return RequestDecision(request_id, request_type, "applied", None, [])


def _begin() -> object:
    return commands.begin(source="test", cell_id="cell-1", owner_type="USER", owner_id=1,
                          claims=[{"bucket": "USERNAME", "value": f"u{uuid.uuid4().hex[:8]}"}], lease_ttl_ms=60_000)


async def test_a_shed_request_is_refused_before_lookup_and_publish_and_commits_still_pass() -> None:
    publisher = RecordingPublisher()
    decisions = GatedDecisions(publisher)
    admission = Admission(Budget(max_in_flight=2, max_wait_age_s=60))
    service = ClaimsService(lambda: publisher, decisions, wait_s=5, admission=admission)
    waiting = [asyncio.create_task(service.submit(_begin())) for _ in range(2)]  # type: ignore[arg-type]
    while len(publisher.published) < 2:
        await asyncio.sleep(0)
    refused_begin = _begin()
    result = await service.submit(refused_begin)  # type: ignore[arg-type]
    assert isinstance(result, Overloaded) and result.reason == "in_flight"
    assert refused_begin.event_id not in publisher.published  # type: ignore[attr-defined]
    assert refused_begin.event_id not in decisions.looked_up  # type: ignore[attr-defined]
    for build in (commands.commit, commands.rollback):
        command = build(source="test", lease_id=uuid.uuid4(), cell_id="cell-1")
        passing = asyncio.create_task(service.submit(command))
        while command.event_id not in publisher.published:
            await asyncio.sleep(0)
        waiting.append(passing)
    assert admission.in_flight == 4
    decisions.gate.set()
    assert all(isinstance(r, Decided) for r in await asyncio.gather(*waiting))
    assert admission.in_flight == 0 and admission.shed["in_flight"] == 1
    assert isinstance(await service.submit(_begin()), Decided)  # type: ignore[arg-type]


async def test_a_failed_submission_frees_its_place() -> None:
    class Broken:
        async def publish(self, event: object) -> Published:
            raise ConnectionError("broker away")

    admission = Admission(Budget(max_in_flight=1, max_wait_age_s=60))
    service = ClaimsService(lambda: Broken(), GatedDecisions(), wait_s=5, admission=admission)
    for _ in range(3):
        result = await service.submit(_begin())  # type: ignore[arg-type]
        assert not isinstance(result, Overloaded)
    assert admission.in_flight == 0 and admission.admitted == 3


def test_an_early_refusal_is_counted_and_takes_no_place() -> None:
    clock = Clock()
    admission = Admission(Budget(max_in_flight=1, max_wait_age_s=10), clock=clock)
    assert admission.refuse() is None  # room left: the request goes on to admit()
    ticket = admission.admit()
    assert isinstance(ticket, Ticket)
    assert admission.refuse() == Overloaded(retry_after_s=1, reason="in_flight")
    assert admission.in_flight == 1 and admission.shed["in_flight"] == 1 and admission.admitted == 1
    admission.release(ticket)
    assert admission.refuse() is None


def test_topology_claim_says_it_was_refused_and_exits_5() -> None:
    import argparse
    import io

    from topology_store.cli.claim import report
    from topology_store.runtime.settings import Settings

    command = _begin()
    out, err = io.StringIO(), io.StringIO()
    status = report(Overloaded(retry_after_s=3, reason="wait_age"), command, Settings(),  # type: ignore[arg-type]
                    argparse.Namespace(wait=10.0), out, err)
    assert status == 5 and out.getvalue() == ""
    message = err.getvalue()
    assert "refused, not published" in message and "retry in 3s" in message
    assert str(command.event_id) in message  # type: ignore[attr-defined]
