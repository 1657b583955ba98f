"""Replay: rebuild the projection from the log into a separate schema, and verify the live one.

The log is the source of truth; the tables are a view of it. A replay rebuilds
the view from the beginning up to a cut, without touching the live schema:

- cells from the cells topic (adr/0004: deterministic in log order);
- the claim registry from the *recorded decisions* (adr/0010), never by deciding
  again, so a replay made with newer code still follows what was decided.

Sources: ``archive`` reads ``event_archive`` (cells records, byte for byte as
consumed) and ``topology_outbox`` (decisions, in decision order); ``kafka`` reads
the cells and claim-decisions topics. Both give the same result.

The digest covers the projection's content and leaves out the ``version``
columns: versions number commits, and commits depend on batch sizes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from functools import partial
from typing import Any, TextIO, get_args
from uuid import UUID

import psycopg
from fastavro import schemaless_reader
from psycopg import sql
from pydantic import BaseModel

from topology_store.core.cells import Cell, Outcome, apply_cell_event
from topology_store.core.claims import HeldClaim, Lease, Registry, evolve
from topology_store.projector.migrate import upgrade_to_head
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import HEADER_SIZE, MAGIC, DecodeError, EventCodec
from topology_store.schemas.models import (
    DECISION_EVENT_TYPES,
    EVENT_MODELS,
    CellRegistered,
    CellStateChanged,
    CellUpdated,
    ClaimBucket,
    ClaimRef,
    Conflict,
    Event,
    EventInputError,
    SequenceRangeGranted,
    parse_event,
)
from topology_store.schemas.registry import load_registry

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
LIVE_SCHEMA = "public"


class ReplayError(RuntimeError):
    pass


@dataclass(frozen=True)
class Cut:
    """Where a replay stops: at a log time, a topology version, or partition offsets
    (all records strictly before the given next offset). None: the whole log."""

    until_time: datetime | None = None
    until_version: int | None = None
    until_offsets: dict[tuple[str, int], int] | None = None

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


@dataclass
class Projection:
    """The projection's content, as plain rows (no versions)."""

    cells: dict[str, Cell] = field(default_factory=dict)
    registry: Registry = field(default_factory=Registry)
    version: int = 0


@dataclass
class Progress:
    """Events/s and ETA on a terminal, at most once a second."""

    total: int
    out: TextIO = sys.stderr
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    shown: float = 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.shown >= 1.0 or self.done == self.total:
            self.shown = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0.0
            print(f"\rreplayed {self.done}/{self.total} events, {rate:,.0f}/s, ETA {eta:,.0f}s ", end="",
                  file=self.out, flush=True)
            if self.done == self.total:
                print(file=self.out)


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


@dataclass(frozen=True)
class _Plan:
    """How validation turns one decision's Avro record into its model's values."""

    model: type[Event]
    fields: frozenset[str]
    enums: tuple[tuple[str, dict[Any, Enum]], ...]  # field -> symbol -> member (None stays None)
    refs: bool  # ``claims`` holds ClaimRefs
    conflicts: bool  # ``conflicts`` holds Conflicts

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
        return _Plan(model, frozenset(fields), tuple(enums), refs, conflicts)

    def build(self, payload: dict[str, Any]) -> Event | None:
        if payload.keys() != self.fields:
            return None
        try:
            for name, members in self.enums:
                value = payload[name]
                if value is not None:
                    payload[name] = members[value]
            if self.refs:
                payload["claims"] = tuple([_built(ClaimRef, {"bucket": _BUCKETS[r["bucket"]], "value": r["value"]})
                                           for r in payload["claims"]])
            if self.conflicts:
                payload["conflicts"] = tuple([
                    _built(Conflict, {"bucket": _BUCKETS[c["bucket"]], "value": c["value"], "cell_id": c["cell_id"]})
                    for c in payload["conflicts"]])
        except KeyError:  # a symbol this code does not know: let validation say what it makes of it
            return None
        return _built(self.model, payload)  # type: ignore[no-any-return]


def _parse(payload: dict[str, Any], event_type: str) -> Event | None:
    try:
        return parse_event(payload, event_type)
    except EventInputError:
        return None


