"""Poison events never block a partition and are never dropped (README "Reliability").

- A readable event the database refuses (a character a LATIN1 database cannot hold:
  a real ``psycopg.DataError``, no monkeypatching) and one the pure rules cannot
  decide (a lease that would end after the year 9999: ``OverflowError``) are isolated
  from their batch by bisection and dead-lettered; everything around them commits,
  and their partitions move on.
- A record whose timestamp no datetime can hold is a dead letter at read time.
- ``topology dlq`` lists and shows them, re-drives one once the cause is fixed (a
  newer writer schema deployed) through the store path without moving any offset,
  absorbs a second re-drive of the same event as a duplicate, and records discards.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import fastavro
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from fastavro import schemaless_writer
from psycopg import sql

from tests.conftest import _as_url, _database_url
from tests.integration.test_projector import Member, count, wait_for
from tests.servers import APACHE, Servers
from topology_store.cli.main import main
from topology_store.projector.dead_letters import redrive
from topology_store.projector.migrate import upgrade_to_head
from topology_store.projector.replay import verify
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import MAGIC, EventCodec
from topology_store.schemas.models import (
    CellRegistered,
    CellState,
    CellStateChanged,
    ClaimBucket,
    ClaimCreated,
    ClaimRef,
    ClaimsRequested,
    Event,
    OwnerType,
)
from topology_store.schemas.registry import EventSchema, SchemaRegistry, fingerprint_bytes, load_registry

pytestmark = pytest.mark.integration


async def send(settings: Settings, records: list[tuple[str, bytes | None, bytes, int | None]]) -> None:
    """Raw records (topic, key, value, timestamp_ms), all on partition 0: the
    partition a poison sits on must be the one shown to move on."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for topic, key, value, timestamp_ms in records:
            await producer.send_and_wait(topic, value=value, key=key, partition=0, timestamp_ms=timestamp_ms)
    finally:
        await producer.stop()


def encoded(event: Event, topic: str, timestamp_ms: int | None = None) -> tuple[str, bytes, bytes, int | None]:
    return topic, event.partition_key.encode(), EventCodec().encode(event.EVENT_TYPE, event.to_avro()), timestamp_ms


def claim(value: str, bucket: ClaimBucket = ClaimBucket.NAMESPACE) -> ClaimCreated:
    return ClaimCreated(source="cell-1", bucket=bucket, value=value, cell_id="cell-1",
                        owner_type=OwnerType.GROUP, owner_id=1)


