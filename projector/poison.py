"""Poison records: records the projector can read but cannot apply.

``read_record`` (projector/consumer.py) already turns unreadable records into dead
letters. What remains is a record that decodes and validates, and then fails while
its batch is applied: the database refuses one of its values (``DataError``,
``IntegrityError``; for example a character the database encoding cannot hold), or
the pure rules raise on a case they do not cover (``OverflowError`` for a lease that
would end after the year 9999). Such a failure recurs on every retry, so retrying
the batch would block its partitions for good.

Failures are sorted by :func:`is_transient`:

- **transient**: the connection broke, the server is shutting down or out of
  connections, a serialization failure or deadlock, a pool timeout, and errors no
  single record can cause (a missing table or privilege after a bad deploy). The
  projector pauses with capped exponential backoff and jitter, then re-reads from
  the stored offsets. Nothing is dead-lettered for these.
- **deterministic**: everything else. :func:`isolate` bisects the batch. Halves are
  committed in log order, each a contiguous run of every partition it touches, so
  offsets still advance by compare-and-set from the stored position (adr/0002). A
  half that fails again is split again, down to one record, which is then committed
  as a dead letter in place of its event: bytes, key, headers, partition, offset and
  the error, in the same transaction that moves its partition on. If even that
  commit fails, the record was not the cause, and the projector backs off instead.

A poison record costs about two transactions per halving (log2 of the batch size).

One deterministic failure is never a record's fault: a unique violation on a position
(``event_archive`` or ``dead_letters`` already holds an offset of the batch). The stored
offsets moved backwards under this member; it seeks to them again, and the consumer's
comparison with the archive skips what was applied or refuses the partition (adr/0019).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import psycopg
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from topology_store.runtime.retry import backoff, sleep_unless

if TYPE_CHECKING:
    from topology_store.projector.consumer import Projector

log = logging.getLogger("topology_store.projector.consumer")

Batch = Mapping[TopicPartition, Sequence[ConsumerRecord]]
Position = tuple[str, int, int]  # topic, partition, offset
# What Projector._commit reports to the isolation: its batch committed; or it was
# abandoned (fenced, or a transient failure: positions were re-read from the
# database, so the rest of an isolation is stale); or the deterministic error.
CommitOutcome = Literal["committed", "abandoned"] | BaseException

def database_error(exc: BaseException) -> psycopg.Error | None:
    """The psycopg error behind ``exc``: SQLAlchemy wraps it, COPY (projector/bulk.py) does not."""
    if isinstance(exc, DBAPIError) and isinstance(exc.orig, psycopg.Error):
        return exc.orig
    return exc if isinstance(exc, psycopg.Error) else None


# Unique keys on a record's position: a violation means the position was recorded before.
POSITION_KEYS = frozenset({"event_archive_pkey", "dead_letters_position_key"})


def position_recorded(exc: BaseException) -> bool:
    """Whether ``exc`` says a position of the batch is archived or dead-lettered already."""
    db = database_error(exc)
    return isinstance(db, psycopg.errors.UniqueViolation) and db.diag.constraint_name in POSITION_KEYS


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same batch later can succeed. When in doubt about a
    database error: transient, since only a record's own fault may dead-letter it."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    db = database_error(exc)
    if db is not None:
        if isinstance(db, psycopg.DataError | psycopg.IntegrityError):
            return False  # SQLSTATE classes 22 and 23: this data, every time
        # Class 54 (program limit exceeded) is a value too large for an index row.
        return not (db.sqlstate or "").startswith("54")
    # SQLAlchemy's own errors (pool timeout, a connection left unusable) and the
    # network's are about the connection, never about a record.
    return isinstance(exc, SQLAlchemyError | OSError | TimeoutError)


def describe(exc: BaseException) -> str:
    """The error as a dead letter records it: the server's message, never SQLAlchemy's
    rendering, which would repeat the statement's parameters (claim values)."""
    db = database_error(exc)
    if db is not None:
        primary = db.diag.message_primary or str(db).splitlines()[0]
        return f"cannot be applied: {type(db).__name__} (SQLSTATE {db.sqlstate}): {primary}"
    return f"cannot be applied: {type(exc).__name__}: {exc}"[:2000]



