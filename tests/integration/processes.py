"""Running ``topology`` commands as real child processes, and waiting on real state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import psycopg

from tests.conftest import settings_env
from topology_store.cli.devstack import free_port
from topology_store.runtime.settings import Settings

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout_s: float = 60, interval_s: float = 0.05, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def scalar(settings: Settings, query: str) -> object:
    with psycopg.connect(settings.libpq_url) as conn:
        row = conn.execute(query).fetchone()
        assert row is not None
        return row[0]


def start(command: list[str], settings: Settings, log_path: Path, **extra_env: str) -> subprocess.Popen[bytes]:
    env = {**settings_env(settings), **extra_env}
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen(
        [sys.executable, "-m", "topology_store.cli", *command], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd()
    )


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@contextmanager
def read_api(settings: Settings, log_path: Path, ready_timeout_s: float = 30) -> Iterator[str]:
    port = free_port()
    process = start(["serve"], settings, log_path, TOPOLOGY_API_PORT=str(port))
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"read API exited: {log_path.read_text()[-2000:]}")
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout_s=ready_timeout_s, what="read API ready")
        yield url
    finally:
        stop(process)
