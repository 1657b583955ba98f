"""Which failures may dead-letter a record (projector/poison.py). Only a failure that
recurs for the same data may; anything about the connection, the server or the
deployment must pause and retry instead, or an outage would empty the log into
``dead_letters``."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest
from aiokafka.structs import ConsumerRecord
from psycopg import errors
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from topology_store.projector.archive import archive_log_time, record_log_time
from topology_store.projector.poison import describe, is_transient
from topology_store.runtime.retry import backoff


def wrapped(error: psycopg.Error, kind: type = OperationalError) -> Exception:
    """As SQLAlchemy raises it (statement and parameters attached)."""
    return kind("INSERT INTO claims VALUES (%(v)s)", {"v": "ada@example.com"}, error)


@pytest.mark.parametrize(
    "failure",
    [
        psycopg.OperationalError("connection is bad"),
        errors.AdminShutdown("terminating connection due to administrator command"),
        errors.SerializationFailure("could not serialize access"),
        errors.DeadlockDetected("deadlock detected"),
        errors.TooManyConnections("too many clients"),
        errors.UndefinedTable("relation \"claims\" does not exist"),  # a deploy problem, not a record's
        errors.InsufficientPrivilege("permission denied"),
        psycopg.InterfaceError("the connection is closed"),
        wrapped(psycopg.OperationalError("server closed the connection unexpectedly")),
        PoolTimeout("QueuePool limit reached"),
        ConnectionResetError(),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_connection_server_and_deployment_failures_are_transient(failure: BaseException) -> None:
    assert is_transient(failure)


@pytest.mark.parametrize(
    "failure",
    [
        errors.UntranslatableCharacter("character with byte sequence 0xe6 has no equivalent in encoding \"LATIN1\""),
        errors.NumericValueOutOfRange("bigint out of range"),
        errors.UniqueViolation("duplicate key value"),
        errors.CheckViolation("violates check constraint"),
        errors.ProgramLimitExceeded("index row size exceeds maximum"),
        wrapped(errors.StringDataRightTruncation("value too long"), DataError),
        OverflowError("date value out of range"),
        UnicodeEncodeError("latin-1", "鍵", 0, 1, "ordinal not in range(256)"),
        ValueError("a rule the code does not cover"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_failures_of_the_data_itself_are_deterministic(failure: BaseException) -> None:
    assert not is_transient(failure)


def test_the_recorded_error_names_the_server_message_never_the_parameters() -> None:
    text = describe(wrapped(errors.UntranslatableCharacter("no equivalent in encoding \"LATIN1\""), DataError))
    assert text.startswith("cannot be applied: UntranslatableCharacter (SQLSTATE 22P05)")
    assert "ada@example.com" not in text and "INSERT" not in text


def record(timestamp_ms: int) -> ConsumerRecord:  # type: ignore[type-arg]
    return ConsumerRecord("t", 0, 0, timestamp_ms, 0, b"k", b"v", None, 1, 1, [])


def test_record_timestamps_outside_the_datetime_range_are_recognized() -> None:
    assert record_log_time(record(0)) == datetime(1970, 1, 1, tzinfo=UTC)
    assert record_log_time(record(-1)) is not None  # "no timestamp" in old formats: 1969, still a time
    in_microseconds = 1_764_000_000_000_000
    assert record_log_time(record(in_microseconds)) is None
    assert archive_log_time(record(in_microseconds)) == datetime.max.replace(tzinfo=UTC)
    assert archive_log_time(record(-(2**62))) == datetime.min.replace(tzinfo=UTC)


def test_backoff_is_capped_and_jittered() -> None:
    delays = [backoff(attempt) for attempt in range(1, 200)]
    assert all(0 <= d <= 10 for d in delays)
    assert len({round(d, 6) for d in delays}) > 150  # full jitter, not a fixed schedule