@pytest.fixture(params=["server", "driver"])
def latin1(request: pytest.FixtureRequest, servers: Servers, settings: Settings) -> Iterator[Settings]:
    """The test's settings on a LATIN1 database: valid Unicode text that this encoding
    cannot hold is refused by PostgreSQL itself when the client speaks UTF8 (SQLSTATE
    22P05, psycopg.DataError), or by the driver, which otherwise adopts the database's
    encoding (UnicodeEncodeError). Both happen in real deployments."""
    name = f"topology_latin1_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'")
                     .format(sql.Identifier(name)))
    url = _as_url(_database_url(servers, name))
    if request.param == "server":
        url += ("&" if "?" in url else "?") + "client_encoding=UTF8"
    latin1 = settings.model_copy(update={"database_url": url})
    upgrade_to_head(latin1.sqlalchemy_url)
    yield latin1
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def test_an_event_the_database_refuses_is_isolated_and_its_partitions_move_on(latin1: Settings) -> None:
    from topology_store.runtime.topics import ensure_topics

    await ensure_topics(latin1)
    cells, claims = latin1.cells_topic, latin1.claims_topic
    await send(latin1, [
        encoded(CellRegistered(source="ops", cell_id="cell-1", address="https://c1.example.com", session_prefix="c1",
                               region="eu"), cells),
        # Valid Unicode, valid event; PostgreSQL in LATIN1 cannot store the region.
        encoded(CellRegistered(source="ops", cell_id="cell-2", address="https://c2.example.com", session_prefix="c2",
                               region="東京"), cells),
        encoded(CellStateChanged(source="ops", cell_id="cell-1", state=CellState.ACTIVE), cells),
        encoded(claim("before"), claims),
        encoded(claim("ssh-ed25519 AAAAC3Nza 鍵", ClaimBucket.KEY), claims),
        encoded(claim("after"), claims),
    ])
    settings = latin1.model_copy(update={"batch_max_events": 1000, "batch_wait_ms": 300})
    async with Member(settings) as member:
        await wait_for(settings, "SELECT count(*) FROM dead_letters", 2)
        await wait_for(settings, "SELECT count(*) FROM processed_events", 4)
    isolated = member.projector.metrics.isolated._value.get()  # noqa: SLF001 - a counter's value

    with psycopg.connect(settings.libpq_url) as conn:
        letters = conn.execute('SELECT topic, "offset", key, value, error, status FROM dead_letters ORDER BY topic').fetchall()
        offsets = dict(conn.execute("SELECT topic, next_offset FROM partition_offsets WHERE partition = 0").fetchall())
        cells_now = conn.execute("SELECT cell_id, state FROM cells ORDER BY 1").fetchall()
        claimed = [row[0] for row in conn.execute("SELECT value FROM claims ORDER BY 1")]
        archived = conn.execute("SELECT count(*) FROM event_archive").fetchone()
    assert isolated == 2
    assert [(topic, offset, status) for topic, offset, _, _, _, status in letters] == [
        (cells, 1, "open"), (claims, 1, "open")]
    for _, _, key, value, error, _ in letters:
        if "client_encoding=UTF8" in settings.database_url:
            assert "UntranslatableCharacter (SQLSTATE 22P05)" in error and "LATIN1" in error  # a DataError
        else:
            assert "UnicodeEncodeError: 'latin-1' codec can't encode" in error
        assert value[:2] == b"\xc3\x01" and key  # the record, byte for byte
    assert cells_now == [("cell-1", "ACTIVE")]
    assert claimed == ["after", "before"]
    assert (offsets[cells], offsets[claims]) == (3, 3)  # both partitions moved past their poison
    assert archived == (6,)
    # A replay skips what the live run dead-lettered, so both agree.
    assert verify(settings).equal

    # The cause is not fixed (still LATIN1): a re-drive reports the error again and keeps it.
    (letter_id,) = [row[0] for row in psycopg.connect(settings.libpq_url).execute(
        "SELECT id FROM dead_letters WHERE topic = %s", (claims,))]
    (result,) = await redrive(settings, [letter_id], "tester@test")
    assert result.status == "still_failing" and result.error == letters[1][4]
    assert count(settings, f"SELECT replay_attempts FROM dead_letters WHERE id = {letter_id}") == 1


