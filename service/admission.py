"""Admission control of the claims service: refuse new work at once when the decisions
already awaited are too many or too old, instead of queuing it (adr/0018).

Pure bookkeeping, no I/O: :class:`Admission` counts the submissions in flight (from
admission to their answer) and remembers when each started, so the oldest one's age is
known in O(1). A new submission that may be shed (a begin, a destroy, a transfer, a
sequence range) is refused when admitting it would pass ``max_in_flight`` or when the
oldest submission in flight has waited longer than ``max_wait_age_s``. Commits and
rollbacks are never shed: they finish work already granted and free values, and a
refused commit would let its lease's TTL run out because of our own queue. They still
count in flight, so they hold new begins back while the backlog drains.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Budget:
    """How much waiting the service takes on before it sheds new work."""

    max_in_flight: int
    max_wait_age_s: float

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {self.max_in_flight}")
        if not self.max_wait_age_s > 0:
            raise ValueError(f"max_wait_age_s must be positive, not {self.max_wait_age_s}")


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted submission; give it back with :meth:`Admission.release`."""

    number: int
    started: float


@dataclass(frozen=True, slots=True)
class Overloaded:
    """Refused before anything was published: retry after ``retry_after_s`` seconds."""

    retry_after_s: int
    reason: str  # in_flight | wait_age: which budget was spent


#: The longest Retry-After advised: past it a client would rather hear about an outage.
MAX_RETRY_AFTER_S = 30


class Admission:
    """Counts the submissions in flight and decides whether a new one is admitted."""

    def __init__(self, budget: Budget, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self._clock = clock
        self._numbers = itertools.count()
        # Insertion order is start order, so the first entry is the oldest in flight.
        self._started: dict[int, float] = {}
        self.admitted = 0  # submissions admitted, ever
        self.admitted_essential = 0  # of which commits and rollbacks admitted past a spent budget
        self.shed: dict[str, int] = {"in_flight": 0, "wait_age": 0}  # submissions refused, ever, by budget spent

    @property
    def in_flight(self) -> int:
        return len(self._started)

    def oldest_wait_s(self) -> float:
        """How long the oldest submission in flight has waited; 0 when none is."""
        for started in self._started.values():
            return max(0.0, self._clock() - started)
        return 0.0

    def spent(self) -> str | None:
        """Which budget a new submission would overrun (``in_flight``, ``wait_age``), or None."""
        if self.in_flight >= self.budget.max_in_flight:
            return "in_flight"
        if self.oldest_wait_s() > self.budget.max_wait_age_s:
            return "wait_age"
        return None

    def admit(self, sheddable: bool = True) -> Ticket | Overloaded:
        """A ticket for a new submission, or :class:`Overloaded` when the budget is spent
        and the submission may be shed (``sheddable=False``: a commit or a rollback)."""
        reason = self.spent()
        if reason is not None:
            if sheddable:
                self.shed[reason] += 1
                return Overloaded(self.retry_after_s(), reason)
            self.admitted_essential += 1
        ticket = Ticket(next(self._numbers), self._clock())
        self._started[ticket.number] = ticket.started
        self.admitted += 1
        return ticket

    def refuse(self) -> Overloaded | None:
        """For a door that can refuse before it has even read a request (adr/0018): an
        :class:`Overloaded`, counted as shed, when the budget is spent; else None, and
        the request goes on to :meth:`admit` as usual."""
        reason = self.spent()
        if reason is None:
            return None
        self.shed[reason] += 1
        return Overloaded(self.retry_after_s(), reason)

    def release(self, ticket: Ticket) -> None:
        """The submission got its answer (or failed): it no longer waits. Idempotent."""
        self._started.pop(ticket.number, None)

    def retry_after_s(self) -> int:
        """Whole seconds (HTTP's Retry-After): about the time the oldest submission has
        waited, which is about how long the backlog ahead takes to drain; at least 1."""
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.oldest_wait_s())))
