"""The log, read back: the two sources every replay reads, in resumable chunks (adr/0013).

``topology replay``, ``topology rebuild`` and ``topology verify`` (projector/replay.py)
read the cells topic and the *recorded claim decisions*, never the claim requests, so
they follow what was decided instead of deciding again (adr/0010):

- ``archive``: ``event_archive`` (the cells topic's records, byte for byte as consumed)
  and ``topology_outbox`` (the decisions, in decision order);
- ``kafka``: the cells topic and the claim-decision topic (fed by ``topology relay``).

A source reads from a :class:`Checkpoint`, the position that commits with each chunk a
replay writes, so a killed run resumes after its last committed chunk; a :class:`Cut`
stops it at a point of the log. Records the live projector dead-lettered never changed
the projection, even when their bytes decode (a wrong key), so they are skipped; a
re-driven one did, so it is applied.

The archive source refuses to run when decisions the live projection took are no longer
in ``topology_outbox`` (a decision relay run with ``TOPOLOGY_RELAY_DELETE_PUBLISHED``):
a replay without them would drop their claims and routes (adr/0019).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from typing import Any, Protocol, get_args
from uuid import UUID

import psycopg
from fastavro import schemaless_reader
from pydantic import BaseModel

from topology_store.core.fold import PositionedEvent
from topology_store.projector.archive import RawRecord, record_log_time
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import HEADER_SIZE, MAGIC, DecodeError, EventCodec
from topology_store.schemas.models import (
    DECISION_EVENT_TYPES,
    EVENT_MODELS,
    ClaimBucket,
    ClaimRef,
    Conflict,
    OwnerType,
    RecordMetadata,
    Event,
    EventInputError,
    parse_event,
)
from topology_store.schemas.registry import load_registry

Conn = psycopg.AsyncConnection[Any]
OUTBOX = "topology_outbox"  # the topic name of an archive decision's position (its outbox id)


class ReplayError(RuntimeError):
    """The replay cannot go on; the message says why and what to do."""


# --- where a replay stops and where it stands ----------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Where a replay stops: at a log time, a topology version, or partition offsets
    (all records strictly before the given next offset). None: the whole log."""

    until_time: datetime | None = None
    until_version: int | None = None
    until_offsets: dict[tuple[str, int], int] | None = None
    # Where the live tables stood in one snapshot: (next offset of the cells topic, last
    # outbox id). What `topology verify` compares them with; archive only.
    live: tuple[int, int] | None = None

    @staticmethod
    def parse(text: str | None) -> Cut:
        if not text:
            return Cut()
        if text.startswith("version:") or text.isdigit():
            return Cut(until_version=int(text.removeprefix("version:")))
        if "@" in text or text.count(":") >= 2 and not text[:4].isdigit():
            offsets: dict[tuple[str, int], int] = {}
            for part in text.split(","):
                topic_partition, _, offset = part.rpartition("@") if "@" in part else part.rpartition(":")
                topic, _, number = topic_partition.rpartition(":")
                if not topic or not number.isdigit() or not offset.isdigit():
                    raise ReplayError(f"an offsets cut looks like topic:partition@next_offset, not {part!r}")
                offsets[(topic, int(number))] = int(offset)
            return Cut(until_offsets=offsets)
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ReplayError(
                f"--until takes a timestamp (ISO 8601 with zone), version:N, or topic:partition@offset; not {text!r}"
            ) from None
        if moment.tzinfo is None:
            raise ReplayError("a timestamp cut needs a time zone, e.g. 2026-11-23T17:00:00+00:00")
        return Cut(until_time=moment)

    def __str__(self) -> str:
        """The cut as a run's checkpoint records it ('' for the whole log)."""
        parts = [self.until_time.isoformat()] if self.until_time is not None else []
        if self.until_version is not None:
            parts.append(f"version:{self.until_version}")
        if self.until_offsets is not None:
            parts.append(",".join(f"{t}:{p}@{o}" for (t, p), o in sorted(self.until_offsets.items())))
        if self.live is not None:
            parts.append(f"live:{self.live[0]}/{self.live[1]}")
        return " ".join(parts)

    def keeps(self, event: Event) -> bool:
        return self.until_time is None or event.occurred_at <= self.until_time


WHOLE_LOG = Cut()


