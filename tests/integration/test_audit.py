"""Auditors on the real stack: a key's history from the log, point-in-time replay,
replay from the archive and from Kafka, and verify catching a tampered row."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from tests.integration.processes import start, stop
from tests.integration.test_projector import Member, publish, wait_for
from topology_store.core.audit import audit_key
from topology_store.projector.replay import LIVE_SCHEMA, compare, replay, table_rows, verify
from topology_store.projector.sources import Cut
from topology_store.query_api.audit_api import key_history
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import (
    CellRegistered,
    ClaimBucket,
    ClaimCreated,
    ClaimRef,
    ClaimReleased,
    ClaimsRequested,
    LeaseCommitRequested,
    OwnerType,
)

pytestmark = pytest.mark.integration


def created(value: str, cell: str, owner: int) -> ClaimCreated:
    return ClaimCreated(source=cell, bucket=ClaimBucket.NAMESPACE, value=value, cell_id=cell,
                        owner_type=OwnerType.GROUP, owner_id=owner)


def released(claim: ClaimCreated) -> ClaimReleased:
    return ClaimReleased(**claim.model_dump(exclude={"event_id", "occurred_at"}))


def live_rows(settings: Settings) -> dict[str, list[tuple[str, ...]]]:
    with psycopg.connect(settings.libpq_url) as conn:
        return table_rows(conn, LIVE_SCHEMA)


async def test_history_point_in_time_replay_kafka_replay_and_verify(topics: Settings, tmp_path: Path) -> None:
    settings = topics
    first = created("gitlab-org", "cell-1", 1)
    begin = ClaimsRequested(source="cell-1", cell_id="cell-1", owner_type=OwnerType.USER, owner_id=5,
                            claims=[ClaimRef(bucket=ClaimBucket.EMAIL, value="Ada@Example.com"),
                                    ClaimRef(bucket=ClaimBucket.USERNAME, value="ada")])
    phase_one = [
        CellRegistered(source="ops", cell_id="cell-1", address="https://c1.example.com", session_prefix="c1", region="eu"),
        CellRegistered(source="ops", cell_id="cell-2", address="https://c2.example.com", session_prefix="c2", region="us"),
        first, begin, LeaseCommitRequested(source="cell-1", lease_id=begin.lease_id, cell_id="cell-1"),
    ]
    again = created("gitlab-org", "cell-2", 2)
    phase_two = [released(first), again, created("gitlab-com", "cell-2", 3)]

    relay = start(["relay", "--source", settings.libpq_url], settings, tmp_path / "relay.log",
                  TOPOLOGY_RELAY_METRICS_PORT="0", TOPOLOGY_RELAY_POLL_INTERVAL_S="0.2")
    try:
        async with Member(settings):
            await publish(settings, phase_one)
            await wait_for(settings, "SELECT count(*) FROM processed_events", len(phase_one))
            with psycopg.connect(settings.libpq_url) as conn:
                version_one = conn.execute("SELECT version FROM topology_version").fetchone()[0]  # type: ignore[index]
            at_version_one = live_rows(settings)
            await publish(settings, phase_two)
            await wait_for(settings, "SELECT count(*) FROM processed_events", len(phase_one) + len(phase_two))
        await wait_for(settings, "SELECT count(*) FROM topology_outbox WHERE published_at IS NULL", 0)
    finally:
        stop(relay)

    # The timeline of one route: claimed, released, claimed by another cell, in log order.
    engine = create_engine(settings.sqlalchemy_url)
    try:
        async with engine.connect() as conn:
            kind, key = audit_key("ROUTE", "gitlab-org/gitlab", settings.claim_secret)
            history = await key_history(conn, kind, key, settings.claim_secret)
            first_two = await key_history(conn, kind, key, settings.claim_secret, limit=2)
            email_kind, email_key = audit_key("EMAIL", "ada@example.com", settings.claim_secret)
            email_history = await key_history(conn, email_kind, email_key, settings.claim_secret)
    finally:
        await engine.dispose()
    assert [(h.event_type, h.outcome) for h in history] == [
        ("ClaimCreated", "applied"), ("ClaimReleased", "applied"), ("ClaimCreated", "applied")
    ]
    assert [h.payload["cell_id"] for h in history if h.payload] == ["cell-1", "cell-1", "cell-2"]
    assert first_two == history[:2]  # a page is the start of the timeline, cut by the database
    assert [h.decisions[0]["type"] for h in history] == ["ClaimsCommitted", "ClaimsDestroyed", "ClaimsCommitted"]
    assert [h.event_type for h in email_history] == ["ClaimsRequested", "LeaseCommitRequested"]
    assert "ada@example.com" not in str(email_history).lower()  # no audit:pii, no clear e-mail

    # Point in time: the replay to version one equals what the live tables held then.
    await asyncio.to_thread(replay, settings, "pit_one", Cut(until_version=version_one), "archive", True)
    with psycopg.connect(settings.libpq_url) as conn:
        assert table_rows(conn, "pit_one") == at_version_one
    # The whole log, from the archive and from Kafka, equals the live tables.
    await asyncio.to_thread(replay, settings, "from_archive", Cut(), "archive", True)
    await asyncio.to_thread(replay, settings, "from_kafka", Cut(), "kafka", True)
    assert compare(settings, LIVE_SCHEMA, "from_archive").equal
    assert compare(settings, "from_archive", "from_kafka").equal

    # verify agrees with an honest projection, and catches a row changed behind its back.
    assert (await asyncio.to_thread(verify, settings)).equal
    with psycopg.connect(settings.libpq_url) as conn:
        conn.execute("UPDATE claims SET cell_id = 'cell-9' WHERE value = 'gitlab-com'")
    tampered = await asyncio.to_thread(verify, settings)
    assert not tampered.equal
    assert [row[1] for row in tampered.unexpected["claims"]] == ['"gitlab-com"']
    assert [row[2] for row in tampered.missing["claims"]] == ['"cell-2"']
