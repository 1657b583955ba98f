"""The router client and ``topology router`` against the real read API (uvicorn
child processes) on a real PostgreSQL (adr/0009)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import TEST_TOKEN
from tests.integration.processes import read_api, start, stop, wait_until
from tests.integration.routing import Projection, cell, claim, get, metric, release
from topology_store.cli.devstack import free_port
from topology_store.projector.changelog import Retention, configure_retention
from topology_store.router.client import RouterClient, load_last_known_good
from topology_store.runtime.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def projection(settings: Settings) -> Iterator[Projection]:
    projection = Projection(settings)
    projection.commit([cell(1), cell(2), claim("gitlab-org"), claim("gitlab-com", "cell-2", 7)])
    yield projection
    projection.close()


def serve_on(settings: Settings, port: int, log: Path) -> Any:
    """``topology serve`` on a given port (so a router can find it again after a restart)."""
    process = start(["serve"], settings, log, TOPOLOGY_API_PORT=str(port))
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, log.read_text()[-2000:]
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout_s=30, what="read API ready")
    return process


def sidecar(settings: Settings, api_url: str, state_file: Path, log: Path, **extra_env: str) -> tuple[Any, str]:
    port = free_port()
    process = start(["router", "--api", api_url, "--state-file", str(state_file), "--port", str(port)],
                    settings, log, **{"TOPOLOGY_ROUTER_TOKEN": TEST_TOKEN, "TOPOLOGY_ROUTER_WAIT_S": "5", **extra_env})
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, log.read_text()[-2000:]
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout_s=30, what="router sidecar ready")
    return process, url


def classify(url: str, value: str) -> httpx.Response:
    return httpx.get(f"{url}/classify", params={"type": "ROUTE", "value": value})


def test_the_sidecar_follows_by_long_poll_keeps_a_disk_copy_and_starts_from_it_with_the_api_down(
    settings: Settings, projection: Projection, tmp_path: Path
) -> None:
    state_file = tmp_path / "state" / "router.json"
    api_port = free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    started: list[Any] = []  # every child, stopped whatever happens
    try:
        api = serve_on(settings, api_port, tmp_path / "api.log")
        started.append(api)
        router, local = sidecar(settings, api_url, state_file, tmp_path / "router.log")
        started.append(router)
        found = classify(local, "gitlab-org/gitlab")
        assert found.status_code == 200 and found.json()["cell"]["cell_id"] == "cell-1"
        assert found.json()["cell"]["address"] == "https://c1.example.com"
        assert classify(local, "nobody/x").status_code == 404
        committed = time.monotonic()
        assert projection.commit([claim("new-group", "cell-2", 7), release("gitlab-org")]) == 2
        wait_until(lambda: classify(local, "new-group").status_code == 200, timeout_s=5, interval_s=0.01,
                   what="the router holds version 2")
        assert time.monotonic() - committed < 3  # a long-poll answer, not a periodic fetch
        assert classify(local, "gitlab-org").status_code == 404
        metrics = httpx.get(f"{local}/metrics").text
        assert "topology_router_version 2.0" in metrics and "topology_router_server_version 2.0" in metrics
        assert "topology_router_lag_versions 0.0" in metrics
        assert metric(local, 'topology_router_syncs_total{result="delta"}') >= 1
        assert metric(local, 'topology_router_syncs_total{result="full"}') == 1
        assert stop(router) == 0
        # Stopping wrote the newest table; atomically, so no temporary file is left behind.
        on_disk = load_last_known_good(state_file)
        assert on_disk is not None and on_disk.version == 2 and "new-group" in on_disk.namespaces
        assert [p.name for p in state_file.parent.iterdir()] == ["router.json"]

        stop(api)  # the API is down: the router starts from its disk copy and routes
        router, local = sidecar(settings, api_url, state_file, tmp_path / "router-2.log")
        started.append(router)
        assert httpx.get(f"{local}/readyz").json()["version"] == 2
        assert classify(local, "new-group").json()["cell"]["cell_id"] == "cell-2"
        assert metric(local, "topology_router_started_from_disk") == 1
        wait_until(lambda: metric(local, 'topology_router_errors_total{kind="unavailable"}') >= 1, timeout_s=10,
                   what="a failed sync")
        # The API comes back (same address); the router catches up by delta from version 2.
        projection.commit([claim("while-away")])
        started.append(serve_on(settings, api_port, tmp_path / "api-2.log"))
        wait_until(lambda: classify(local, "while-away").status_code == 200, timeout_s=15,
                   what="the router catches up")
        assert metric(local, 'topology_router_syncs_total{result="full"}') == 0
        assert metric(local, 'topology_router_syncs_total{result="delta"}') >= 1
        assert stop(router) == 0
    finally:
        for process in started:
            stop(process)
    assert TEST_TOKEN not in (tmp_path / "router.log").read_text() + (tmp_path / "router-2.log").read_text()


async def test_the_client_falls_back_to_a_full_snapshot_on_410_and_on_an_inconsistent_delta(
    settings: Settings, projection: Projection, tmp_path: Path
) -> None:
    with read_api(settings, tmp_path / "api.log") as api:
        client = RouterClient([api], TEST_TOKEN, state_file=tmp_path / "router.json", wait_s=3)
        try:
            assert await client.sync_once() == "full" and client.version == 1
            assert client.classify("ROUTE", "gitlab-com/www")["cell"]["cell_id"] == "cell-2"  # type: ignore[index]

            configure_retention(Retention(keep_versions=1, keep_seconds=0))
            try:
                for n in range(3):
                    projection.commit([claim(f"pruned-{n}")])  # versions 2..4; only 4 stays in the log
            finally:
                configure_retention(None)
            assert await client.sync_once() == "gone"
            assert await client.sync_once() == "full" and client.version == 4
            assert metric_value(client, 'topology_router_full_fallbacks_total{reason="gone"}') == 1

            # A table that silently lost a row: the next delta does not check out.
            assert client.table is not None
            del client.table.namespaces["pruned-0"]
            projection.commit([claim("after-damage")])
            assert await client.sync_once() == "inconsistent" and client.version == 4  # nothing applied
            assert await client.sync_once() == "full" and client.version == 5
            server = get(f"{api}/v1/snapshot").json()
            assert client.table.namespaces == server["namespaces"]
            assert metric_value(client, 'topology_router_full_fallbacks_total{reason="inconsistent"}') == 1

            # Up to date: a long-poll with nothing new is a 304 after the wait.
            started = time.monotonic()
            assert await client.sync_once(wait_s=1) == "not_modified"
            assert 0.9 < time.monotonic() - started < 3
            assert client.lag_versions == 0
        finally:
            await client.aclose()


async def test_the_client_never_goes_back_when_a_balanced_api_process_lags(
    settings: Settings, new_database: Any, tmp_path: Path
) -> None:
    replica_settings = settings.model_copy(update={"database_url": new_database()})
    primary, replica = Projection(settings), Projection(replica_settings)
    try:
        for projection in (primary, replica):
            projection.commit([cell(1), claim("gitlab-org")])
        primary.commit([claim("only-on-primary")])
        with read_api(settings, tmp_path / "a.log") as a, read_api(replica_settings, tmp_path / "b.log") as b:
            client = RouterClient([a, b], TEST_TOKEN, wait_s=0.2)  # round robin, as a balancer would
            try:
                assert await client.sync_once() == "full" and client.version == 2  # from a
                assert await client.sync_once() == "not_modified" and client.version == 2  # b is at 1
                client.need_full = True  # even a full refetch from b must not go back
                outcomes = [await client.sync_once() for _ in range(2)]
                assert client.version == 2 and "not_modified" in outcomes
                assert client.classify("ROUTE", "only-on-primary") is not None
            finally:
                await client.aclose()
    finally:
        primary.close()
        replica.close()


def test_stopping_the_api_releases_its_long_polls_at_once(
    settings: Settings, projection: Projection, tmp_path: Path
) -> None:
    port = free_port()
    api = serve_on(settings, port, tmp_path / "api.log")
    answers: list[httpx.Response] = []
    poll = threading.Thread(
        target=lambda: answers.append(get(f"http://127.0.0.1:{port}/v1/snapshot", since=1, wait="30s", timeout=40)))
    try:
        poll.start()
        wait_until(lambda: metric(f"http://127.0.0.1:{port}", "topology_api_long_polls_waiting") == 1, timeout_s=5,
                   what="the long-poll waiting")
    except BaseException:
        stop(api)
        raise
    started = time.monotonic()
    assert stop(api) == 0
    poll.join(10)
    assert time.monotonic() - started < 5
    assert answers and answers[0].status_code == 304 and answers[0].headers["X-Topology-Version"] == "1"


def test_the_sidecar_turns_stale_while_the_api_it_follows_is_frozen_and_ready_once_it_answers_again(
    settings: Settings, projection: Projection, tmp_path: Path
) -> None:
    api_port = free_port()
    started: list[Any] = []
    try:
        api = serve_on(settings, api_port, tmp_path / "api.log")
        started.append(api)
        router, local = sidecar(settings, f"http://127.0.0.1:{api_port}", tmp_path / "router.json",
                                tmp_path / "router.log", TOPOLOGY_ROUTER_WAIT_S="1", TOPOLOGY_ROUTER_STALE_AFTER_S="4")
        started.append(router)
        ready = httpx.get(f"{local}/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert ready.json()["last_heard_s"] < 4 and ready.json()["stale_after_s"] == 4

        api.send_signal(signal.SIGSTOP)  # frozen: connections are accepted by the kernel, nothing answers
        try:
            frozen_at = time.monotonic()
            stale = wait_until(lambda: (r := httpx.get(f"{local}/readyz")).status_code == 503 and r, timeout_s=20,
                               interval_s=0.2, what="readiness to turn stale")
            assert time.monotonic() - frozen_at >= 4 - 1  # not before the bound (1 s: the last long-poll)
            document = stale.json()
            assert document["status"] == "stale" and document["last_heard_s"] > 4
            assert document["lag_versions"] == 0 and document["version"] == 1  # what fooled the old readiness
            assert "no answer from the read API" in document["message"]
            assert classify(local, "gitlab-org/x").status_code == 200  # still routes from the table held
            assert metric(local, "topology_router_api_silent_seconds") > 4
        finally:
            api.send_signal(signal.SIGCONT)
        wait_until(lambda: httpx.get(f"{local}/readyz").status_code == 200, timeout_s=30, interval_s=0.2,
                   what="ready again once the API answers")
        assert httpx.get(f"{local}/readyz").json()["last_heard_s"] < 4
    finally:
        for process in started:
            stop(process)


def test_a_stale_bound_within_the_long_poll_wait_is_refused() -> None:
    with pytest.raises(ValueError, match="TOPOLOGY_ROUTER_STALE_AFTER_S must exceed TOPOLOGY_ROUTER_WAIT_S"):
        Settings(router_wait_s=30, router_stale_after_s=30)
    with pytest.raises(ValueError, match="must exceed the long-poll wait"):
        RouterClient(["http://127.0.0.1:9"], TEST_TOKEN, wait_s=5, stale_after_s=2)


def test_a_damaged_disk_copy_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "router.json"
    document = {"version": 3, "committed_at": "2026-01-01T00:00:00+00:00", "namespace_count": 1,
                "namespace_digest": 1, "cells": [], "namespaces": {"a": "cell-1"}}
    path.write_bytes(orjson.dumps(document))
    assert load_last_known_good(path) is None  # the digest does not match
    path.write_bytes(b'{"version": 3, "namesp')
    assert load_last_known_good(path) is None
    client = RouterClient(["http://127.0.0.1:9"], TEST_TOKEN, state_file=path)
    assert not client.start_from_disk() and client.table is None and TEST_TOKEN not in repr(client)


def metric_value(client: RouterClient, prefix: str) -> float:
    from prometheus_client import generate_latest

    for line in generate_latest(client.metrics.registry).decode().splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0

