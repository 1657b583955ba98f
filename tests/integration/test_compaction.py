"""Retention (adr/0020): ``topology compact`` removes exactly what is past its period and
nothing else; a duplicate inside the idempotency window is absorbed after a compaction;
outside it, what adr/0020 says happens does; the dry run changes nothing; the command's
output and exit codes. Real PostgreSQL; the duplicate tests go through a real broker
and a running projector."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import settings_env
from tests.integration.test_projector import Member, count, wait_for
from topology_store.producer.outbox import create_outbox
from topology_store.producer.publisher import EventPublisher
from topology_store.projector.compaction import (
    COMPACTION_LOCK,
    PROJECTION_TABLES,
    CompactionError,
    compact,
    compact_periodically,
    outbox_rules,
    projection_rules,
    report_table_sizes,
    table_sizes,
)
from topology_store.projector.metrics import ProjectorMetrics
from topology_store.projector.replay import replay, verify
from topology_store.runtime.settings import Settings
from topology_store.schemas.codec import EventCodec
from topology_store.schemas.models import (
    CellRegistered,
    ClaimBucket,
    ClaimCreated,
    ClaimRef,
    ClaimReleased,
    ClaimsRequested,
    LeaseCommitRequested,
    LeaseExpiryTick,
    LeaseRollbackRequested,
    OwnerType,
)

pytestmark = pytest.mark.integration

DAY = 86_400
TOPOLOGY = [sys.executable, "-m", "topology_store.cli"]


def everything(settings: Settings) -> dict[str, set[tuple[str, ...]]]:
    """Every row of every projection table, as text."""
    with psycopg.connect(settings.libpq_url) as conn:
        return {table: {tuple(str(v) for v in row) for row in conn.execute(f"SELECT * FROM {table}")}
                for table in PROJECTION_TABLES}


def ids(settings: Settings, query: str) -> set[str]:
    with psycopg.connect(settings.libpq_url) as conn:
        return {str(row[0]) for row in conn.execute(query)}


def seed(settings: Settings) -> dict[str, set[str]]:
    """Rows on both sides of every period; returns the ids that must go, by table."""
    gone: dict[str, set[str]] = {"processed_events": set(), "leases": set(), "dead_letters": set()}
    with psycopg.connect(settings.libpq_url) as conn:
        def processed(event_type: str, age_s: float, detail: str | None, offset: int) -> str:
            event_id = uuid.uuid4()
            conn.execute(
                "INSERT INTO processed_events (event_id, event_type, topic, partition, \"offset\", outcome, version, "
                "source, detail, occurred_at, processed_at) VALUES (%s, %s, 't', 0, %s, 'unchanged', 0, 'test', "
                "%s::jsonb, now() - %s * interval '1 second', now() - %s * interval '1 second')",
                (event_id, event_type, offset, detail, age_s, age_s))
            return str(event_id)

        gone["processed_events"] |= {processed("LeaseExpiryTick", 8 * DAY, None, 0),
                                     processed("LeaseExpiryTick", 7 * DAY + 60, None, 1)}
        processed("LeaseExpiryTick", 6 * DAY, None, 2)  # inside the window
        processed("LeaseExpiryTick", 40 * DAY, '[{"type": "LeaseReleased"}]', 3)  # decided something
        processed("ClaimCreated", 40 * DAY, None, 4)  # a decision: audit history reads it
        processed("ClaimsRequested", 40 * DAY, '[{"type": "ClaimsCommitted"}]', 5)

        def lease(status: str, expired_days_ago: float) -> str:
            lease_id = uuid.uuid4()
            conn.execute(
                "INSERT INTO leases (lease_id, request_id, cell_id, owner_type, owner_id, claims, expires_at, status, "
                "cause, version) VALUES (%s, %s, 'cell-1', 'USER', 1, '[]', now() - %s * interval '1 day', %s, %s, 0)",
                (lease_id, uuid.uuid4(), expired_days_ago, status, "EXPIRED" if status == "RELEASED" else None))
            return str(lease_id)

        gone["leases"] |= {lease("COMMITTED", 31), lease("RELEASED", 45)}
        lease("COMMITTED", 29)

        def gitlab_lease(status: str, granted_days_ago: float) -> str:  # no expiry: counted from its grant
            lease_id = uuid.uuid4()
            conn.execute(
                "INSERT INTO leases (lease_id, request_id, cell_id, owner_type, owner_id, claims, expires_at, status, "
                "version, granted_at) VALUES (%s, %s, 'cell-1', 'USER', 1, '[]', '9999-12-31T23:59:59.999Z', %s, 0, "
                "now() - %s * interval '1 day')", (lease_id, uuid.uuid4(), status, granted_days_ago))
            return str(lease_id)

        gone["leases"].add(gitlab_lease("COMMITTED", 31))
        gitlab_lease("COMMITTED", 29)
        gitlab_lease("OPEN", 60)  # open: kept (Rails finishes it; adr/0022)
        lease("RELEASED", 1)
        lease("OPEN", 60)  # open: kept however old (the next tick or request expires it)
        lease("OPEN", -1)

        def dead_letter(offset: int, status: str, resolved_days_ago: float | None) -> str:
            row = conn.execute(
                "INSERT INTO dead_letters (topic, partition, \"offset\", value, error, status, resolved_at) "
                "VALUES ('t', 0, %s, 'x', 'bad', %s, now() - %s * interval '1 day') RETURNING id",
                (offset, status, resolved_days_ago)).fetchone()
            assert row is not None
            return str(row[0])

        gone["dead_letters"].add(dead_letter(0, "resolved", 31))
        dead_letter(1, "resolved", 2)
        dead_letter(2, "discarded", 400)  # the archive replay skips its record because of this row
        conn.execute("INSERT INTO dead_letters (topic, partition, \"offset\", value, error, created_at) "
                     "VALUES ('t', 0, 3, 'x', 'bad', now() - interval '400 days')")  # open

        # Kept forever whatever their age: the archive, the audit index, sequence ranges, decisions.
        for offset in range(3):
            conn.execute("INSERT INTO event_archive (topic, partition, \"offset\", value, log_time, archived_at) "
                         "VALUES ('t', 0, %s, 'x', now() - interval '400 days', now() - interval '400 days')",
                         (offset,))
        conn.execute("INSERT INTO event_keys (kind, key, event_id) VALUES ('cell', 'cell-1', %s)", (uuid.uuid4(),))
        for start in (0, 100, 200):
            conn.execute("INSERT INTO sequence_ranges (sequence_name, start, \"end\", cell_id, request_id, version) "
                         "VALUES ('ids', %s, %s, 'cell-1', %s, 0)", (start, start + 100, uuid.uuid4()))
        outbox_row(conn, "LeaseGranted", "now() - interval '400 days'")
    return gone


def outbox_row(conn: psycopg.Connection[Any], event_type: str, published_at: str) -> None:
    """An outbox row, published at ``published_at`` (SQL); the insert trigger clears it, so set after."""
    row = conn.execute("INSERT INTO topology_outbox (event_id, event_type, partition_key, payload, created_at) "
                       "VALUES (%s, %s, 'k', %s, now() - interval '400 days') RETURNING id",
                       (uuid.uuid4(), event_type, b"\xc3\x01" + bytes(8) + b"x")).fetchone()
    assert row is not None
    conn.execute(f"UPDATE topology_outbox SET published_at = {published_at} WHERE id = %s", (row[0],))


def run(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TOPOLOGY, "compact", *args], check=False, env={**settings_env(settings), **env},
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent)


def test_compact_removes_exactly_what_is_past_its_period_and_the_dry_run_nothing(settings: Settings) -> None:
    gone = seed(settings)
    before = everything(settings)

    dry = run(settings, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    planned = {line["table"]: line for line in map(json.loads, dry.stdout.splitlines())}
    assert {table: line["would_delete"] for table, line in planned.items()} == {
        table: len(rows) for table, rows in gone.items()}
    assert planned["processed_events"]["older_than_s"] == 7 * DAY
    assert "(dry run)" in dry.stderr
    assert everything(settings) == before

    done = run(settings, "--batch-blocks", "1")  # many batches: the block ranges cover the whole table
    assert done.returncode == 0, done.stderr
    assert {line["table"]: line["deleted"] for line in map(json.loads, done.stdout.splitlines())} == {
        table: len(rows) for table, rows in gone.items()}
    assert "rows deleted" in done.stderr
    after = everything(settings)
    keys = {"processed_events": "event_id", "leases": "lease_id", "dead_letters": "id"}
    for table, key in keys.items():
        remaining = ids(settings, f"SELECT {key} FROM {table}")
        assert not remaining & gone[table], table
        assert len(before[table]) - len(after[table]) == len(gone[table]), table
        assert after[table] <= before[table], table
    for table in set(PROJECTION_TABLES) - set(keys):  # untouched: the archive, keys, ranges, the outbox
        assert after[table] == before[table], table
    assert count(settings, "SELECT count(*) FROM leases WHERE status = 'OPEN'") == 3
    assert count(settings, "SELECT count(*) FROM event_archive") == 3
    assert count(settings, "SELECT count(*) FROM dead_letters WHERE status = 'discarded'") == 1

    again = run(settings)  # nothing left past its period
    assert again.returncode == 0, again.stderr
    assert all(line["deleted"] == 0 for line in map(json.loads, again.stdout.splitlines()))
    assert everything(settings) == after


def test_retentions_of_zero_keep_those_kinds_and_shorter_periods_take_more(settings: Settings) -> None:
    seed(settings)
    kept = run(settings, TOPOLOGY_RETAIN_ENDED_LEASES_S="0", TOPOLOGY_RETAIN_RESOLVED_DEAD_LETTERS_S="0")
    assert kept.returncode == 0, kept.stderr
    assert [json.loads(line)["table"] for line in kept.stdout.splitlines()] == ["processed_events"]
    assert count(settings, "SELECT count(*) FROM leases") == 9
    # A one-hour window: the tick six days old goes too, decisions still stay.
    shorter = run(settings, TOPOLOGY_IDEMPOTENCY_WINDOW_S="3600", TOPOLOGY_RETAIN_ENDED_LEASES_S="3600")
    assert shorter.returncode == 0, shorter.stderr
    assert count(settings, "SELECT count(*) FROM processed_events WHERE event_type = 'LeaseExpiryTick'") == 1
    assert count(settings, "SELECT count(*) FROM processed_events") == 3
    assert ids(settings, "SELECT status FROM leases") == {"OPEN"}  # every ended one is past an hour
    assert count(settings, "SELECT count(*) FROM leases") == 3


def test_the_commands_refusals_and_exit_codes(settings: Settings, new_database: Any) -> None:
    # Bad usage: 2.
    assert run(settings, "--batch-blocks", "0").returncode == 2
    refused = run(settings, "--source", "postgresql://x/y")
    assert refused.returncode == 2 and "--outbox" in refused.stderr
    no_source = run(settings, "--outbox", TOPOLOGY_RELAY_SOURCE_URL="")
    assert no_source.returncode == 2 and "TOPOLOGY_RELAY_SOURCE_URL" in no_source.stderr
    # A lease retention shorter than the window is a bad configuration.
    bad = run(settings, TOPOLOGY_RETAIN_ENDED_LEASES_S="60")
    assert bad.returncode != 0 and "TOPOLOGY_RETAIN_ENDED_LEASES_S" in bad.stderr
    # The projection's own outbox holds the decisions: refused, naming why.
    projection_outbox = run(settings, "--outbox", "--source", settings.libpq_url)
    assert projection_outbox.returncode == 1 and "decisions" in projection_outbox.stderr
    # A database with no projection tables.
    empty = new_database()
    with psycopg.connect(empty.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS event_archive CASCADE")
    unmigrated = run(settings, TOPOLOGY_DATABASE_URL=empty)
    assert unmigrated.returncode == 1 and "topology migrate" in unmigrated.stderr
    # One compaction per database: a second one says so and exits 1; a dry run still counts.
    with psycopg.connect(settings.libpq_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (COMPACTION_LOCK,))
        busy = run(settings)
        assert busy.returncode == 1 and "another compaction" in busy.stderr and busy.stdout == ""
        assert run(settings, "--dry-run").returncode == 0
    # An unreachable database: 1, with the error's name.
    down = run(settings, TOPOLOGY_DATABASE_URL="postgresql://postgres@127.0.0.1:1/nothing")
    assert down.returncode == 1 and "database error" in down.stderr


def test_a_producers_outbox_loses_only_published_rows_past_their_period(settings: Settings,
                                                                        new_database: Any) -> None:
    source = new_database().replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
        create_outbox(conn)
        for published in ("now() - interval '8 days'", "now() - interval '1 day'", "NULL"):
            outbox_row(conn, "CellRegistered", published)
    done = run(settings, "--outbox", "--source", source)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["deleted"] for line in done.stdout.splitlines()] == [1]
    with psycopg.connect(source) as conn:
        left = conn.execute("SELECT published_at IS NULL FROM topology_outbox ORDER BY id").fetchall()
    assert left == [(False,), (True,)]  # the unpublished row stays whatever its age
    assert outbox_rules(Settings(retain_published_outbox_s=0)) == []


def test_table_sizes_are_catalog_estimates_of_every_projection_table(settings: Settings) -> None:
    seed(settings)
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        conn.execute("ANALYZE")
        sizes = table_sizes(conn)
    assert set(sizes) == set(PROJECTION_TABLES)
    assert sizes["processed_events"][0] == 6 and sizes["leases"][0] == 9
    assert all(size > 0 for _, size in sizes.values())
    metrics = ProjectorMetrics()
    for table, (rows, size) in sizes.items():
        metrics.table_rows.labels(table).set(rows)
        metrics.table_bytes.labels(table).set(size)
    assert metrics.registry.get_sample_value("topology_database_table_rows", {"table": "leases"}) == 9


def test_a_stopped_compaction_reports_the_table_incomplete(settings: Settings) -> None:
    seed(settings)
    outcomes = compact(settings.libpq_url, projection_rules(settings), stopping=lambda: True)
    assert outcomes and not any(o.complete for o in outcomes)
    assert count(settings, "SELECT count(*) FROM leases") == 9
    with pytest.raises(CompactionError):
        compact(settings.libpq_url, projection_rules(settings), batch_blocks=0)


# --- duplicates through the broker ----------------------------------------------------------------


def claim(value: str) -> ClaimCreated:
    return ClaimCreated(source="cell-1", bucket=ClaimBucket.NAMESPACE, value=value, cell_id="cell-1",
                        owner_type=OwnerType.GROUP, owner_id=1)


async def publish_and_wait(settings: Settings, publisher: EventPublisher, event: Any) -> None:
    """Publish and wait until the projector committed past the record."""
    published = await publisher.publish(event)
    await wait_for(settings, "SELECT count(*) FROM partition_offsets WHERE topic = "
                   f"'{published.topic}' AND partition = {published.partition} "
                   f"AND next_offset > {published.offset}", 1)


def age(settings: Settings, event_id: uuid.UUID, seconds: float) -> None:
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        conn.execute("UPDATE processed_events SET processed_at = now() - %s * interval '1 second' "
                     "WHERE event_id = %s", (seconds, event_id))


async def test_a_duplicate_inside_the_window_is_absorbed_after_compaction(topics: Settings) -> None:
    settings = topics
    # Claimed, then released: applying the claim a second time would claim it again.
    inside, tick = claim("inside-the-window"), LeaseExpiryTick(source="test")
    released = ClaimReleased(**inside.model_dump(exclude={"event_id", "occurred_at"}))
    publisher = EventPublisher(settings)
    await publisher.start()
    try:
        async with Member(settings):
            for event in (inside, released, tick):
                await publish_and_wait(settings, publisher, event)
            assert count(settings, "SELECT count(*) FROM claims") == 0
            version = count(settings, "SELECT version FROM topology_version")
            age(settings, inside.event_id, 7 * DAY - 3600)  # an hour inside the window
            age(settings, tick.event_id, 7 * DAY + 3600)  # an hour past it
            outcomes = await asyncio.to_thread(compact, settings.libpq_url, projection_rules(settings))
            assert {o.table: o.rows for o in outcomes}["processed_events"] == 1  # the tick went, and only it

            await publish_and_wait(settings, publisher, inside)  # the same event id again
            assert count(settings, "SELECT count(*) FROM claims") == 0  # absorbed, not claimed again
            assert count(settings, "SELECT version FROM topology_version") == version
            assert count(settings, f"SELECT count(*) FROM processed_events WHERE event_id = '{inside.event_id}' "
                                   "AND processed_at < now() - interval '6 days'") == 1  # the first record stands
    finally:
        await publisher.stop()


async def test_outside_the_window_decisions_are_kept_and_a_no_op_tick_is_decided_again(topics: Settings) -> None:
    """adr/0020: past the window only no-op ticks are forgotten; a duplicate of one is
    decided again and changes nothing. Every other record stays (the audit record), so
    its duplicate is still absorbed, though the window is all that is promised."""
    settings = topics
    outside, tick = claim("outside-the-window"), LeaseExpiryTick(source="test")
    released = ClaimReleased(**outside.model_dump(exclude={"event_id", "occurred_at"}))
    publisher = EventPublisher(settings)
    await publisher.start()
    try:
        async with Member(settings):
            for event in (outside, released, tick):
                await publish_and_wait(settings, publisher, event)
            for event in (outside, tick):
                age(settings, event.event_id, 30 * DAY)
            await asyncio.to_thread(compact, settings.libpq_url, projection_rules(settings))
            assert count(settings, f"SELECT count(*) FROM processed_events WHERE event_id = '{tick.event_id}'") == 0
            version = count(settings, "SELECT version FROM topology_version")
            claims = count(settings, "SELECT count(*) FROM claims")

            for event in (outside, tick):
                await publish_and_wait(settings, publisher, event)
            # The claim's record was kept: absorbed. The tick was forgotten: decided again, to no effect.
            assert count(settings, f"SELECT count(*) FROM processed_events WHERE event_id = '{outside.event_id}' "
                                   "AND processed_at < now() - interval '29 days'") == 1
            assert count(settings, f"SELECT count(*) FROM processed_events WHERE event_id = '{tick.event_id}' "
                                   "AND processed_at > now() - interval '1 hour' AND detail IS NULL") == 1
            assert count(settings, "SELECT version FROM topology_version") == version
            assert count(settings, "SELECT count(*) FROM claims") == claims == 0
    finally:
        await publisher.stop()


async def test_verify_still_agrees_after_ended_leases_are_compacted(topics: Settings) -> None:
    """The replay brings back every lease; verify leaves out, on both sides, the ended
    ones compaction may have removed (adr/0020). Without that, it would differ."""
    settings = topics.model_copy(update={"idempotency_window_s": 60.0, "retain_ended_leases_s": 60.0})
    committed, rolled_back, still_open = (
        ClaimsRequested(source="cell-1", cell_id="cell-1", owner_type=OwnerType.USER, owner_id=n, lease_ttl_ms=ttl,
                        claims=[ClaimRef(bucket=ClaimBucket.USERNAME, value=f"user-{n}")])
        for n, ttl in ((1, 5_000), (2, 5_000), (3, 3_600_000)))
    events = [committed, rolled_back, still_open,
              LeaseCommitRequested(source="cell-1", lease_id=committed.lease_id, cell_id="cell-1"),
              LeaseRollbackRequested(source="cell-1", lease_id=rolled_back.lease_id, cell_id="cell-1")]
    publisher = EventPublisher(settings)
    await publisher.start()
    try:
        async with Member(settings):
            for event in events:
                await publish_and_wait(settings, publisher, event)
            assert ids(settings, "SELECT status FROM leases") == {"OPEN", "COMMITTED", "RELEASED"}
            # The two ended leases' expiry must be a retention (60 s) in the past.
            await wait_for(settings, "SELECT count(*) FROM leases WHERE status <> 'OPEN' "
                                     "AND expires_at < now() - interval '61 seconds'", 2, timeout_s=120)
            outcomes = await asyncio.to_thread(compact, settings.libpq_url, projection_rules(settings))
            assert {o.table: o.rows for o in outcomes}["leases"] == 2
            assert ids(settings, "SELECT status FROM leases") == {"OPEN"}
            result = await asyncio.to_thread(verify, settings)
            assert result.equal, (result.missing, result.unexpected)
            keeping = settings.model_copy(update={"retain_ended_leases_s": 0.0})
            differs = await asyncio.to_thread(verify, keeping)
            assert not differs.equal and len(differs.missing["leases"]) == 2
    finally:
        await publisher.stop()


async def test_the_projectors_scheduled_compaction_takes_turns_and_reports(settings: Settings) -> None:
    gone = seed(settings)
    scheduled = settings.model_copy(update={"compact_interval_s": 0.2})
    first, second = ProjectorMetrics(), ProjectorMetrics()
    stop = asyncio.Event()
    # While another holds the compaction lock, a member skips its rounds.
    with psycopg.connect(settings.libpq_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (COMPACTION_LOCK,))
        waiting = asyncio.create_task(compact_periodically(scheduled, second, stop))
        await asyncio.sleep(1.0)
        assert second.registry.get_sample_value("topology_compaction_last_success_timestamp_seconds") is None
        assert count(settings, "SELECT count(*) FROM leases") == 9
    running = asyncio.create_task(compact_periodically(scheduled, first, stop))
    sizes = asyncio.create_task(report_table_sizes(settings, first, stop, interval_s=0.2))
    try:
        for _ in range(200):
            if count(settings, "SELECT count(*) FROM leases") == 6:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a few more rounds: nothing more goes
    finally:
        stop.set()
        await asyncio.gather(waiting, running, sizes)
    deleted = {table: sum(m.registry.get_sample_value("topology_compaction_deleted_rows_total", {"table": table}) or 0
                          for m in (first, second)) for table in gone}
    assert deleted == {table: len(rows) for table, rows in gone.items()}
    assert any(m.registry.get_sample_value("topology_compaction_last_success_timestamp_seconds") for m in (first, second))
    assert first.registry.get_sample_value("topology_database_table_bytes", {"table": "event_archive"}) > 0


def test_an_archive_replay_is_the_same_without_a_compacted_resolved_dead_letter(settings: Settings) -> None:
    """Why resolved dead letters may go and discarded ones may not (adr/0020): the archive
    replay applies a record whose dead letter is resolved or absent, and skips a discarded one."""
    codec = EventCodec()
    cells = [CellRegistered(source="ops", cell_id=f"cell-{n}", address=f"https://c{n}.example.com",
                            session_prefix=f"c{n}", region="eu") for n in (1, 2)]
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        for offset, cell in enumerate(cells):
            conn.execute("INSERT INTO event_archive (topic, partition, \"offset\", key, value, log_time) "
                         "VALUES (%s, 0, %s, %s, %s, now())", (settings.cells_topic, offset,
                                                               cell.partition_key.encode(),
                                                               codec.encode(cell.EVENT_TYPE, cell.to_avro())))
        for offset, status in ((0, "resolved"), (1, "discarded")):
            conn.execute("INSERT INTO dead_letters (topic, partition, \"offset\", value, error, status, resolved_at) "
                         "VALUES (%s, 0, %s, 'x', 'bad', %s, now() - interval '31 days')",
                         (settings.cells_topic, offset, status))
    quiet = io.StringIO()
    before = replay(settings, "with_letters", replace=True, out=quiet)
    assert set(before.cells) == {"cell-1"}  # the resolved one applied, the discarded one skipped
    outcomes = compact(settings.libpq_url, projection_rules(settings))
    assert {o.table: o.rows for o in outcomes}["dead_letters"] == 1
    assert ids(settings, "SELECT status FROM dead_letters") == {"discarded"}
    after = replay(settings, "without_resolved", replace=True, out=quiet)
    assert after.cells == before.cells
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        conn.execute("DELETE FROM dead_letters")  # what compaction must never do to a discarded one
    assert set(replay(settings, "without_any", replace=True, out=quiet).cells) == {"cell-1", "cell-2"}
