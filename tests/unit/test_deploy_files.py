"""The container image and the compose file, checked without a Docker engine: they
parse, run real `topology` subcommands with valid settings, and wire Prometheus and
Grafana to files that exist (tests/integration/test_deploy_commands.py starts the
commands)."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from tests.deploy_files import DEPLOY, IMAGE, ROOT, compose, environment, topology_services
from topology_store.cli.main import build_parser
from topology_store.runtime.settings import Settings

VARIABLES = {"TOPOLOGY_CLAIM_HMAC_SECRET": "a-long-random-secret-for-the-test", "POSTGRES_PASSWORD": "pw"}


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_compose_needs_the_hmac_secret() -> None:
    with pytest.raises(KeyError, match="TOPOLOGY_CLAIM_HMAC_SECRET"):
        compose({})


def test_compose_runs_kafka_in_kraft_mode_postgres_two_projectors_two_apis_and_a_relay() -> None:
    document = compose(VARIABLES)
    services = document["services"]
    kafka = environment(services["kafka"])
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"] and "broker" in kafka["KAFKA_PROCESS_ROLES"]
    assert not any("ZOOKEEPER" in key for key in kafka)
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert services["postgres"]["image"].startswith("postgres:")
    roles: dict[str, list[str]] = {}
    for name, service in topology_services(document).items():
        roles.setdefault(service["command"][0], []).append(name)
    assert len(roles["project"]) == 2 and len(roles["serve"]) == 2 and len(roles["relay"]) == 1
    assert roles["migrate"] == ["migrate"] and roles["topics"] == ["topics"]
    for name in roles["project"] + roles["serve"] + roles["relay"]:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    assert services["relay"]["command"][1:] == [
        "--source", environment(services["relay"])["TOPOLOGY_DATABASE_URL"]]


def test_every_command_is_a_topology_subcommand_with_valid_settings() -> None:
    parser = build_parser()
    services = topology_services(compose(VARIABLES))
    assert services
    for name, service in services.items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        args = parser.parse_args(service["command"])  # argparse exits on an unknown command or option
        assert callable(args.run), name
        env = environment(service)
        for key in env:
            if key.startswith("TOPOLOGY_"):
                assert key.removeprefix("TOPOLOGY_").lower() in Settings.model_fields, f"{name}: unknown {key}"
        settings = Settings(**{k.removeprefix("TOPOLOGY_").lower(): v for k, v in env.items() if k.startswith("TOPOLOGY_")})
        assert settings.kafka_bootstrap == "kafka:9092" and settings.database_url.endswith("@postgres:5432/topology")
        assert settings.metrics_host == "0.0.0.0" and settings.api_host == "0.0.0.0"
        assert settings.log_format == "json"
        assert settings.claim_hmac_secret.get_secret_value() == VARIABLES["TOPOLOGY_CLAIM_HMAC_SECRET"]


def test_the_image_installs_the_project_and_runs_topology() -> None:
    instructions = dockerfile()
    assert [arguments for op, arguments in instructions if op == "ENTRYPOINT"] == ['["topology"]']
    folders = {link.name for link in (ROOT / "src" / "topology_store").iterdir() if link.is_symlink()}
    copied = {arguments.split()[0] for op, arguments in instructions if op == "COPY" and "--from" not in arguments}
    assert folders | {"src"} <= copied
    for source in copied:
        assert (ROOT / source).exists(), source
    env_line = next(arguments for op, arguments in instructions if op == "ENV")
    for key in re.findall(r"(TOPOLOGY_[A-Z_]+)=", env_line):
        assert key.removeprefix("TOPOLOGY_").lower() in Settings.model_fields, key
    exposed = {int(port) for op, arguments in instructions if op == "EXPOSE" for port in arguments.split()}
    defaults = Settings()
    assert {defaults.api_port, defaults.projector_metrics_port, defaults.relay_metrics_port} <= exposed
    assert any(op == "USER" and arguments != "root" for op, arguments in instructions)
    assert "tracing" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_prometheus_scrapes_every_topology_process_on_its_metrics_port() -> None:
    document = compose(VARIABLES)
    services = topology_services(document)
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    targets = {target for job in config["scrape_configs"] for static in job["static_configs"]
               for target in static["targets"]}
    defaults = Settings()
    port_of = {"project": defaults.projector_metrics_port, "serve": defaults.api_port,
               "relay": defaults.relay_metrics_port}
    expected = {f"{name}:{port_of[service['command'][0]]}" for name, service in services.items()
                if service["command"][0] in port_of}
    assert targets == expected
    prometheus = document["services"]["prometheus"]
    mounts = dict(volume.split(":")[:2] for volume in prometheus["volumes"] if volume.startswith("."))
    assert mounts["../ops/prometheus/alerts.yml"] in config["rule_files"]


def test_every_mounted_file_exists_and_grafana_is_provisioned() -> None:
    document = compose(VARIABLES)
    for name, service in document["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    grafana = document["services"]["grafana"]
    provisioning = [volume.split(":")[0] for volume in grafana["volumes"] if "provisioning" in volume]
    assert len(provisioning) == 2
    for source in provisioning:
        assert yaml.safe_load((DEPLOY / source).read_text(encoding="utf-8"))["apiVersion"] == 1
    dashboards = yaml.safe_load((DEPLOY / "grafana" / "dashboards.yml").read_text())["providers"][0]["options"]["path"]
    assert any(volume == f"../ops/grafana:{dashboards}:ro" for volume in grafana["volumes"])
    assert document["secrets"]["api-tokens.json"]["file"] == "./secrets/api-tokens.json"
    assert all(IMAGE != service.get("image") or service.get("secrets") for service in document["services"].values())