@dataclass
class Checkpoint:
    """Where a replay stands in the log, committed with each chunk's rows."""

    source: str
    cells_topic: str
    decisions_topic: str
    revision: str  # the Alembic head the schema was created at
    cut: str = ""  # str(Cut) of the run: a resumption must stop at the same cut
    cells_next_offset: int = 0  # next offset of the cells topic (partition 0) to apply
    # archive: the last topology_outbox id applied; kafka: the next offset of the decision topic
    decisions_position: int = 0
    decisions_read: int = 0  # decision records read (outbox rows, or decision-topic records)
    events_read: int = 0  # every record read, cells and decisions, skipped ones included
    chunks: int = 0
    # Cells-topic offsets skipped as open dead letters: a re-drive after the rebuild
    # passed them would change the live cells behind the rebuild's back.
    skipped_dead_letters: list[int] = field(default_factory=list)
    outbox_covered_id: int = 0  # kafka: every outbox row up to this id is applied
    switched_version: int | None = None


@dataclass
class Chunk:
    """Records read from the log: the events to apply, in log order per stream, and
    where the source stands after them (skipped records included)."""

    cells: list[PositionedEvent] = field(default_factory=list)
    decisions: list[PositionedEvent] = field(default_factory=list)
    records: int = 0  # every record read, skipped ones included
    cells_next_offset: int | None = None  # after the last cells record read (None: none read)
    decisions_position: int | None = None  # after the last decision record read
    decisions_read: int = 0
    open_dead_letters: list[int] = field(default_factory=list)  # cells offsets skipped as open dead letters

    @property
    def size(self) -> int:
        return self.records

    def advance(self, checkpoint: Checkpoint) -> None:
        """Move ``checkpoint`` past this chunk."""
        if self.cells_next_offset is not None:
            checkpoint.cells_next_offset = self.cells_next_offset
        if self.decisions_position is not None:
            checkpoint.decisions_position = self.decisions_position
        checkpoint.decisions_read += self.decisions_read
        checkpoint.events_read += self.records
        checkpoint.chunks += 1
        checkpoint.skipped_dead_letters.extend(self.open_dead_letters)


class Source(Protocol):
    """Where the log is read from. ``applied`` holds the event ids the replay applied."""

    name: str
    waits: bool  # under the switch's locks, can more of the log still arrive (Kafka: the relay)?
    persists_decision_ids: bool  # must rebuild_seen keep decision ids (the log repeats decisions)?

    async def read(self, conn: Conn, checkpoint: Checkpoint, limit: int) -> Chunk: ...

    async def remaining(self, conn: Conn, checkpoint: Checkpoint, applied: AbstractSet[UUID]) -> int: ...

    async def seen_decisions(self, conn: Conn, checkpoint: Checkpoint) -> list[UUID]: ...

    async def prepare_switch(self, conn: Conn, checkpoint: Checkpoint, applied: AbstractSet[UUID]) -> None: ...

    async def uncovered(self, conn: Conn, checkpoint: Checkpoint, applied: AbstractSet[UUID]) -> list[str]: ...

    async def close(self) -> None: ...


def make_source(settings: Settings, name: str, cut: Cut = WHOLE_LOG, codec: EventCodec | None = None) -> Source:
    if name == "archive":
        return ArchiveSource(settings, codec or EventCodec(), cut)
    if name == "kafka":
        return KafkaSource(settings, codec or EventCodec(), cut)
    raise ReplayError(f"--source is archive or kafka, not {name!r}")


# --- decoding ------------------------------------------------------------------------------------


def decode_event(codec: EventCodec, value: bytes) -> Event | None:
    try:
        decoded = codec.decode(value)
        return parse_event(decoded.payload, decoded.event_type)
    except (DecodeError, EventInputError):
        return None  # dead-lettered when it was consumed; it never changed the projection