@pytest.mark.both_brokers  # Apache Kafka stamps claim requests itself (LogAppendTime); Tansu keeps these
async def test_an_event_the_rules_cannot_decide_and_an_impossible_timestamp_become_dead_letters(
    topics: Settings, servers: Servers,
) -> None:
    requests = topics.claim_requests_topic

    def request(value: str) -> ClaimsRequested:
        return ClaimsRequested(source="cell-1", cell_id="cell-1", owner_type=OwnerType.USER, owner_id=1,
                               claims=(ClaimRef(bucket=ClaimBucket.USERNAME, value=value),))

    year_9999 = int(datetime(9999, 12, 31, 23, 59, tzinfo=UTC).timestamp() * 1000)
    in_microseconds = int(datetime.now(UTC).timestamp() * 1_000_000)  # a producer bug: µs, not ms
    await send(topics, [
        encoded(request("first"), requests),
        encoded(request("far-future"), requests, timestamp_ms=year_9999),  # its lease would end after 9999
        encoded(request("microseconds"), requests, timestamp_ms=in_microseconds),
        encoded(request("last"), requests),
    ])
    if servers.broker.kind == APACHE:
        # The claim-requests topic is LogAppendTime (adr/0010, adr/0016): the broker replaced
        # the producer's impossible timestamps with its own clock, so all four are decided.
        async with Member(topics):
            await wait_for(topics, "SELECT count(*) FROM processed_events", 4)
        with psycopg.connect(topics.libpq_url) as conn:
            assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
            held = [row[0] for row in conn.execute("SELECT value FROM claims ORDER BY 1")]
        assert held == ["far-future", "first", "last", "microseconds"]
        return
    async with Member(topics.model_copy(update={"batch_wait_ms": 300})) as member:
        await wait_for(topics, "SELECT count(*) FROM dead_letters", 2)
        await wait_for(topics, "SELECT count(*) FROM processed_events", 2)

    with psycopg.connect(topics.libpq_url) as conn:
        letters = conn.execute('SELECT "offset", error FROM dead_letters ORDER BY "offset"').fetchall()
        held = [row[0] for row in conn.execute("SELECT value FROM claims ORDER BY 1")]
        next_offset = conn.execute("SELECT next_offset FROM partition_offsets WHERE topic = %s AND partition = 0",
                                   (requests,)).fetchone()
    assert [offset for offset, _ in letters] == [1, 2]
    assert "OverflowError" in letters[0][1]
    assert f"record timestamp {in_microseconds} ms is outside the years 1 to 9999" in letters[1][1]
    assert held == ["first", "last"]
    assert next_offset == (4,)
    assert member.projector.metrics.isolated._value.get() == 1  # noqa: SLF001 - only the one that failed to apply


def newer_claim_schema() -> EventSchema:
    """ClaimCreated as a newer producer writes it: one more field, with a default."""
    raw = json.loads(json.dumps(load_registry().readers["ClaimCreated"].raw))
    raw["fields"].append({"name": "note", "type": ["null", "string"], "default": None})
    parsed = fastavro.parse_schema(raw, named_schemas={})
    return EventSchema(event_type="ClaimCreated", parsed=parsed, fingerprint=fingerprint_bytes(parsed), raw=raw)


def encode_with(schema: EventSchema, payload: dict[str, object]) -> bytes:
    buffer = io.BytesIO(MAGIC + schema.fingerprint)
    buffer.seek(0, io.SEEK_END)
    schemaless_writer(buffer, schema.parsed, payload)
    return buffer.getvalue()


