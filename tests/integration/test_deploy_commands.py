"""deploy/compose.yaml's commands, run with its environment against the test servers
(no Docker engine here): the one-shot jobs succeed, the two projectors share the
partitions, both read APIs get ready and serve what was emitted, the relay takes
the outbox lock, and every line they log is JSON."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH, TEST_API_TOKENS, settings_env
from tests.deploy_files import compose, environment, topology_services
from tests.integration.processes import stop, wait_until
from topology_store.cli.devstack import free_port
from topology_store.runtime.settings import Settings

pytestmark = pytest.mark.integration

VARIABLES = {"TOPOLOGY_CLAIM_HMAC_SECRET": "compose-test-hmac-secret-0123456789", "POSTGRES_PASSWORD": "unused"}


def service_env(service: dict[str, object], settings: Settings, tokens_file: Path) -> dict[str, str]:
    """The compose environment, with the servers, ports and secrets of this test."""
    env = {**settings_env(settings), **environment(service)}  # type: ignore[arg-type]
    env.update({
        "TOPOLOGY_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TOPOLOGY_DATABASE_URL": settings.database_url,
        "TOPOLOGY_API_TOKENS_FILE": str(tokens_file),
        "TOPOLOGY_API_TOKENS": "",
        "TOPOLOGY_API_HOST": "127.0.0.1",
        "TOPOLOGY_METRICS_HOST": "127.0.0.1",
        "TOPOLOGY_API_PORT": str(free_port()),
        "TOPOLOGY_PROJECTOR_METRICS_PORT": str(free_port()),
        "TOPOLOGY_RELAY_METRICS_PORT": str(free_port()),
        # compose says "on" (Apache Kafka); the embedded broker has no idempotent producer (adr/0006).
        "TOPOLOGY_PRODUCER_IDEMPOTENCE": "auto",
    })
    return env


def command(service: dict[str, object], settings: Settings) -> list[str]:
    args = list(service["command"])  # type: ignore[call-overload]
    if "--source" in args:
        args[args.index("--source") + 1] = settings.libpq_url
    return [sys.executable, "-m", "topology_store.cli", *args]


def metrics(port: str) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return ""


def sample(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def test_the_compose_commands_start_and_serve(topics: Settings, tmp_path: Path) -> None:
    settings = topics
    services = topology_services(compose(VARIABLES))
    tokens_file = tmp_path / "api-tokens.json"
    tokens_file.write_text(TEST_API_TOKENS, encoding="utf-8")

    for name in ("migrate", "topics"):
        service = services.pop(name)
        result = subprocess.run(command(service, settings), env=service_env(service, settings, tokens_file),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"

    running: dict[str, tuple[subprocess.Popen[bytes], dict[str, str], Path]] = {}
    try:
        for name, service in services.items():
            env = service_env(service, settings, tokens_file)
            log_path = tmp_path / f"{name}.log"
            with open(log_path, "ab") as log:
                process = subprocess.Popen(command(service, settings), env=env, stdout=log, stderr=subprocess.STDOUT)
            running[name] = (process, env, log_path)

        def alive() -> None:
            for name, (process, _, log_path) in running.items():
                assert process.poll() is None, f"{name} exited: {log_path.read_text()[-2000:]}"

        projectors = [env["TOPOLOGY_PROJECTOR_METRICS_PORT"] for name, (_, env, _) in running.items()
                      if name.startswith("projector")]
        apis = [f"http://127.0.0.1:{env['TOPOLOGY_API_PORT']}" for name, (_, env, _) in running.items()
                if name.startswith("api")]
        assert len(projectors) == 2 and len(apis) == 2
        partitions = 1 + settings.claims_partitions + settings.claim_requests_partitions

        def shared() -> bool:
            alive()
            owned = [sample(metrics(port), "topology_projector_assigned_partitions") for port in projectors]
            return sum(owned) == partitions and all(owned)

        wait_until(shared, timeout_s=60, what="two projectors sharing every partition")

        def ready(url: str) -> bool:
            alive()
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        for url in apis:
            wait_until(lambda url=url: ready(url), timeout_s=30, what=f"{url} ready")
        relay_port = running["relay"][1]["TOPOLOGY_RELAY_METRICS_PORT"]
        wait_until(lambda: sample(metrics(relay_port), "topology_relay_active") == 1, timeout_s=30, what="relay active")

        emitted = subprocess.run(
            [sys.executable, "-m", "topology_store.cli", "emit", json.dumps({
                "type": "CellRegistered", "source": "compose-test", "cell_id": "cell-1",
                "address": "https://cell-1.example.net", "session_prefix": "c1", "region": "eu"})],
            env=running["api-1"][1], capture_output=True, text=True, timeout=60)
        assert emitted.returncode == 0, emitted.stderr

        def served(url: str) -> bool:
            response = httpx.get(f"{url}/v1/cells/cell-1", headers=AUTH, timeout=2)
            return response.status_code == 200

        for url in apis:
            wait_until(lambda url=url: served(url), timeout_s=30, what=f"{url} serves cell-1")
        assert sample(metrics(projectors[0]), "topology_version") + sample(metrics(projectors[1]), "topology_version") >= 1
    finally:
        codes = {name: stop(process, signal.SIGTERM) for name, (process, _, _) in running.items()}
    assert set(codes.values()) == {0}, codes
    for name, (_, _, log_path) in running.items():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            assert json.loads(line)["level"], f"{name}: {line}"