class DecisionDecoder:
    """Decodes recorded claim decisions without validating them again.

    A decision in the outbox or on the decision topic was built by the decider from
    validated, canonical values and encoded by this code base; re-running pydantic's
    validators on it (canonical values, NUL checks, millisecond truncation) yields an
    equal model at several times the cost, which was most of a replay. So the models
    are built directly from the Avro record (Avro schemas parsed once, per
    fingerprint), enum and nested fields converted the way validation converts them.
    Every ``check_every``-th decision is also decoded with the codec and parsed with
    :func:`schemas.models.parse_event` and must compare equal; anything unusual (not a
    decision, an unknown fingerprint or symbol, a field the model lacks) takes that path.
    """

    def __init__(self, codec: EventCodec | None = None, check_every: int = 997) -> None:
        self._codec = codec or EventCodec()
        self._check_every = check_every
        self._count = 0
        registry = load_registry()
        self._schemas: dict[bytes, tuple[str, Any, Any]] = {}
        for fingerprint, writer in registry.writers.items():
            reader = registry.readers.get(writer.event_type)
            if writer.event_type in DECISION_EVENT_TYPES and reader is not None:
                # Same fingerprint: no schema resolution to do.
                self._schemas[fingerprint] = (writer.event_type, writer.parsed,
                                              None if reader.fingerprint == fingerprint else reader.parsed)
        self._plans = {event_type: _Plan.of(EVENT_MODELS[event_type]) for event_type in DECISION_EVENT_TYPES}

    def decode(self, value: bytes) -> Event | None:
        """The decision, or None when the bytes are not a readable event (as :func:`decode_event`)."""
        schema = self._schemas.get(bytes(value[2:HEADER_SIZE])) if value[:2] == MAGIC else None
        if schema is None:
            return decode_event(self._codec, value)
        event_type, writer, reader = schema
        body = io.BytesIO(value)
        body.seek(HEADER_SIZE)
        try:
            payload = schemaless_reader(body, writer, reader)
        except Exception:  # noqa: BLE001 - fastavro raises many kinds on corrupt bodies; the codec names it
            return decode_event(self._codec, value)
        event = self._plans[event_type].build(payload) if isinstance(payload, dict) and body.tell() == len(value) \
            else None
        if event is None:
            return decode_event(self._codec, value)
        self._count += 1
        if self._count % self._check_every == 0:
            parsed = decode_event(self._codec, value)
            if parsed != event:
                raise ReplayError(f"a {event_type} decision decodes differently without validation: "
                                  f"{event!r} != {parsed!r}")
        return event


_NEW = object.__new__
_SET = object.__setattr__
_FIELDS_SET = BaseModel.__pydantic_fields_set__.__set__  # type: ignore[attr-defined]
_EXTRA = BaseModel.__pydantic_extra__.__set__  # type: ignore[union-attr]
_PRIVATE = BaseModel.__pydantic_private__.__set__  # type: ignore[union-attr]
_BUCKETS = {bucket.value: bucket for bucket in ClaimBucket}


def _built(model: type[BaseModel], values: dict[str, Any]) -> Any:
    # What BaseModel.model_construct does, minus its per-field bookkeeping.
    instance = _NEW(model)
    _SET(instance, "__dict__", values)
    _FIELDS_SET(instance, set(values))
    _EXTRA(instance, None)
    _PRIVATE(instance, None)
    return instance


def _metadata(record: dict[str, Any] | None) -> RecordMetadata | None:
    if record is None:
        return None
    return _built(RecordMetadata, {**record, "owner_type": OwnerType(record["owner_type"])})  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Plan:
    """How validation turns one decision's Avro record into its model's values."""

    model: type[Event]
    fields: frozenset[str]
    enums: tuple[tuple[str, dict[Any, Enum]], ...]  # field -> symbol -> member (None stays None)
    refs: bool  # ``claims`` holds ClaimRefs
    conflicts: bool  # ``conflicts`` holds Conflicts
    ref_fields: tuple[str, ...] = ("claims",)  # ClaimRef fields (and ``destroy_claims``, adr/0022)

    @staticmethod
    def of(model: type[Event]) -> _Plan:
        enums = []
        for name, info in model.model_fields.items():
            kinds = [a for a in (get_args(info.annotation) or (info.annotation,)) if a is not type(None)]
            if len(kinds) == 1 and isinstance(kinds[0], type) and issubclass(kinds[0], Enum):
                enums.append((name, {member.value: member for member in kinds[0]}))
        fields = model.model_fields
        refs = "claims" in fields and get_args(fields["claims"].annotation)[:1] == (ClaimRef,)
        conflicts = "conflicts" in fields and get_args(fields["conflicts"].annotation)[:1] == (Conflict,)
        ref_fields = tuple(name for name in ("claims", "destroy_claims")
                           if name in fields and get_args(fields[name].annotation)[:1] == (ClaimRef,))
        return _Plan(model, frozenset(fields), tuple(enums), refs, conflicts, ref_fields)

    def build(self, payload: dict[str, Any]) -> Event | None:
        if payload.keys() != self.fields:
            return None
        try:
            for name, members in self.enums:
                value = payload[name]
                if value is not None:
                    payload[name] = members[value]
            if self.refs:
                for name in self.ref_fields:
                    payload[name] = tuple([_built(ClaimRef, {"bucket": _BUCKETS[r["bucket"]], "value": r["value"],
                                                             "metadata": _metadata(r["metadata"])})
                                           for r in payload[name]])
            if self.conflicts:
                payload["conflicts"] = tuple([
                    _built(Conflict, {"bucket": _BUCKETS[c["bucket"]], "value": c["value"], "cell_id": c["cell_id"]})
                    for c in payload["conflicts"]])
        except (KeyError, ValueError):  # a symbol this code does not know: let validation say what it makes of it
            return None
        return _built(self.model, payload)  # type: ignore[no-any-return]