def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        *argv: str) -> tuple[int, str, str]:
    """``topology ...`` in this process, configured by the environment as a shell would."""
    monkeypatch.setenv("TOPOLOGY_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("TOPOLOGY_KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
    monkeypatch.setenv("TOPOLOGY_CLAIMS_TOPIC", settings.claims_topic)
    monkeypatch.setenv("TOPOLOGY_CELLS_TOPIC", settings.cells_topic)
    monkeypatch.setenv("TOPOLOGY_CLAIM_REQUESTS_TOPIC", settings.claim_requests_topic)
    capsys.readouterr()
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


async def test_the_dlq_commands_inspect_redrive_after_a_schema_deploy_and_discard(
    topics: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    newer = newer_claim_schema()
    late = claim("from-a-newer-producer")
    payload = {**late.to_avro(), "note": "written by v3"}
    retried = encode_with(newer, payload)  # the producer retried: same event, a second record
    await send(topics, [
        (topics.claims_topic, late.partition_key.encode(), encode_with(newer, payload), None),
        (topics.claims_topic, b"junk", b"not an event at all", None),
        (topics.claims_topic, late.partition_key.encode(), retried, None),
        encoded(claim("unrelated"), topics.claims_topic),
    ])
    async with Member(topics):
        await wait_for(topics, "SELECT count(*) FROM dead_letters", 3)
        await wait_for(topics, "SELECT count(*) FROM processed_events", 1)
    ids = [row[0] for row in psycopg.connect(topics.libpq_url).execute('SELECT id FROM dead_letters ORDER BY "offset"')]
    first, junk, second = ids

    status, out, _ = await asyncio.to_thread(cli, topics, monkeypatch, capsys, "dlq", "list")
    listed = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [item["id"] for item in listed] == ids
    assert "unknown writer schema fingerprint" in listed[0]["error"] and listed[0]["event_type"] is None

    status, out, _ = await asyncio.to_thread(cli, topics, monkeypatch, capsys, "dlq", "show", str(first))
    shown = json.loads(out)
    assert status == 0 and shown["status"] == "open" and shown["key"] == "NAMESPACE:from-a-newer-producer"
    assert shown["readable_now"]["ok"] is False and "value_hex" not in shown  # raw bytes only with --pii

    # This deployment does not know the newer writer yet: the re-drive fails and says why.
    status, out, err = await asyncio.to_thread(cli, topics, monkeypatch, capsys, "dlq", "replay", str(first))
    assert status == 1 and json.loads(out)["status"] == "still_failing" and "1 of 1" in err

    offsets_before = psycopg.connect(topics.libpq_url).execute(
        "SELECT topic, partition, next_offset FROM partition_offsets ORDER BY 1, 2").fetchall()
    # Deploy the newer schema (here: a registry that knows its fingerprint) and re-drive.
    current = load_registry()
    deployed = EventCodec(SchemaRegistry(readers=current.readers, writers={**current.writers,
                                                                           newer.fingerprint: newer}))
    resolved = await redrive(topics, [first, first, second], "operator@test", codec=deployed)
    assert [(r.status, r.outcome) for r in resolved] == [
        ("resolved", "applied"), ("not_open", None), ("resolved", "duplicate")]

    with psycopg.connect(topics.libpq_url) as conn:
        held = conn.execute("SELECT cell_id FROM claims WHERE value = 'from-a-newer-producer'").fetchone()
        decided = conn.execute("SELECT outcome, topic, \"offset\" FROM processed_events WHERE event_id = %s",
                               (late.event_id,)).fetchall()
        offsets_after = conn.execute("SELECT topic, partition, next_offset FROM partition_offsets ORDER BY 1, 2").fetchall()
        row = conn.execute("SELECT status, resolved_by, resolution, event_id, replay_attempts FROM dead_letters "
                           "WHERE id = %s", (first,)).fetchone()
    assert held == ("cell-1",)
    assert decided == [("applied", topics.claims_topic, 0)]  # once, at its own position in the log
    assert offsets_after == offsets_before  # a re-drive moves no offset
    assert row == ("resolved", "operator@test", "re-driven: applied", late.event_id, 2)
    assert verify(topics).equal  # the decision went to the outbox like any other

    # Discards need a reason, are recorded, and never delete anything.
    status, _, err = await asyncio.to_thread(cli, topics, monkeypatch, capsys, "dlq", "discard", str(junk),
                                             "--reason", " ")
    assert status == 1 and "--reason must say why" in err
    status, out, _ = await asyncio.to_thread(cli, topics, monkeypatch, capsys, "dlq", "discard", str(junk),
                                             "--reason", "a load test wrote garbage", "--by", "oncall")
    assert status == 0 and json.loads(out)["status"] == "discarded"
    status, _, err = await asyncio.to_thread(cli, topics, monkeypatch, capsys, "dlq", "discard", str(junk),
                                             "--reason", "again")
    assert status == 1 and "already discarded" in err
    status, out, _ = await asyncio.to_thread(cli, topics, monkeypatch, capsys, "dlq", "list", "--status", "all")
    everything = {item["id"]: item for item in map(json.loads, out.splitlines())}
    assert {i: everything[i]["status"] for i in ids} == {first: "resolved", junk: "discarded", second: "resolved"}
    assert everything[junk]["resolution"] == "a load test wrote garbage"
    status, out, _ = await asyncio.to_thread(cli, topics, monkeypatch, capsys, "dlq", "list")
    assert status == 0 and out == ""  # nothing open any more

