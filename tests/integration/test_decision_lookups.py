"""Decision lookups of the claims API batch many requests into few queries (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from topology_store.query_api.decisions import LookupBatcher
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.sqlalchemy_url)
    yield engine
    await engine.dispose()


def decided(settings: Settings, ids: list[uuid.UUID]) -> None:
    with psycopg.connect(settings.libpq_url) as conn:
        conn.execute(
            "INSERT INTO processed_events (event_id, event_type, topic, partition, \"offset\", outcome, reason, "
            "version, source, occurred_at) SELECT id, 'ClaimsRequested', 't', 0, n, 'rejected', 'test', 1, 's', now() "
            "FROM unnest(%s::uuid[]) WITH ORDINALITY AS u(id, n)",
            (ids,),
        )


async def test_a_burst_of_lookups_shares_a_few_queries_and_each_gets_its_own_answer(
    settings: Settings, engine: AsyncEngine
) -> None:
    known = [uuid.uuid4() for _ in range(150)]
    unknown = [uuid.uuid4() for _ in range(150)]
    decided(settings, known)
    queries: list[str] = []

    def count(*args: Any) -> None:
        if "processed_events" in args[2]:
            queries.append(args[2])

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    batcher = LookupBatcher(engine)
    asked = known + unknown + known[:10]  # the same id twice in one burst is answered twice
    answers = await asyncio.gather(*(batcher.find(request_id) for request_id in asked))
    for request_id, answer in zip(asked, answers, strict=True):
        if request_id in set(known):
            assert answer is not None and answer.request_id == request_id and answer.reason == "test"
        else:
            assert answer is None
    assert 1 <= len(queries) <= 3, len(queries)


async def test_a_failed_lookup_reaches_every_caller_of_its_burst() -> None:
    closed = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    try:
        batcher = LookupBatcher(closed)
        results = await asyncio.gather(*(batcher.find(uuid.uuid4()) for _ in range(5)), return_exceptions=True)
        assert len(results) == 5 and all(isinstance(result, OSError | Exception) for result in results)
        assert not batcher._queued  # nobody left waiting
    finally:
        await closed.dispose()
