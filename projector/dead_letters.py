"""``topology dlq``: inspect dead letters and re-drive or discard them once the cause is fixed.

A dead letter is a record the projector could not read as a valid event
(``read_record``) or could not apply (``projector/poison.py``). It is kept byte for
byte with its key, headers, partition, offset and error, in the same transaction
that moved its partition on, so nothing is lost and nothing blocks.

- ``list`` / ``show``: what is there, and whether the *current* code can read it now.
- ``replay ID ...`` / ``replay --all``: decode again with the current schema registry
  (for example after a newer schema was deployed). If it now reads as a valid event,
  apply it through the projector's own store path: a batch of one event, idempotent
  by ``event_id``, its decision recorded in ``processed_events``, and the dead letter
  marked ``resolved`` in the same transaction. No partition offset moves; the
  partition's offset row is locked by a compare-and-set to itself, so the re-drive
  serializes with the member that owns the partition (adr/0002). Otherwise the error
  is reported again and the dead letter stays open.
- ``discard ID --reason``: mark it ``discarded`` with the reason, who and when. Rows
  are never deleted, so no discard is silent.

Caveat: a re-driven event is decided *now*, against today's tables, not at its place
in the log. For claims that is what the decider always does (adr/0010, and the
decision is recorded); a re-driven cell event can differ from what a replay of the
cells topic in log order decides (``topology verify`` then reports the difference).
"""

from __future__ import annotations

import getpass
import json
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from aiokafka.structs import ConsumerRecord
from psycopg.rows import dict_row
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from topology_store.core.fold import BatchResult, PositionedEvent
from topology_store.projector.archive import CLAMPED_LOG_TIMES
from topology_store.projector.store import FencedError, PartitionAdvance, ProjectionStore
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EventCodec

STATUSES = ("open", "resolved", "discarded")


class DeadLetterError(RuntimeError):
    """An operator request that cannot be carried out (no such id, not open, ...)."""