def _ordered(projector: Projector, batch: Batch) -> list[tuple[TopicPartition, ConsumerRecord]]:
    # Partition by partition, each in offset order: any slice of this list is a
    # contiguous run of every partition it touches.
    return [(tp, record) for tp, records in batch.items() if tp in projector.positions for record in records]


def _as_batch(items: Sequence[tuple[TopicPartition, ConsumerRecord]]) -> dict[TopicPartition, list[ConsumerRecord]]:
    batch: dict[TopicPartition, list[ConsumerRecord]] = {}
    for tp, record in items:
        batch.setdefault(tp, []).append(record)
    return batch


async def on_failure(projector: Projector, batch: Batch, exc: BaseException) -> None:
    """A batch failed for a reason other than fencing: pause and re-read, or isolate."""
    if position_recorded(exc):
        await seek_again(projector, exc)
    elif is_transient(exc):
        await pause_and_reread(projector, exc)
    else:
        await isolate(projector, batch, exc)


async def pause_and_reread(projector: Projector, exc: BaseException) -> None:
    projector.failures += 1
    projector.metrics.database_errors.inc()
    if database_error(exc) is not None or isinstance(exc, SQLAlchemyError):
        projector.health.database_failed(exc)
    delay = backoff(projector.failures)
    log.error("batch failed (%s); re-reading it in %.1fs", type(database_error(exc) or exc).__name__, delay,
              extra={"offsets": {f"{tp.topic}[{tp.partition}]": p for tp, p in projector.positions.items()}})
    await sleep_unless(projector.stop_event, delay)
    projector.rewind()


async def seek_again(projector: Projector, exc: BaseException) -> None:
    log.warning("a position of the batch is recorded already (%s): the stored offsets moved backwards; "
                "seeking to them again", describe(exc))
    await projector.seek_to_stored(list(projector.positions))


async def isolate(projector: Projector, batch: Batch, exc: BaseException) -> None:
    """Bisect ``batch`` until the records that fail alone are found; dead-letter those."""
    ordered = _ordered(projector, batch)
    log.warning("batch of %d records failed deterministically (%s); isolating the record that causes it",
                len(ordered), describe(exc))
    middle = len(ordered) // 2
    stack = [ordered[middle:], ordered[:middle]] if len(ordered) > 1 else [ordered]
    failure: BaseException | None = exc if len(ordered) == 1 else None
    rebalances = projector.rebalances
    while stack:
        segment = stack.pop()
        if not segment:
            continue
        if projector.rebalances != rebalances:
            # Positions were re-read from the database meanwhile; the records held
            # here may no longer start there. The next fetch reads them again.
            log.warning("partitions moved during the isolation; the rest is read again")
            return
        if failure is None:
            outcome = await projector._commit(_as_batch(segment), isolating=True)
            if outcome == "committed":
                continue
            if outcome == "abandoned":
                return
            assert isinstance(outcome, BaseException)
            if position_recorded(outcome):
                await seek_again(projector, outcome)
                return
            if len(segment) > 1:
                middle = len(segment) // 2
                stack += [segment[middle:], segment[:middle]]
                continue
            failure = outcome
        tp, record = segment[0]
        error = describe(failure)
        failure = None
        position = (record.topic, record.partition, record.offset)
        outcome = await projector._commit(_as_batch(segment), isolating=True, poisoned={position: error})
        if outcome == "committed":
            projector.metrics.isolated.inc()
            continue
        if outcome == "abandoned":
            return
        # The record alone, as a dead letter, still fails: it is not the cause.
        assert isinstance(outcome, BaseException)
        await pause_and_reread(projector, outcome)
        return
