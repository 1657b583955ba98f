"""The claims application service: submit a claim command, answer with its decision
(adr/0010, adr/0015).

Every door calls this alike: HTTP (``query_api/claims_api.py``), the command line
(``cli/claim.py``), and any later transport. The service publishes the command to the
claim-requests topic and waits for the projector's decision (read-your-writes); the
projector alone decides, in log order, so a door never decides anything itself.

The two things it needs from the outside are ports, implemented by adapters above it:
a :class:`CommandPublisher` (``producer.publisher.EventPublisher``) and a
:class:`DecisionSource` (``query_api.decisions.DecisionWaiter``, which reads the
projection's ``processed_events``).

A request id answers for one request only: a door that finds the id decided already for
another command (another type, or the same type with other content, by
``core.claims.request_digest``) answers :class:`RequestReused`, never that command's
decision (adr/0017).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from topology_store.core.claims import request_digest
from topology_store.schemas.models import Event, LeaseCommitRequested, LeaseRollbackRequested
from topology_store.service.admission import Admission, Overloaded


@dataclass(frozen=True, slots=True)
class RequestDecision:
    """The projector's decision on one request, as recorded."""

    request_id: uuid.UUID
    request_type: str
    outcome: str  # applied | unchanged | rejected
    reason: str | None
    decisions: list[dict[str, Any]]  # the decision events, as JSON
    digest: bytes | None = None  # core.claims.request_digest of the request (None: recorded before 0008)