# --- the archive ---------------------------------------------------------------------------------


async def fetch_all(conn: Conn, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    cursor = await conn.execute(query, params)
    return await cursor.fetchall()


async def fetch_one(conn: Conn, query: Any, params: Any = None) -> tuple[Any, ...] | None:
    cursor = await conn.execute(query, params)
    return await cursor.fetchone()


async def live_cells_offset(conn: Conn, topic: str) -> int:
    """The next offset of the cells topic the live projection consumed up to."""
    row = await fetch_one(conn, "SELECT next_offset FROM public.partition_offsets WHERE topic = %s AND partition = 0",
                          (topic,))
    return int(row[0]) if row else 0


async def _cells_uncovered(conn: Conn, checkpoint: Checkpoint) -> list[str]:
    live = await live_cells_offset(conn, checkpoint.cells_topic)
    if live != checkpoint.cells_next_offset:
        return [f"the live projection consumed {checkpoint.cells_topic}[0] up to offset {live}, the shadow up to "
                f"{checkpoint.cells_next_offset}"]
    return []


# Every decision the live projector takes is written twice in one transaction: into the
# outbox and into its request's processed_events.detail (rows with decisions are never
# compacted, adr/0020). Fewer outbox rows than recorded decisions: some were deleted.
# Two counts (under a second at a million decisions; the anti-join naming one took 10 to
# 20 times as long), and the example only once they disagree.
_DECISION_COUNTS = """
SELECT (SELECT coalesce(sum(jsonb_array_length(detail)), 0) FROM public.processed_events WHERE detail IS NOT NULL),
       (SELECT count(*) FROM public.topology_outbox)
"""
_A_DELETED_DECISION = """
SELECT d.id FROM (SELECT (x ->> 'event_id')::uuid AS id
                  FROM public.processed_events p CROSS JOIN LATERAL jsonb_array_elements(p.detail) AS x
                  WHERE p.detail IS NOT NULL) d
WHERE NOT EXISTS (SELECT 1 FROM public.topology_outbox o WHERE o.event_id = d.id) LIMIT 1
"""


async def check_decisions_kept(conn: Conn) -> None:
    """Raise :class:`ReplayError` when decisions the live projection took were deleted
    from ``topology_outbox``: the archive source reads the decisions from there alone."""
    row = await fetch_one(conn, _DECISION_COUNTS)
    recorded, kept = (int(row[0]), int(row[1])) if row is not None else (0, 0)
    if kept >= recorded:
        return
    example = await fetch_one(conn, _A_DELETED_DECISION)
    raise ReplayError(
        f"the archive source cannot replay the claims: the live projection recorded {recorded:,} decisions "
        f"(processed_events.detail) but topology_outbox holds {kept:,}"
        + (f" (event_id {example[0]} is gone)" if example else "")
        + ". The decision relay deletes the rows it published when TOPOLOGY_RELAY_DELETE_PUBLISHED is set "
        "(`topology relay --delete-published`); a replay without them would drop those claims and their routes. "
        "Use --source kafka (the claim-decision topic holds every decision the relay published), and run the "
        "decision relay without TOPOLOGY_RELAY_DELETE_PUBLISHED (docs/reliability.md)"
    )


@dataclass(frozen=True)
class _Bounds:
    """A cut, in the archive's terms (computed once per run)."""

    cells_before: int | None = None  # cells offsets strictly before this
    until_time: datetime | None = None  # cells log times at or before this
    outbox_through: int | None = None  # outbox ids up to this
    decisions: frozenset[UUID] | None = None  # only these decisions (made before a version or offsets cut)

    @property
    def cells_filter(self) -> tuple[str, list[Any]]:
        where, params = "", []
        if self.cells_before is not None:
            where, params = ' AND a."offset" < %s', [self.cells_before]
        if self.until_time is not None:
            where, params = where + " AND a.log_time <= %s", [*params, self.until_time]
        return where, params


@dataclass(frozen=True)
class _Raw:
    """Archive rows of one chunk, not decoded yet, and where they were read from."""

    start: tuple[int, int]  # (cells next offset, decisions position)
    limit: int
    cells: list[tuple[RawRecord, str | None]]  # (record, dead letter status)
    decisions: list[tuple[int, bytes]]  # (outbox id, payload)

    @property
    def size(self) -> int:
        return len(self.cells) + len(self.decisions)

    @property
    def end(self) -> tuple[int, int]:
        return (self.cells[-1][0].offset + 1 if self.cells else self.start[0],
                self.decisions[-1][0] if self.decisions else self.start[1])


class ArchiveSource:
    """``event_archive`` (cells records as consumed) and ``topology_outbox`` (decisions in
    decision order). Outbox ids are drawn under the claim registry lock (adr/0014), so
    the committed ids are always a prefix of the final order: reading ``id > position``
    never skips a row that commits later (and the switch counts them to be sure).

    While a chunk is applied and written, the next one is fetched on a second connection
    and decoded in a thread: the waits for PostgreSQL (the COPYs, the fetch) then
    overlap with decoding (a run took a fifth less time with it, measured)."""

    name = "archive"
    waits = False  # under the switch's locks nothing is archived or decided
    persists_decision_ids = False  # the outbox keeps each decision's id in a column

    def __init__(self, settings: Settings, codec: EventCodec, cut: Cut = WHOLE_LOG) -> None:
        self._settings = settings
        self._codec = codec
        self._cut = cut
        self._bounds: _Bounds | None = None
        self._decisions = DecisionDecoder(codec)
        self._ahead_decisions = DecisionDecoder(codec)  # the prefetch thread's own
        self._ahead: asyncio.Task[tuple[_Raw, Chunk]] | None = None
        self._ahead_conn: Conn | None = None
        self._counted = (0, 0)  # (outbox id, rows up to it) counted before the switch's locks

    async def _bounds_of(self, conn: Conn) -> _Bounds:
        if self._bounds is not None:
            return self._bounds
        await check_decisions_kept(conn)
        cut, topic = self._cut, self._settings.cells_topic
        bounds = _Bounds(until_time=cut.until_time)
        if cut.live is not None:
            bounds = replace(bounds, cells_before=cut.live[0], outbox_through=cut.live[1])
        elif cut.until_version is not None:
            row = await fetch_one(conn, 'SELECT coalesce(max("offset"), -1) FROM public.processed_events '
                                        "WHERE topic = %s AND version <= %s", (topic, cut.until_version))
            bounds = replace(bounds, cells_before=int(row[0]) + 1 if row else 0, decisions=await self._decided(
                conn, "SELECT detail FROM public.processed_events WHERE detail IS NOT NULL AND version <= %s",
                (cut.until_version,)))
        elif cut.until_offsets is not None:
            offsets = cut.until_offsets
            bounds = replace(bounds, cells_before=offsets.get((topic, 0), 0), decisions=await self._decided(
                conn, 'SELECT detail FROM public.processed_events p JOIN unnest(%s::text[], %s::int[], '
                      '%s::bigint[]) AS c(t, n, o) ON p.topic = c.t AND p.partition = c.n AND p."offset" < c.o '
                      "WHERE detail IS NOT NULL",
                ([t for t, _ in offsets], [n for _, n in offsets], list(offsets.values()))))
        self._bounds = bounds
        return bounds

    @staticmethod
    async def _decided(conn: Conn, query: str, params: Any) -> frozenset[UUID]:
        """The decisions the claim commands named by ``query`` made (processed_events.detail)."""
        return frozenset(UUID(d["event_id"]) for (detail,) in await fetch_all(conn, query, params) for d in detail)

    async def _fetch(self, conn: Conn, bounds: _Bounds, start: tuple[int, int], limit: int) -> _Raw:
        where, params = bounds.cells_filter
        cells = await fetch_all(
            conn,
            'SELECT a.topic, a.partition, a."offset", a.key, a.value, a.headers, a.log_time, d.status '
            "FROM public.event_archive a LEFT JOIN public.dead_letters d ON d.topic = a.topic "
            'AND d.partition = a.partition AND d."offset" = a."offset" '
            f'WHERE a.topic = %s AND a.partition = 0 AND a."offset" >= %s{where} ORDER BY a."offset" LIMIT %s',
            (self._settings.cells_topic, start[0], *params, limit),
        )
        decisions: list[tuple[Any, ...]] = []
        if len(cells) < limit:
            through = bounds.outbox_through
            decisions = await fetch_all(
                conn, "SELECT id, payload FROM public.topology_outbox WHERE id > %s AND id <= %s ORDER BY id LIMIT %s",
                (start[1], through if through is not None else 2**63 - 1, limit - len(cells)))
        return _Raw(start, limit, [
            (RawRecord(t, p, o, k, v, tuple((name, bytes.fromhex(h)) for name, h in headers), log_time=at), status)
            for t, p, o, k, v, headers, at, status in cells], [(i, bytes(payload)) for i, payload in decisions])

    def _decode(self, raw: _Raw, bounds: _Bounds, decisions: DecisionDecoder) -> Chunk:
        chunk = Chunk(records=raw.size)
        for record, dead_status in raw.cells:
            if dead_status == "open":
                chunk.open_dead_letters.append(record.offset)
            if dead_status not in (None, "resolved") or record.value is None:
                continue
            event = decode_event(self._codec, record.value)
            if event is not None:
                chunk.cells.append(PositionedEvent(event, record.topic, record.partition, record.offset,
                                                   record.log_time))
        for outbox_id, payload in raw.decisions:
            decision = decisions.decode(payload)
            if decision is None:
                raise ReplayError(f"topology_outbox row {outbox_id} is not a readable decision")
            if self._cut.keeps(decision) and (bounds.decisions is None or decision.event_id in bounds.decisions):
                chunk.decisions.append(PositionedEvent(decision, OUTBOX, 0, outbox_id))
        chunk.cells_next_offset = raw.end[0] if raw.cells else None
        chunk.decisions_position = raw.end[1] if raw.decisions else None
        chunk.decisions_read = len(raw.decisions)
        return chunk

    async def _read_ahead(self, bounds: _Bounds, start: tuple[int, int], limit: int) -> tuple[_Raw, Chunk]:
        if self._ahead_conn is None:
            self._ahead_conn = await psycopg.AsyncConnection.connect(self._settings.libpq_url, autocommit=True)
        raw = await self._fetch(self._ahead_conn, bounds, start, limit)
        return raw, await asyncio.to_thread(self._decode, raw, bounds, self._ahead_decisions)

    async def read(self, conn: Conn, checkpoint: Checkpoint, limit: int) -> Chunk:
        bounds = await self._bounds_of(conn)
        start = (checkpoint.cells_next_offset, checkpoint.decisions_position)
        chunk: Chunk | None = None
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            raw, decoded = await ahead
            if raw.start == start and raw.limit == limit:
                chunk = decoded  # committed rows never change: read a moment earlier is as good
        if chunk is None:
            raw = await self._fetch(conn, bounds, start, limit)
            chunk = self._decode(raw, bounds, self._decisions)
        if raw.size == limit:  # a full chunk: more is likely to follow
            self._ahead = asyncio.create_task(self._read_ahead(bounds, raw.end, limit))
        return chunk

    async def remaining(self, conn: Conn, checkpoint: Checkpoint, applied: AbstractSet[UUID]) -> int:
        bounds = await self._bounds_of(conn)
        where, params = bounds.cells_filter
        through = bounds.outbox_through
        row = await fetch_one(
            conn,
            f'SELECT (SELECT count(*) FROM public.event_archive a WHERE a.topic = %s AND a.partition = 0 '
            f'AND a."offset" >= %s{where}) + (SELECT count(*) FROM public.topology_outbox WHERE id > %s AND id <= %s)',
            (checkpoint.cells_topic, checkpoint.cells_next_offset, *params, checkpoint.decisions_position,
             through if through is not None else 2**63 - 1),
        )
        return int(row[0]) if row else 0

    async def seen_decisions(self, conn: Conn, checkpoint: Checkpoint) -> list[UUID]:
        rows = await fetch_all(conn, "SELECT event_id FROM public.topology_outbox WHERE id <= %s",
                               (checkpoint.decisions_position,))
        return [event_id for (event_id,) in rows]

    async def prepare_switch(self, conn: Conn, checkpoint: Checkpoint, applied: AbstractSet[UUID]) -> None:
        """Count the outbox up to the shadow's position now, outside the switch's locks;
        under them only the rows after it are counted. Decisions deleted since the run
        started (a relay switched to deleting meanwhile) are looked for again here."""
        await check_decisions_kept(conn)
        row = await fetch_one(conn, "SELECT count(*) FROM public.topology_outbox WHERE id <= %s",
                              (checkpoint.decisions_position,))
        self._counted = (checkpoint.decisions_position, int(row[0]) if row else 0)

    async def uncovered(self, conn: Conn, checkpoint: Checkpoint, applied: AbstractSet[UUID]) -> list[str]:
        problems = await _cells_uncovered(conn, checkpoint)
        upto, counted = self._counted if self._counted[0] <= checkpoint.decisions_position else (0, 0)
        after, last = await fetch_one(conn, "SELECT count(*), coalesce(max(id), 0) FROM public.topology_outbox "
                                            "WHERE id > %s", (upto,)) or (0, 0)
        count, last = counted + after, max(last, upto if counted else 0)
        # Every claim partition's position is covered when every decision the live
        # commits up to it wrote (the whole outbox, under these locks) was applied.
        if (count, last) != (checkpoint.decisions_read, checkpoint.decisions_position):
            problems.append(f"topology_outbox holds {count} decisions up to id {last}; the shadow applied "
                            f"{checkpoint.decisions_read} up to id {checkpoint.decisions_position}")
        if checkpoint.skipped_dead_letters:
            resolved = await fetch_one(
                conn,
                'SELECT array_agg("offset" ORDER BY "offset") FROM public.dead_letters '
                "WHERE topic = %s AND partition = 0 AND \"offset\" = ANY(%s) AND status = 'resolved'",
                (checkpoint.cells_topic, checkpoint.skipped_dead_letters),
            )
            if resolved and resolved[0]:
                problems.append(f"dead letters of {checkpoint.cells_topic} at offsets {resolved[0]} were re-driven "
                                "after the rebuild passed them: rebuild with --restart")
        return problems

    async def close(self) -> None:
        if self._ahead is not None:
            self._ahead.cancel()
            with contextlib.suppress(BaseException):
                await self._ahead
            self._ahead = None
        if self._ahead_conn is not None:
            await self._ahead_conn.close()
            self._ahead_conn = None


# --- Kafka ---------------------------------------------------------------------------------------


class KafkaSource:
    """The cells topic and the claim-decision topic (fed by ``topology relay``), read
    with a consumer of its own: no group, positions from the checkpoint. A partition
    is paused at its offsets cut; the log ends where a fetch stays empty for ``idle_ms``
    (broker end offsets are not trusted: the embedded broker reports them wrongly)."""

    name = "kafka"
    waits = True  # the relay may still be publishing decisions the live tables hold
    persists_decision_ids = True  # the relay publishes at least once: repeats anywhere later

    def __init__(self, settings: Settings, codec: EventCodec, cut: Cut = WHOLE_LOG, idle_ms: int = 500) -> None:
        if cut.until_version is not None or cut.live is not None:
            raise ReplayError("a version cut needs the archive source (versions live in PostgreSQL)")
        self._settings = settings
        self._codec = codec
        self._cut = cut
        self._decisions_decoder = DecisionDecoder(codec)
        self._idle_ms = idle_ms
        self._consumer: Any = None
        self._cells: Any = None
        self._decisions: Any = None

    async def _start(self, checkpoint: Checkpoint) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self._consumer = AIOKafkaConsumer(bootstrap_servers=self._settings.kafka_bootstrap, enable_auto_commit=False)
        await self._consumer.start()
        self._cells = TopicPartition(checkpoint.cells_topic, 0)
        self._decisions = TopicPartition(checkpoint.decisions_topic, 0)
        self._consumer.assign([self._cells, self._decisions])
        for tp, position in ((self._cells, checkpoint.cells_next_offset),
                             (self._decisions, checkpoint.decisions_position)):
            self._consumer.seek(tp, position)
            if position >= self._stop(tp):
                self._consumer.pause(tp)

    def _stop(self, tp: Any) -> float:
        return (self._cut.until_offsets or {}).get((tp.topic, tp.partition), float("inf"))

    async def read(self, conn: Conn, checkpoint: Checkpoint, limit: int) -> Chunk:
        if self._consumer is None:
            await self._start(checkpoint)
        batch = await self._consumer.getmany(timeout_ms=self._idle_ms, max_records=limit)
        chunk = Chunk()
        for tp, events in ((self._cells, chunk.cells), (self._decisions, chunk.decisions)):
            stop = self._stop(tp)
            for record in batch.get(tp, []):
                if record.offset >= stop:
                    self._consumer.pause(tp)  # the cut: nothing after it is read, nor counted
                    break
                chunk.records += 1
                if tp is self._cells:
                    chunk.cells_next_offset = record.offset + 1
                    event = decode_event(self._codec, record.value) if record.value is not None else None
                else:
                    chunk.decisions_position = record.offset + 1
                    chunk.decisions_read += 1
                    event = self._decisions_decoder.decode(record.value) if record.value is not None else None
                if event is not None and self._cut.keeps(event):
                    events.append(PositionedEvent(event, record.topic, record.partition, record.offset,
                                                  record_log_time(record)))
        return chunk

    async def _advance_coverage(self, conn: Conn, checkpoint: Checkpoint, applied: AbstractSet[UUID],
                                limit: int) -> list[tuple[int, UUID]]:
        """Move ``outbox_covered_id`` over the outbox rows whose decision was applied;
        returns the rows after it that are not applied yet."""
        rows = await fetch_all(conn, "SELECT id, event_id FROM public.topology_outbox WHERE id > %s ORDER BY id "
                                     "LIMIT %s", (checkpoint.outbox_covered_id, limit))
        for n, (outbox_id, event_id) in enumerate(rows):
            if event_id not in applied:
                return [(i, e) for i, e in rows[n:] if e not in applied]
            checkpoint.outbox_covered_id = outbox_id
        return []

    async def remaining(self, conn: Conn, checkpoint: Checkpoint, applied: AbstractSet[UUID]) -> int:
        # An estimate (outbox ids have gaps): the exact check runs under the switch's locks.
        await self._advance_coverage(conn, checkpoint, applied, 50_000)
        row = await fetch_one(conn, "SELECT coalesce(max(id), 0) FROM public.topology_outbox")
        last = int(row[0]) if row else 0
        cells_lag = await live_cells_offset(conn, checkpoint.cells_topic) - checkpoint.cells_next_offset
        return max(0, cells_lag) + max(0, last - checkpoint.outbox_covered_id)

    async def seen_decisions(self, conn: Conn, checkpoint: Checkpoint) -> list[UUID]:
        return []  # kept in rebuild_seen

    async def prepare_switch(self, conn: Conn, checkpoint: Checkpoint, applied: AbstractSet[UUID]) -> None:
        await self._advance_coverage(conn, checkpoint, applied, 10_000_000)  # under the locks: only what came since

    async def uncovered(self, conn: Conn, checkpoint: Checkpoint, applied: AbstractSet[UUID]) -> list[str]:
        problems = await _cells_uncovered(conn, checkpoint)
        missing = await self._advance_coverage(conn, checkpoint, applied, 10_000_000)
        if missing:
            problems.append(f"{len(missing)} decisions of topology_outbox (ids {missing[0][0]}..{missing[-1][0]}) are "
                            f"not on {checkpoint.decisions_topic} yet: is `topology relay` running?")
        return problems

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
