"""What flows while a broker fails, on a thread of its own (one event loop):

- the workload (``tests/integration/workload.py``: cells, namespace claims, claim
  requests, redeliveries) through the project's ``EventPublisher``, paced, a chunk at a
  time; events not acknowledged are published again, same event id, until they are;
- a probe: one ``CellUpdated`` of a cell of its own at a time through a second
  publisher, each awaited, so its acknowledgement times say when the cells partition
  took writes again; and the read API polled for the probe's weight, to say when
  a post-fault event was served;
- claim races through the read API's HTTP claims door: two owners ask for the same
  username at once, each retrying (same request id) until it has a decision.

Every acknowledgement and every answer is recorded with its time, for the checks and
the recovery figures.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.conftest import AUTH, CLAIMS_AUTH
from tests.integration.workload import Workload
from topology_store.producer.publisher import EventPublisher, Published, PublishFailed
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import CellRegistered, CellUpdated, Event

PROBE_CELL = "cell-probe"
RACE_TTL_MS = 3_600_000  # no lease of a race expires during a run (no LeaseExpiryTick)


@dataclass(frozen=True)
class Ack:
    event_id: uuid.UUID
    topic: str
    partition: int
    offset: int
    at: float  # time.monotonic() when the publisher yielded it


@dataclass
class ProbeWrite:
    event: CellUpdated
    sent_at: float  # first attempt
    acked_at: float | None = None
    attempts: int = 0


@dataclass
class ClaimAttempt:
    """One owner's claim request of a race, through all its retries."""

    value: str
    owner_id: int
    request_id: uuid.UUID
    sent_at: float
    decided_at: float | None = None
    status: int | None = None  # the deciding answer: 201 granted, 409 refused
    answers: list[int | str] = field(default_factory=list)  # every answer on the way, "error" for none


