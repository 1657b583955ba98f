"""Helpers for the router sync tests: commit events straight through the real
projection store (as ``test_read_api.commit`` does) and talk to the read API."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx

from tests.conftest import AUTH
from topology_store.core.fold import PositionedEvent
from topology_store.projector.store import PartitionAdvance, ProjectionStore
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import CellRegistered, ClaimBucket, ClaimCreated, ClaimReleased, Event, OwnerType

T = TypeVar("T")


class Projection:
    """Commits batches of events into one database through ``ProjectionStore``, on
    an event loop of its own (one engine for the whole test)."""

    def __init__(self, settings: Settings, topic: str = "t") -> None:
        self.settings = settings
        self.topic = topic
        self.next_offset = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._engine = create_engine(settings.sqlalchemy_url)
        self._store = ProjectionStore(self._engine, settings.claim_secret)
        self._run(self._store.stored_offsets([(topic, 0)]))

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(60)

    def commit(self, events: list[Event]) -> int:
        """Project one batch; the topology version after it."""
        start = self.next_offset
        positioned = [PositionedEvent(e, self.topic, 0, start + n) for n, e in enumerate(events)]
        result = self._run(
            self._store.commit_batch(positioned, [], {(self.topic, 0): PartitionAdvance(start, start + len(events))})
        )
        self.next_offset = start + len(events)
        return result.version

    def close(self) -> None:
        self._run(self._engine.dispose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def cell(n: int) -> CellRegistered:
    return CellRegistered(source="ops", cell_id=f"cell-{n}", address=f"https://c{n}.example.com",
                          session_prefix=f"c{n}-", region="eu")


def claim(path: str, cell_id: str = "cell-1", owner_id: int = 42) -> ClaimCreated:
    return ClaimCreated(source=cell_id, bucket=ClaimBucket.NAMESPACE, value=path, cell_id=cell_id,
                        owner_type=OwnerType.GROUP, owner_id=owner_id)


def release(path: str, cell_id: str = "cell-1", owner_id: int = 42) -> ClaimReleased:
    return ClaimReleased(source=cell_id, bucket=ClaimBucket.NAMESPACE, value=path, cell_id=cell_id,
                         owner_type=OwnerType.GROUP, owner_id=owner_id)


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 10, **params: object) -> httpx.Response:
    return httpx.get(url, headers={**AUTH, **(headers or {})}, params=params or None, timeout=timeout)  # type: ignore[arg-type]


def metric(api: str, line_prefix: str) -> float:
    """The value of the first /metrics sample line starting with ``line_prefix`` (0 if absent)."""
    for line in httpx.get(f"{api}/metrics").text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
