"""`topology up --demo`, the one-command dev stack, as a user runs it: embedded broker and
PostgreSQL, projector, read API and relay, demo data, then Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.processes import wait_until
from topology_store.cli.devstack import free_port

pytestmark = pytest.mark.integration


def test_up_with_demo_data_serves_a_snapshot_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPOLOGY_")}  # embedded servers, not the tests'
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "topology_store.cli", "up", "--demo", "--data-dir", str(tmp_path / "data"),
             "--api-port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: a terminal
        )
    try:
        token_line = wait_until(lambda: re.search(r"dev token\s+(\S+)", log_path.read_text()), timeout_s=150,
                                interval_s=0.5, what="the stack to print its dev token")
        text = log_path.read_text()
        assert "demo:" in text and "3000 namespaces" in text, text[-2000:]
        snapshot = httpx.get(f"http://127.0.0.1:{port}/v1/snapshot",
                             headers={"Authorization": f"Bearer {token_line.group(1)}"}, timeout=10)
        assert snapshot.status_code == 200 and len(snapshot.json()["namespaces"]) == 3000
        assert httpx.get(f"http://127.0.0.1:{port}/v1/snapshot", timeout=10).status_code == 401
        descendants = _descendants(up.pid)
        assert len(descendants) >= 4  # broker, projector, read API, relay (and PostgreSQL)
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    text = log_path.read_text()
    assert text.rstrip().endswith("topology up: stopped"), text[-2000:]
    assert "Traceback" not in text, text[-4000:]
    leftovers = [pid for pid in descendants if _alive(pid)]
    assert not leftovers, f"still running after Ctrl-C: {leftovers}"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