class Traffic:
    def __init__(self, settings: Settings, api: str, work: Workload, rate: float = 200.0, chunk: int = 25,
                 race_every_s: float = 0.5, probe_every_s: float = 0.2) -> None:
        self.settings = settings
        self.api = api
        self.work = work
        self.rate = rate
        self.chunk = chunk
        self.race_every_s = race_every_s
        self.probe_every_s = probe_every_s
        self.acks: list[Ack] = []
        self.failures: list[tuple[float, str]] = []  # (when, why) of every event not acknowledged
        self.probes: list[ProbeWrite] = []
        self.served: list[tuple[float, int]] = []  # (when, probe weight the read API served)
        self.races: list[tuple[ClaimAttempt, ClaimAttempt]] = []
        self.published_workload = 0  # events of the workload acknowledged so far (a prefix)
        self.errors: list[BaseException] = []
        self._hurry = threading.Event()  # the rest of the workload at full speed
        self._enough = threading.Event()  # no new probes or races
        self._thread = threading.Thread(target=self._run, name="cluster-traffic", daemon=True)

    # --- control, from the test's thread ----------------------------------------------------------

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def finish(self, timeout_s: float = 240) -> None:
        """Publish what is left of the workload at once, stop the probe and the races once
        every one has its acknowledgement or decision, and wait for all of it."""
        self.wind_down()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"the traffic did not finish within {timeout_s}s")
        if self.errors:
            raise self.errors[0]

    def wind_down(self) -> None:
        """What finish() asks, without waiting for it."""
        self._hurry.set()
        self._enough.set()

    def workload_done(self) -> bool:
        return self.published_workload >= len(self.work.events)

    def acknowledged(self) -> int:
        return len(self.acks)

    # --- the flows --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - handed to the test by finish()
            self.errors.append(exc)

    async def _main(self) -> None:
        async with EventPublisher(self.settings) as publisher, EventPublisher(self.settings) as probe:
            await self._publish_until_acked(probe, [CellRegistered(
                source="cluster-test", cell_id=PROBE_CELL, address="https://probe.example.com",
                session_prefix="probe", region="eu")])
            async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as http:
                await asyncio.gather(self._workload(publisher), self._probe(probe), self._races(http),
                                     self._watch_api(http))

    async def _publish_until_acked(self, publisher: EventPublisher, events: list[Event]) -> None:
        """Publish ``events`` in order; those not acknowledged again (same event ids), in
        order, until every one is."""
        pending = events
        attempt = 0
        while pending:
            failed: list[Event] = []
            async for outcome in publisher.publish_many(pending):
                if isinstance(outcome, PublishFailed):
                    failed.append(outcome.event)
                    self.failures.append((time.monotonic(), repr(outcome.cause)))
                else:
                    self._record(outcome)
            pending = failed
            if pending:
                attempt += 1
                await asyncio.sleep(min(2.0, 0.2 * attempt))

    def _record(self, published: Published) -> None:
        self.acks.append(Ack(published.event_id, published.topic, published.partition, published.offset,
                             time.monotonic()))

    async def _workload(self, publisher: EventPublisher) -> None:
        events = self.work.events
        for start_at in range(0, len(events), self.chunk):
            began = time.monotonic()
            chunk = events[start_at : start_at + self.chunk]
            await self._publish_until_acked(publisher, chunk)
            self.published_workload = start_at + len(chunk)
            if not self._hurry.is_set():
                await asyncio.sleep(max(0.0, len(chunk) / self.rate - (time.monotonic() - began)))

    async def _probe(self, publisher: EventPublisher) -> None:
        number = 0
        while not self._enough.is_set():
            number += 1
            write = ProbeWrite(CellUpdated(source="cluster-test", cell_id=PROBE_CELL, weight=1000 + number),
                               sent_at=time.monotonic())
            self.probes.append(write)
            while write.acked_at is None:
                write.attempts += 1
                try:
                    published = await publisher.publish(write.event)
                except PublishFailed as exc:
                    self.failures.append((time.monotonic(), repr(exc.cause)))
                    await asyncio.sleep(0.2)
                    continue
                write.acked_at = time.monotonic()
                self._record(published)
            await asyncio.sleep(self.probe_every_s)

    async def _watch_api(self, http: httpx.AsyncClient) -> None:
        while not (self._enough.is_set() and self.workload_done()):
            try:
                response = await http.get(f"{self.api}/v1/cells/{PROBE_CELL}", headers=AUTH, timeout=5)
                if response.status_code == 200:
                    self.served.append((time.monotonic(), int(response.json()["weight"])))
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)

    async def _races(self, http: httpx.AsyncClient) -> None:
        running: list[asyncio.Task[Any]] = []
        number = 0
        while not self._enough.is_set():
            number += 1
            value = f"race-{number}"
            pair = tuple(ClaimAttempt(value, owner_id, uuid.uuid4(), time.monotonic())
                         for owner_id in (2 * number, 2 * number + 1))
            self.races.append(pair)  # type: ignore[arg-type]
            running.extend(asyncio.create_task(self._claim(http, attempt)) for attempt in pair)
            await asyncio.sleep(self.race_every_s)
        await asyncio.gather(*running)

    async def _claim(self, http: httpx.AsyncClient, attempt: ClaimAttempt) -> None:
        """POST the begin until it is decided: a 503 (not published) or a 429 (refused by
        admission control, not published, adr/0018) is sent again with the same request id,
        a 504 (published, not yet decided) is asked after by id."""
        body = {"request_id": str(attempt.request_id), "cell_id": "cell-1", "owner_type": "USER",
                "owner_id": attempt.owner_id, "claims": [{"bucket": "USERNAME", "value": attempt.value}],
                "lease_ttl_ms": RACE_TTL_MS}
        published = False
        while True:
            try:
                if published:
                    response = await http.get(f"{self.api}/v1/requests/{attempt.request_id}", headers=CLAIMS_AUTH)
                else:
                    response = await http.post(f"{self.api}/v1/claims", json=body, headers=CLAIMS_AUTH)
            except httpx.HTTPError:
                attempt.answers.append("error")
                await asyncio.sleep(0.5)
                continue
            attempt.answers.append(response.status_code)
            if response.status_code in (200, 201, 409):
                attempt.decided_at, attempt.status = time.monotonic(), response.status_code
                return
            if response.status_code == 504:
                published = True  # decided later: ask by id
            elif response.status_code not in (404, 429, 503):
                raise AssertionError(f"claim {attempt.value}: unexpected answer {response.status_code}: "
                                     f"{response.text[:500]}")
            await asyncio.sleep(0.5)
