"""The garbage collector of a long-running server process: the heap built at startup
moved out of its view (issue 13, adr/0018).

CPython collects cycles in generations; a full collection walks every object the
process holds, and a server holds a large, unchanging heap from startup (every module,
FastAPI's routes and pydantic's validators: about 120,000 objects in the API). Walking
it took 60-230 ms, measured, on this project's two-core machine: a stall of the whole
event loop, in which even a 429 that needs no work waits (the claim harness's slowest
429s). ``gc.freeze()`` moves what exists now into a permanent generation the collector
never walks; what the process allocates later is collected as before. Process-wide: call
it once, from a command's entry point, when startup is done.
"""

from __future__ import annotations

import gc


def freeze_startup_heap(young_threshold: int | None = None) -> None:
    """Collect once, then move every object alive into the permanent generation;
    ``young_threshold``: also collect the young generation only every that many
    allocations (None: CPython's default)."""
    gc.collect()
    gc.freeze()
    if young_threshold is not None:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(young_threshold, older, oldest)