def fold(cell_events: Iterable[Event], decisions: Iterable[Event], progress: Progress | None = None) -> Projection:
    """The projection a log yields: pure, deterministic, independent of batching."""
    projection = Projection()
    seen: set[UUID] = set()
    for event in cell_events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        assert isinstance(event, CellRegistered | CellUpdated | CellStateChanged)
        decision, cell = apply_cell_event(projection.cells, event)
        if decision.outcome is Outcome.APPLIED and cell is not None:
            projection.cells[cell.cell_id] = cell
        if progress:
            progress.advance()
    for decision_event in decisions:
        if decision_event.event_id in seen:
            continue  # the relay publishes at least once
        seen.add(decision_event.event_id)
        evolve(projection.registry, decision_event)
        if progress:
            progress.advance()
    return projection


# --- reading the log ---------------------------------------------------------------------------


def _cut_decision_ids(conn: psycopg.Connection[Any], cut: Cut) -> set[str] | None:
    """The decisions inside a version or offsets cut, named by processed_events.detail."""
    if cut.until_version is None and cut.until_offsets is None:
        return None
    if cut.until_version is not None:
        rows = conn.execute("SELECT detail FROM processed_events WHERE detail IS NOT NULL AND version <= %s",
                            (cut.until_version,))
    else:
        assert cut.until_offsets is not None
        rows = conn.execute(
            'SELECT detail FROM processed_events p JOIN unnest(%s::text[], %s::int[], %s::bigint[]) AS c(t, n, o) '
            'ON p.topic = c.t AND p.partition = c.n AND p."offset" < c.o WHERE detail IS NOT NULL',
            ([t for t, _ in cut.until_offsets], [n for _, n in cut.until_offsets], list(cut.until_offsets.values())),
        )
    return {str(d["event_id"]) for (detail,) in rows for d in detail}


def read_archive(conn: psycopg.Connection[Any], settings: Settings, cut: Cut) -> tuple[list[Event], list[Event]]:
    codec = EventCodec()
    query = 'SELECT value, log_time, "offset" FROM event_archive WHERE topic = %s'
    # What the live projector dead-lettered (a wrong key, a record it could not apply)
    # never changed the projection, even when its bytes decode; a re-driven one did.
    query += (' AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.topic = event_archive.topic '
              'AND d.partition = event_archive.partition AND d."offset" = event_archive."offset" '
              "AND d.status <> 'resolved')")
    params: list[Any] = [settings.cells_topic]
    if cut.until_time is not None:
        query += " AND log_time <= %s"
        params.append(cut.until_time)
    if cut.until_version is not None:
        query += (' AND "offset" <= coalesce((SELECT max("offset") FROM processed_events '
                  "WHERE topic = %s AND version <= %s), -1)")
        params += [settings.cells_topic, cut.until_version]
    if cut.until_offsets is not None:
        query += ' AND "offset" < %s'
        params.append(cut.until_offsets.get((settings.cells_topic, 0), 0))
    cells = [e for (value, _, _) in conn.execute(query + ' ORDER BY "offset"', params)
             if value is not None and (e := decode_event(codec, bytes(value))) is not None]
    allowed = _cut_decision_ids(conn, cut)
    decisions = []
    decoder = DecisionDecoder(codec)
    for (payload,) in conn.execute("SELECT payload FROM topology_outbox ORDER BY id"):
        event = decoder.decode(bytes(payload))
        if event is None:
            raise ReplayError("an outbox row is not a readable decision")
        if cut.until_time is not None and event.occurred_at > cut.until_time:
            continue
        if allowed is not None and str(event.event_id) not in allowed:
            continue
        decisions.append(event)
    return cells, decisions


async def read_kafka(settings: Settings, cut: Cut, idle_ms: int = 2000) -> tuple[list[Event], list[Event]]:
    """Read the cells and claim-decisions topics from the beginning until they go quiet.
    (Broker end offsets are not trusted: the embedded broker reports them wrongly.)"""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    if cut.until_version is not None:
        raise ReplayError("a version cut needs the archive source (versions live in PostgreSQL)")
    codec = EventCodec()
    decoder = DecisionDecoder(codec)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        found: dict[str, list[Event]] = {settings.cells_topic: [], settings.claim_decisions_topic: []}
        for topic in found:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            limit = (cut.until_offsets or {}).get((topic, 0))
            read = decoder.decode if topic == settings.claim_decisions_topic else partial(decode_event, codec)
            while True:
                batch = await consumer.getmany(tp, timeout_ms=idle_ms, max_records=10_000)
                records = batch.get(tp, [])
                if not records:
                    break
                for record in records:
                    if limit is not None and record.offset >= limit:
                        break
                    event = read(record.value) if record.value is not None else None
                    if event is None:
                        continue
                    if cut.until_time is not None and event.occurred_at > cut.until_time:
                        continue
                    found[topic].append(event)
        return found[settings.cells_topic], found[settings.claim_decisions_topic]
    finally:
        await consumer.stop()


