"""The one retry policy: capped exponential backoff with full jitter, and a sleep that a
stop request cuts short.

Every loop that waits out a broken dependency (the projector's broker and database, the
relay, the read API's listeners) uses these two, so they back off alike and all stop at
once on SIGTERM.
"""

from __future__ import annotations

import asyncio
import random

BASE_S = 0.2
CAP_S = 10.0


def backoff(attempt: int, base: float = BASE_S, cap: float = CAP_S) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): uniform in
    ``[0, min(cap, base * 2**attempt)]``, so many processes do not retry in step."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))


async def sleep_unless(stop: asyncio.Event | None, seconds: float) -> None:
    """Sleep, but wake at once when ``stop`` is set (a SIGTERM must not wait out a backoff)."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