def operator() -> str:
    """Who is acting, for the record: the login and the host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _text_or_hex(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "hex:" + data.hex()


def _headers(stored: list[list[str]]) -> list[tuple[str, bytes]]:
    return [(name, bytes.fromhex(value)) for name, value in stored]


def _event_type(headers: list[tuple[str, bytes]]) -> str | None:
    for name, value in headers:
        if name == "event_type":
            return value.decode("ascii", "replace")
    return None


# --- reading ----------------------------------------------------------------------------------

_SELECT = (
    'SELECT d.id, d.topic, d.partition, d."offset", d.key, d.value, d.headers, d.error, d.created_at, d.status, '
    "d.resolved_at, d.resolved_by, d.resolution, d.event_id, d.replay_attempts, d.last_replay_error, a.log_time "
    'FROM dead_letters d LEFT JOIN event_archive a ON a.topic = d.topic AND a.partition = d.partition '
    'AND a."offset" = d."offset" '
)


def list_dead_letters(settings: Settings, status: str = "open", limit: int = 100,
                      topic: str | None = None) -> list[dict[str, Any]]:
    conditions, params = [], []
    if status != "all":
        conditions.append("d.status = %s")
        params.append(status)
    if topic:
        conditions.append("d.topic = %s")
        params.append(topic)
    where = f"WHERE {' AND '.join(conditions)} " if conditions else ""
    with psycopg.connect(settings.libpq_url, row_factory=dict_row) as conn:
        rows = conn.execute(_SELECT + where + "ORDER BY d.id LIMIT %s", [*params, limit]).fetchall()
    return [
        {
            "id": row["id"],
            "position": f"{row['topic']}[{row['partition']}]@{row['offset']}",
            "status": row["status"],
            "event_type": _event_type(_headers(row["headers"])),
            "created_at": row["created_at"].isoformat(),
            "error": row["error"][:300],
            "resolution": row["resolution"],
        }
        for row in rows
    ]


def _load(settings: Settings, letter_id: int) -> dict[str, Any]:
    with psycopg.connect(settings.libpq_url, row_factory=dict_row) as conn:
        row = conn.execute(_SELECT + "WHERE d.id = %s", (letter_id,)).fetchone()
    if row is None:
        raise DeadLetterError(f"no dead letter {letter_id}")
    return row


def _as_record(row: dict[str, Any]) -> ConsumerRecord:  # type: ignore[type-arg]
    """The dead letter as the consumer saw it. Its timestamp comes from the archive,
    written in the same transaction; a timestamp the archive had to clamp is unknown."""
    log_time: datetime | None = row["log_time"]
    if log_time is not None and log_time in CLAMPED_LOG_TIMES:
        raise DeadLetterError(
            f"dead letter {row['id']}: the record's own timestamp is out of range, so its log time is unknown; "
            "discard it and publish the event again"
        )
    moment = log_time or row["created_at"]
    value, key = row["value"], row["key"]
    return ConsumerRecord(
        topic=row["topic"], partition=row["partition"], offset=row["offset"],
        timestamp=int(moment.timestamp() * 1000), timestamp_type=0,
        key=bytes(key) if key is not None else None, value=bytes(value) if value is not None else None,
        checksum=None, serialized_key_size=len(key or b""), serialized_value_size=len(value or b""),
        headers=_headers(row["headers"]),
    )


def show(settings: Settings, letter_id: int, pii: bool = False) -> dict[str, Any]:
    """Everything about one dead letter, and whether the current code reads it now.
    E-mails (keys, values) are masked unless ``pii``; raw bytes only with ``pii``."""
    from topology_store.core.audit import mask_pii
    from topology_store.projector.consumer import read_record
    from topology_store.schemas.models import protect_value

    row = _load(settings, letter_id)
    key = _text_or_hex(bytes(row["key"])) if row["key"] is not None else None
    if key is not None and key.startswith("EMAIL:") and not pii:
        key = "EMAIL:" + protect_value("EMAIL", key.removeprefix("EMAIL:").lower(), settings.claim_secret)
    document: dict[str, Any] = {
        "id": row["id"], "topic": row["topic"], "partition": row["partition"], "offset": row["offset"],
        "key": key,
        "headers": {name: _text_or_hex(value) for name, value in _headers(row["headers"])},
        "value_bytes": len(row["value"]) if row["value"] is not None else None,
        "log_time": row["log_time"].isoformat() if row["log_time"] else None,
        "error": row["error"], "created_at": row["created_at"].isoformat(), "status": row["status"],
        "resolved_at": row["resolved_at"].isoformat() if row["resolved_at"] else None,
        "resolved_by": row["resolved_by"], "resolution": row["resolution"],
        "event_id": str(row["event_id"]) if row["event_id"] else None,
        "replay_attempts": row["replay_attempts"], "last_replay_error": row["last_replay_error"],
    }
    if pii and row["value"] is not None:
        document["value_hex"] = bytes(row["value"]).hex()
    try:
        item = read_record(EventCodec(), settings, _as_record(row))
    except DeadLetterError as exc:
        document["readable_now"] = {"ok": False, "error": str(exc)}
        return document
    if isinstance(item, PositionedEvent):
        payload = json.loads(item.event.model_dump_json())
        document["readable_now"] = {"ok": True, "event_type": item.event.EVENT_TYPE,
                                    "event": payload if pii else mask_pii(payload, settings.claim_secret)}
    else:
        document["readable_now"] = {"ok": False, "error": item.error}
    return document


# --- re-drive ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Redrive:
    id: int
    status: str  # resolved | still_failing | not_open
    outcome: str | None = None  # the decision: applied, unchanged, rejected, duplicate
    reason: str | None = None
    event_id: str | None = None
    error: str | None = None


async def _record_failure(engine: Any, letter_id: int, error: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE dead_letters SET replay_attempts = replay_attempts + 1, last_replay_error = :error "
                 "WHERE id = :id"),
            {"id": letter_id, "error": error.encode("ascii", "backslashreplace").decode("ascii")[:2000]},
        )


async def redrive(settings: Settings, letter_ids: list[int], who: str, attempts: int = 5,
                  codec: EventCodec | None = None) -> list[Redrive]:
    from topology_store.projector.consumer import read_record
    from topology_store.projector.poison import describe, is_transient

    codec = codec or EventCodec()  # the registry of *this* deployment: the point of a re-drive
    engine = create_engine(settings.sqlalchemy_url, pool_size=1)
    store = ProjectionStore(engine, settings.claim_secret, codec)
    results: list[Redrive] = []
    try:
        for letter_id in letter_ids:
            row = _load(settings, letter_id)
            if row["status"] != "open":
                results.append(Redrive(letter_id, "not_open", error=f"already {row['status']}"))
                continue
            try:
                item = read_record(codec, settings, _as_record(row))
            except DeadLetterError as exc:
                await _record_failure(engine, letter_id, str(exc))
                results.append(Redrive(letter_id, "still_failing", error=str(exc)))
                continue
            if not isinstance(item, PositionedEvent):
                await _record_failure(engine, letter_id, item.error)
                results.append(Redrive(letter_id, "still_failing", error=item.error))
                continue
            results.append(await _apply(settings, engine, store, letter_id, item, who, attempts, is_transient,
                                        describe))
    finally:
        await engine.dispose()
    return results


async def _apply(settings: Settings, engine: Any, store: ProjectionStore, letter_id: int, item: PositionedEvent,
                 who: str, attempts: int, is_transient: Any, describe: Any) -> Redrive:
    decided: dict[str, Any] = {}

    async def resolve(conn: AsyncConnection, result: BatchResult) -> None:
        (_, decision), = result.decisions
        reason = f" ({decision.reason})" if decision.reason else ""
        resolution = f"re-driven: {decision.outcome.value}{reason}"
        updated = await conn.execute(
            text("UPDATE dead_letters SET status = 'resolved', resolved_at = now(), resolved_by = :who, "
                 "resolution = :resolution, event_id = :event_id, replay_attempts = replay_attempts + 1, "
                 "last_replay_error = NULL WHERE id = :id AND status = 'open'"),
            {"who": who, "resolution": resolution, "event_id": item.event.event_id, "id": letter_id},
        )
        if updated.rowcount != 1:  # resolved or discarded meanwhile: roll the event back too
            raise DeadLetterError(f"dead letter {letter_id} changed while it was re-driven")
        decided.update(outcome=decision.outcome.value, reason=decision.reason)

    partition = (item.topic, item.partition)
    for _ in range(attempts):
        (stored,) = (await store.stored_offsets([partition])).values()
        try:
            # expected == next: no offset moves, but the partition's row is locked
            # for the transaction, so the member owning the partition waits or is fenced.
            await store.commit_batch([item], [], {partition: PartitionAdvance(stored, stored)}, then=resolve)
        except FencedError:
            continue  # the owner committed that partition meanwhile; read its offset again
        except DeadLetterError as exc:
            return Redrive(letter_id, "not_open", error=str(exc))
        except Exception as exc:
            if is_transient(exc):
                raise
            error = describe(exc)
            await _record_failure(engine, letter_id, error)
            return Redrive(letter_id, "still_failing", error=error)
        return Redrive(letter_id, "resolved", decided["outcome"], decided["reason"], str(item.event.event_id))
    return Redrive(letter_id, "still_failing", error="the partition kept moving; try again")


def discard(settings: Settings, letter_id: int, reason: str, who: str) -> None:
    if not reason.strip():
        raise DeadLetterError("--reason must say why")
    with psycopg.connect(settings.libpq_url) as conn:
        row = conn.execute(
            "UPDATE dead_letters SET status = 'discarded', resolved_at = now(), resolved_by = %s, resolution = %s "
            "WHERE id = %s AND status = 'open' RETURNING id",
            (who, reason.strip(), letter_id),
        ).fetchone()
        if row is None:
            current = conn.execute("SELECT status FROM dead_letters WHERE id = %s", (letter_id,)).fetchone()
            raise DeadLetterError(f"no dead letter {letter_id}" if current is None
                                  else f"dead letter {letter_id} is already {current[0]}")


def open_ids(settings: Settings) -> list[int]:
    """Every open dead letter, in log order per partition (cell events depend on their order)."""
    with psycopg.connect(settings.libpq_url) as conn:
        rows = conn.execute(
            "SELECT id FROM dead_letters WHERE status = 'open' ORDER BY topic, partition, \"offset\""
        ).fetchall()
    return [row[0] for row in rows]
