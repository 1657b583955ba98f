"""The dev stack's watchdog: the embedded servers and the services of ``topology up``
end with it, however it ends (adr/0006).

``topology up`` starts this process first, in a session of its own (a Ctrl-C to the
terminal's process group does not reach it), and keeps the write end of its standard
input. It tells the watchdog, one line each, what to end should it die:

- ``process <pid> <start ticks>``: a child (the projector, the read API, the relay, the
  Tansu broker), ended with SIGTERM, then SIGKILL;
- ``postgres <data directory>``: the embedded PostgreSQL, stopped by its postmaster.pid;
- ``done``: ``topology up`` stopped everything itself; nothing left to do.

The kernel closes the pipe when ``topology up`` exits, whatever ended it (a return,
SIGTERM, SIGKILL, a crash): end of input without ``done`` means it died, and the
watchdog ends what it was told about, services first, then the broker and the
database, as ``topology up`` itself would.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from topology_store.cli.devstack import end_process, stop_postmaster


def _say(message: str) -> None:
    print(f"topology up (watchdog): {message}", file=sys.stderr, flush=True)


def watch(lines: list[str] | None = None) -> int:
    """Read the instructions until end of input, then act on them unless told ``done``."""
    processes: list[tuple[int, int | None]] = []
    databases: list[Path] = []
    done = False
    for line in lines if lines is not None else sys.stdin:
        words = line.split()
        if words[:1] == ["process"] and len(words) == 3:
            processes.append((int(words[1]), None if words[2] == "None" else int(words[2])))
        elif words[:1] == ["postgres"] and len(words) == 2:
            databases.append(Path(words[1]))
        elif words == ["done"]:
            done = True
    if done:
        return 0
    _say("topology up ended without stopping its servers; stopping them")
    # Services before the broker (told first) and the database, which they still talk to.
    for pid, ticks in reversed(processes):
        if end_process(pid, ticks):
            _say(f"stopped pid {pid}")
    for pgdata in databases:
        stopped = stop_postmaster(pgdata)
        if stopped is not None:
            _say(f"stopped PostgreSQL (pid {stopped}, data in {pgdata})")
    return 0


def main() -> int:
    # Neither a Ctrl-C nor a hang-up of the terminal may end it before its work is done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return watch()


if __name__ == "__main__":
    raise SystemExit(main())
