"""`topology up --demo`, the one-command dev stack, as a user runs it: embedded broker and
PostgreSQL, projector, read API and relay, demo data, then Ctrl-C, SIGTERM or kill -9.

Whether anything is left is asked of the machine, not of the process tree: the embedded
PostgreSQL's postmaster is no descendant of `topology up` (pg_ctl starts it in a session
of its own), so every check also scans /proc for processes whose command line or
environment names the data directory, and for listeners on the stack's ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.processes import wait_until
from topology_store.cli.devstack import free_port, port_holders

pytestmark = pytest.mark.integration

STARTED = "Ctrl-C stops everything"


def start_up(data_dir: Path, port: int, log_path: Path, demo: bool = False) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPOLOGY_")}  # embedded servers, not the tests'
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "topology_store.cli", "up", *(["--demo"] if demo else []),
             "--data-dir", str(data_dir), "--api-port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: a terminal
        )


def wait_started(up: subprocess.Popen[bytes], log_path: Path) -> int:
    """The broker's port, once the stack says it is up."""
    wait_until(lambda: STARTED in log_path.read_text() or up.poll() is not None, timeout_s=150, interval_s=0.5,
               what="the stack to start")
    text = log_path.read_text()
    assert STARTED in text, text[-3000:]
    found = re.search(r"embedded Tansu broker \(memory storage\) at 127\.0\.0\.1:(\d+)", text)
    assert found is not None, text[-3000:]
    return int(found.group(1))


def stack_processes(data_dir: Path, ports: tuple[int, ...]) -> list[str]:
    """Every live process of a stack on ``data_dir``: its command line or environment
    names the data directory (the postmaster, the relay, the projector and the read API,
    whose database URL points there), or it listens on one of ``ports``."""
    marker = str(data_dir.resolve()).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or not _alive(int(entry.name)):
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            named = marker in command or marker in (entry / "environ").read_bytes()
        except OSError:
            continue
        if named:
            found.append(f"pid {entry.name}: {command.replace(bytes(1), b' ')[:150].decode(errors='replace')}")
    for port in ports:
        found.extend(f"port {port}: {holder}" for holder in port_holders(port))
    return found


def assert_nothing_left(data_dir: Path, ports: tuple[int, ...], descendants: list[int], how: str) -> None:
    # What the stack stops itself is gone when it exits; what its watchdog stops, soon after.
    leftovers = wait_until(lambda: not stack_processes(data_dir, ports) and not [p for p in descendants if _alive(p)],
                           timeout_s=60, interval_s=0.5, what=f"every server gone after {how}")
    assert leftovers


def test_up_with_demo_data_serves_a_snapshot_and_ctrl_c_stops_everything_on_a_first_and_a_later_run(
    tmp_path: Path,
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    for run in (1, 2):  # the second run finds the data directory of the first (PostgreSQL's PG_VERSION)
        log_path = tmp_path / f"up-{run}.log"
        up = start_up(data_dir, port, log_path, demo=True)
        try:
            broker_port = wait_started(up, log_path)
            token_line = re.search(r"dev token\s+(\S+)", log_path.read_text())
            assert token_line is not None
            text = log_path.read_text()
            assert "demo:" in text and "3000 namespaces" in text, text[-2000:]
            snapshot = httpx.get(f"http://127.0.0.1:{port}/v1/snapshot",
                                 headers={"Authorization": f"Bearer {token_line.group(1)}"}, timeout=10)
            assert snapshot.status_code == 200 and len(snapshot.json()["namespaces"]) == 3000
            assert httpx.get(f"http://127.0.0.1:{port}/v1/snapshot", timeout=10).status_code == 401
            descendants = _descendants(up.pid)
            assert len(descendants) >= 4  # broker, projector, read API, relay, watchdog
            running = stack_processes(data_dir, (broker_port, port))
            assert any("postgres -D" in line for line in running), running  # what the scan must see
            os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
            assert up.wait(60) == 0
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()
        text = log_path.read_text()
        assert text.rstrip().endswith("topology up: stopped"), text[-2000:]
        assert "Traceback" not in text, text[-4000:]
        assert "watchdog" not in text, text[-2000:]  # the stack stopped everything itself
        assert_nothing_left(data_dir, (broker_port, port), descendants, f"Ctrl-C on run {run}")


def test_sigterm_and_kill_9_leave_no_server_running_and_the_next_run_gets_the_same_ports(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data"

    def run(n: int) -> tuple[subprocess.Popen[bytes], Path, int, list[int]]:
        log_path = tmp_path / f"up-{n}.log"
        up = start_up(data_dir, port, log_path)
        broker_port = wait_started(up, log_path)
        return up, log_path, broker_port, _descendants(up.pid)

    up, log_path, first_port, descendants = run(1)
    try:
        os.kill(up.pid, signal.SIGTERM)  # the process alone, as a service manager sends it
        assert up.wait(60) == 0
        assert log_path.read_text().rstrip().endswith("topology up: stopped")
        assert_nothing_left(data_dir, (first_port, port), descendants, "SIGTERM")

        up, log_path, broker_port, descendants = run(2)
        same_port(first_port, broker_port, log_path)  # nothing of ours held it
        os.kill(up.pid, signal.SIGKILL)  # no teardown at all: the watchdog's work
        up.wait(10)
        assert_nothing_left(data_dir, (broker_port, port), descendants, "kill -9")
        assert "stopped PostgreSQL" in log_path.read_text()  # said by the watchdog

        # The watchdog killed as well (kill -9 to both): servers survive until the next run.
        up, log_path, broker_port, descendants = run(3)
        watchdogs = [pid for pid in descendants if b"cli.watchdog" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(watchdogs) == 1
        os.kill(watchdogs[0], signal.SIGKILL)
        os.kill(up.pid, signal.SIGKILL)
        up.wait(10)
        assert wait_until(lambda: any("postgres -D" in line for line in stack_processes(data_dir, ())),
                          timeout_s=5, what="the orphaned postmaster")

        up, log_path, broker_port, descendants = run(4)
        text = log_path.read_text()
        assert "left running by an earlier run" in text and "stopped PostgreSQL" in text, text[-3000:]
        same_port(first_port, broker_port, log_path)  # not quietly another port
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(60) == 0
        assert_nothing_left(data_dir, (broker_port, port), descendants, "Ctrl-C after reaping")
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        for line in stack_processes(data_dir, ()):  # never leave a server to the next test
            os.kill(int(line.split()[1].rstrip(":")), signal.SIGKILL)


def test_a_taken_broker_port_is_named_with_its_holder_not_quietly_replaced(capsys: pytest.CaptureFixture[str]) -> None:
    from topology_store.cli.up import _broker_port

    with socket.socket() as holder:
        try:
            holder.bind(("127.0.0.1", 9092))
        except OSError:
            pytest.skip("port 9092 is in use here already")
        holder.listen()
        assert f"pid {os.getpid()} " in port_holders(9092)[0]
        port = _broker_port()
    assert port != 9092
    said = capsys.readouterr().out
    assert f"port 9092 is taken by pid {os.getpid()}" in said and f"listens on {port} instead" in said


def same_port(first: int, now: int, log_path: Path) -> None:
    """A run gets 9092 back once the earlier servers are gone; when something else holds
    9092 (another broker on this machine), it says who, and takes a free port."""
    if first == 9092:
        assert now == 9092, log_path.read_text()[-3000:]
    else:
        assert "port 9092 is taken by" in log_path.read_text()


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