# --- writing a schema --------------------------------------------------------------------------


def schema_url(settings: Settings, schema: str) -> str:
    """The database URL with ``schema`` first on the search path."""
    separator = "&" if "?" in settings.sqlalchemy_url else "?"
    return f"{settings.sqlalchemy_url}{separator}options=-csearch_path%3D{schema}"


def create_schema(settings: Settings, schema: str, replace: bool) -> None:
    if not SCHEMA_NAME.match(schema) or schema in (LIVE_SCHEMA, "pg_catalog", "information_schema"):
        raise ReplayError(f"--into must name a new lower-case schema other than {LIVE_SCHEMA}, not {schema!r}")
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        if exists and not replace:
            raise ReplayError(f"schema {schema} exists; pass --replace to rebuild it")
        if exists:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    upgrade_to_head(schema_url(settings, schema))


def _copy(conn: psycopg.Connection[Any], schema: str, table: str, columns: list[str], rows: Iterable[tuple[Any, ...]]) -> None:
    statement = sql.SQL("COPY {}.{} ({}) FROM STDIN").format(
        sql.Identifier(schema), sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    with conn.cursor().copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


# The projection tables' columns and rows, shared with the resumable rebuild
# (projector/rebuild.py), so both write a projection the same way.
CELL_COLUMNS = ["cell_id", "address", "session_prefix", "region", "weight", "state", "state_reason", "version"]
CLAIM_COLUMNS = ["bucket", "value", "cell_id", "owner_type", "owner_id", "claimed_at", "version", "status", "lease_id"]
LEASE_COLUMNS = ["lease_id", "request_id", "cell_id", "owner_type", "owner_id", "claims", "expires_at", "status",
                 "cause", "version"]
RANGE_COLUMNS = ["sequence_name", "start", "end", "cell_id", "request_id", "version"]


def cell_row(c: Cell, version: int) -> tuple[Any, ...]:
    return (c.cell_id, c.address, c.session_prefix, c.region, c.weight, c.state.value, c.state_reason, version)


def claim_row(h: HeldClaim, version: int) -> tuple[Any, ...]:
    return (h.bucket, h.value, h.cell_id, h.owner_type.value, h.owner_id, h.claimed_at, version, h.status.value,
            h.lease_id)


def lease_row(l: Lease, version: int) -> tuple[Any, ...]:  # noqa: E741
    return (l.lease_id, l.request_id, l.cell_id, l.owner_type.value, l.owner_id,
            json.dumps([list(k) for k in l.claims]), l.expires_at, l.status.value,
            l.cause.value if l.cause else None, version)


def range_row(r: SequenceRangeGranted, version: int) -> tuple[Any, ...]:
    return (r.sequence_name, r.start, r.end, r.cell_id, r.request_id, version)


def write_projection(settings: Settings, schema: str, projection: Projection) -> None:
    v = projection.version
    with psycopg.connect(settings.libpq_url) as conn:
        _copy(conn, schema, "cells", CELL_COLUMNS, (cell_row(c, v) for c in projection.cells.values()))
        _copy(conn, schema, "claims", CLAIM_COLUMNS, (claim_row(h, v) for h in projection.registry.claims.values()))
        _copy(conn, schema, "leases", LEASE_COLUMNS, (lease_row(l, v) for l in projection.registry.leases.values()))
        _copy(conn, schema, "sequence_ranges", RANGE_COLUMNS,
              (range_row(r, v) for r in projection.registry.granted_ranges))
        conn.execute(sql.SQL("UPDATE {}.topology_version SET version = %s, committed_at = now()").format(
            sql.Identifier(schema)), (projection.version,))


def replay(settings: Settings, schema: str, cut: Cut, source: str = "archive", replace: bool = False,
           out: TextIO = sys.stderr) -> Projection:
    if source == "archive":
        with psycopg.connect(settings.libpq_url) as conn:
            cells, decisions = read_archive(conn, settings, cut)
    elif source == "kafka":
        cells, decisions = asyncio.run(read_kafka(settings, cut))
    else:
        raise ReplayError(f"--source is archive or kafka, not {source!r}")
    projection = fold(cells, decisions, Progress(len(cells) + len(decisions), out))
    projection.version = cut.until_version or 0
    create_schema(settings, schema, replace)
    write_projection(settings, schema, projection)
    return projection


# --- digest and verify -------------------------------------------------------------------------

# The projection's content: everything but the version columns, ordered by key.
DIGEST_QUERIES: dict[str, str] = {
    "cells": "SELECT cell_id, address, session_prefix, region, weight, state, state_reason FROM {s}.cells ORDER BY 1",
    "claims": "SELECT bucket, value, cell_id, owner_type, owner_id, claimed_at, status, lease_id FROM {s}.claims "
              "ORDER BY 1, 2",
    "leases": "SELECT lease_id, request_id, cell_id, owner_type, owner_id, claims, expires_at, status, cause "
              "FROM {s}.leases ORDER BY 1",
    "sequence_ranges": 'SELECT sequence_name, start, "end", cell_id, request_id FROM {s}.sequence_ranges ORDER BY 1, 2',
}


def table_rows(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[tuple[str, ...]]]:
    return {
        table: [tuple(json.dumps(v, sort_keys=True, default=str) for v in row)
                for row in conn.execute(sql.SQL(query.replace("{s}", "{}")).format(sql.Identifier(schema)))]
        for table, query in DIGEST_QUERIES.items()
    }


def digest(rows: dict[str, list[tuple[str, ...]]]) -> str:
    hasher = hashlib.sha256()
    for table in sorted(rows):
        hasher.update(table.encode())
        for row in rows[table]:
            hasher.update(b"\x1e" + "\x1f".join(row).encode())
    return hasher.hexdigest()


@dataclass
class Verification:
    live_digest: str
    replay_digest: str
    missing: dict[str, list[tuple[str, ...]]]  # in the replay, not live
    unexpected: dict[str, list[tuple[str, ...]]]  # live, not in the replay

    @property
    def equal(self) -> bool:
        return self.live_digest == self.replay_digest


def compare(settings: Settings, live_schema: str, replay_schema: str) -> Verification:
    with psycopg.connect(settings.libpq_url) as conn:
        return _verification(table_rows(conn, live_schema), table_rows(conn, replay_schema))


def _verification(live: dict[str, list[tuple[str, ...]]], replayed: dict[str, list[tuple[str, ...]]]) -> Verification:
    return Verification(
        live_digest=digest(live),
        replay_digest=digest(replayed),
        missing={t: sorted(set(replayed[t]) - set(live[t])) for t in live if set(replayed[t]) - set(live[t])},
        unexpected={t: sorted(set(live[t]) - set(replayed[t])) for t in live if set(live[t]) - set(replayed[t])},
    )


def verify(settings: Settings, scratch_schema: str = "topology_verify", out: TextIO = sys.stderr) -> Verification:
    """Replay the whole archive into a scratch schema and compare it, row by row, with
    the live tables. The live projector may keep running: the live rows and the log
    are read in one REPEATABLE READ snapshot, so both sides stand at the same cut."""
    with psycopg.connect(settings.libpq_url) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        # LOCK takes no snapshot: when a rebuild is switching tables (projector/rebuild.py),
        # the snapshot is taken once the switch committed, never half before it.
        conn.execute("LOCK TABLE public.topology_version IN ACCESS SHARE MODE")
        live = table_rows(conn, LIVE_SCHEMA)
        cells, decisions = read_archive(conn, settings, Cut())
    projection = fold(cells, decisions, Progress(len(cells) + len(decisions), out))
    create_schema(settings, scratch_schema, replace=True)
    try:
        write_projection(settings, scratch_schema, projection)
        with psycopg.connect(settings.libpq_url) as conn:
            replayed = table_rows(conn, scratch_schema)
    finally:
        with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(scratch_schema)))
    return _verification(live, replayed)


def export_rows(settings: Settings, schema: str, table: str, fmt: str, out: TextIO) -> int:
    if table not in DIGEST_QUERIES:
        raise ReplayError(f"--table is one of {', '.join(DIGEST_QUERIES)}")
    query = DIGEST_QUERIES[table].replace("{s}", "{}")
    count = 0
    with psycopg.connect(settings.libpq_url) as conn:
        cursor = conn.execute(sql.SQL(query).format(sql.Identifier(schema)))
        names = [c.name for c in cursor.description or []]
        if fmt == "csv":
            import csv

            writer = csv.writer(out)
            writer.writerow(names)
            for row in cursor:
                writer.writerow(row)
                count += 1
        else:
            for row in cursor:
                out.write(json.dumps(dict(zip(names, row, strict=True)), default=str) + "\n")
                count += 1
    return count