class Acknowledgement(Protocol):
    """Where the broker put the command (``producer.publisher.Published``)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


class CommandPublisher(Protocol):
    async def publish(self, event: Event) -> Acknowledgement:
        """Return once the broker acknowledged ``event``; raise if it did not."""
        ...


class DecisionSource(Protocol):
    #: True while the source hears decisions as they are recorded (its database answered
    #: just now). A door-made request id skips the lookup before publishing only then;
    #: otherwise that lookup is the probe that refuses the request while the database is
    #: down, before anything is published.
    listening: bool

    async def find(self, request_id: uuid.UUID) -> RequestDecision | None:
        """The decision on ``request_id`` if one is recorded now."""
        ...

    async def wait(self, request_id: uuid.UUID, timeout_s: float, check_first: bool = True) -> RequestDecision | None:
        """The decision, once recorded, or None after ``timeout_s``. Registers at once,
        so a decision recorded after the call cannot slip past."""
        ...


# What a submission came to. Doors map these to their own answers (HTTP statuses,
# exit codes); the service never formats anything.


@dataclass(frozen=True, slots=True)
class Decided:
    decision: RequestDecision
    acknowledgement: Acknowledgement | None  # None: decided before, not published again


@dataclass(frozen=True, slots=True)
class Pending:
    """Published, but no decision within the wait: it will come; ask again by id."""

    request_id: uuid.UUID
    acknowledgement: Acknowledgement | None


@dataclass(frozen=True, slots=True)
class NotPublished:
    """The broker did not acknowledge: the command may or may not be in the log, so a
    retry with the same request id is the safe next step (the projector absorbs a
    duplicate by event id)."""

    request_id: uuid.UUID
    cause: BaseException


@dataclass(frozen=True, slots=True)
class DecisionUnreadable:
    """Published, so it will be decided, but the decision cannot be read now."""

    request_id: uuid.UUID
    cause: BaseException


@dataclass(frozen=True, slots=True)
class RequestReused:
    """The request id names another command already: its recorded decision is not this
    command's answer, and this command was not decided (adr/0017). The client sends it
    again under a new request id."""

    request_id: uuid.UUID
    recorded_type: str  # the type of the command the id was first used for
    same_type: bool  # the same type, with other content


Submission = Decided | Pending | NotPublished | DecisionUnreadable | Overloaded | RequestReused

#: Never shed by admission control: they finish granted work and free values (adr/0018).
NEVER_SHED = (LeaseCommitRequested, LeaseRollbackRequested)


class ClaimsService:
    def __init__(
        self,
        publisher: Callable[[], Any],
        decisions: DecisionSource,
        wait_s: float,
        unreadable: tuple[type[BaseException], ...] = (Exception,),
        admission: Admission | None = None,
        secret: bytes | None = None,
    ) -> None:
        """``publisher``: returns (or awaits to) a :class:`CommandPublisher`, so a door can
        start its Kafka producer on first use and keep serving reads while the broker is
        away. ``wait_s``: the default wait for a decision. ``unreadable``: the errors
        of ``decisions`` that mean "cannot read now" rather than a bug. ``admission``: the
        budget of waiting submissions past which new ones are refused (adr/0018). ``secret``:
        the claim secret, which keys request digests (None: a reused request id is told
        apart by the request type alone)."""
        self.admission = admission
        self._secret = secret
        self._publisher = publisher
        self._decisions = decisions
        self.wait_s = wait_s
        self._unreadable = unreadable

    async def submit(
        self,
        command: Event,
        wait_s: float | None = None,
        reuse_decided: bool = True,
        on_published: Callable[[Acknowledgement], None] | None = None,
        new_id: bool = False,
    ) -> Submission:
        """:meth:`_submit` under admission control: past the budget a command that may be
        shed is answered :class:`Overloaded` at once, before anything is looked up or
        published (adr/0018)."""
        if self.admission is None:
            return await self._submit(command, wait_s, reuse_decided, on_published, new_id)
        ticket = self.admission.admit(sheddable=not isinstance(command, NEVER_SHED))
        if isinstance(ticket, Overloaded):
            return ticket
        try:
            return await self._submit(command, wait_s, reuse_decided, on_published, new_id)
        finally:
            self.admission.release(ticket)

    async def _submit(
        self,
        command: Event,
        wait_s: float | None = None,
        reuse_decided: bool = True,
        on_published: Callable[[Acknowledgement], None] | None = None,
        new_id: bool = False,
    ) -> Submission:
        """Publish ``command`` and wait up to ``wait_s`` (default: the service's) for its
        decision; ``wait_s=0`` publishes without waiting.

        ``reuse_decided``: answer a request id that is decided already with its recorded
        decision instead of publishing it again (a client retrying after a timeout).
        ``new_id``: the door generated the request id just now (the client gave none), so
        no decision can exist for it and none is looked up while the decision source is
        listening: a database round trip less before the publish (issue 13)."""
        request_id = command.event_id
        wait_s = self.wait_s if wait_s is None else wait_s
        if reuse_decided and not (new_id and self._decisions.listening):
            known = await self._decisions.find(request_id)
            if known is not None:
                return self._reused(command, known) or Decided(known, None)
        waiting = None
        if wait_s > 0:
            waiting = asyncio.create_task(self._decisions.wait(request_id, wait_s,
                                                               check_first=not (reuse_decided or new_id)))
            await asyncio.sleep(0)  # let the waiter register before the request can be decided
        try:
            publisher = self._publisher()
            if asyncio.iscoroutine(publisher):
                publisher = await publisher
            acknowledgement = await publisher.publish(command)
        except Exception as exc:  # noqa: BLE001 - any failure to publish means "not acknowledged"
            if waiting is not None:
                waiting.cancel()
            return NotPublished(request_id, exc)
        if on_published is not None:
            on_published(acknowledgement)
        if waiting is None:
            return Pending(request_id, acknowledgement)
        try:
            decision = await waiting
        except self._unreadable as exc:
            return DecisionUnreadable(request_id, exc)
        if decision is None:
            return Pending(request_id, acknowledgement)
        # The id may have been decided for another command first: the log absorbed this
        # one as a duplicate, and that decision is not its answer.
        return self._reused(command, decision) or Decided(decision, acknowledgement)

    def _reused(self, command: Event, decision: RequestDecision) -> RequestReused | None:
        """Whether ``decision`` was recorded for another command than ``command``."""
        if decision.request_type != command.EVENT_TYPE:
            return RequestReused(command.event_id, decision.request_type, same_type=False)
        if (decision.digest is not None and self._secret is not None
                and decision.digest != request_digest(command, self._secret)):
            return RequestReused(command.event_id, decision.request_type, same_type=True)
        return None
