"""Fixtures: real servers (chosen in ``tests/servers.py``), and per-test isolation —
a database of its own (copied from a migrated template) and topics and a consumer
group of their own — so tests run in any order.

Brokers (adr/0016): ``servers.broker`` is the session's (Apache Kafka by default where it
can run, ``TOPOLOGY_TEST_BROKER=apache|tansu`` to choose); ``other_broker`` the other kind;
``each_broker`` runs a test once per kind; ``own_broker`` is a private broker of the
session's kind that a test may freeze. Tests marked ``both_brokers`` exercise what differs
between brokers (group joins, rebalances, lag, crashes, outages): CI runs them a second
time with ``TOPOLOGY_TEST_BROKER=tansu`` (``.ci/run``, docs/testing.md)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pydantic import SecretStr

from tests.servers import (
    BROKER_ENV,
    KINDS,
    Broker,
    PrivateBroker,
    ServerChoiceError,
    Servers,
    private_broker,
    start_other_broker,
    start_servers,
)
from topology_store.projector.migrate import upgrade_to_head
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "both_brokers: exercises what differs between brokers (group joins, rebalances, lag, crashes, "
        "outages); CI runs these again on the embedded Tansu broker (TOPOLOGY_TEST_BROKER=tansu -m both_brokers)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    chosen = os.environ.get(BROKER_ENV) or "unset: the first of env, Docker, the local JVM, Tansu"
    return f"broker: {BROKER_ENV}={chosen} (tests/servers.py)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("TOPOLOGY_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak/benchmark run: set TOPOLOGY_SOAK=1")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


# Read API bearer tokens of every test's settings: one router token, one without scopes.
TEST_TOKEN = "test-router-token-0123456789"
TEST_TOKEN_NO_SCOPE = "test-scopeless-token-0123456789"
TEST_CLAIMS_TOKEN = "test-claims-token-0123456789"
TEST_API_TOKENS = (
    f'{{"{TEST_TOKEN}": ["snapshot:read"], "{TEST_TOKEN_NO_SCOPE}": [], '
    f'"{TEST_CLAIMS_TOKEN}": ["claims:read", "claims:write", "audit:read"]}}'
)
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
CLAIMS_AUTH = {"Authorization": f"Bearer {TEST_CLAIMS_TOKEN}"}


def _say(config: pytest.Config, line: str) -> None:
    """A line on the terminal at once, whatever the output capturing."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(line)


@pytest.fixture(scope="session")
def servers(request: pytest.FixtureRequest) -> Iterator[Servers]:
    with ExitStack() as stack:
        try:
            chosen = start_servers(stack)
        except ServerChoiceError as exc:
            pytest.exit(f"integration servers: {exc}", returncode=3)
        _say(request.config, f"integration servers: {chosen.description}")
        yield chosen


@pytest.fixture(scope="session")
def other_broker(request: pytest.FixtureRequest, servers: Servers) -> Iterator[Broker]:
    """A broker of the other kind than the session's (Tansu when the session runs on Apache
    Kafka, and the other way round); the test is skipped when it cannot run here."""
    with ExitStack() as stack:
        try:
            broker = start_other_broker(stack, servers)
        except ServerChoiceError as exc:
            pytest.skip(f"no second broker: {exc}")
        _say(request.config, f"other broker: {broker.description}")
        yield broker


@pytest.fixture(params=KINDS)
def each_broker(request: pytest.FixtureRequest, servers: Servers) -> Broker:
    """The test once on Apache Kafka and once on Tansu (the session's broker, or ``other_broker``)."""
    if servers.broker.kind == request.param:
        return servers.broker
    broker: Broker = request.getfixturevalue("other_broker")
    if broker.kind != request.param:
        pytest.skip(f"no {request.param} broker here")
    return broker


@pytest.fixture
def own_broker(servers: Servers, tmp_path: Path) -> Iterator[PrivateBroker]:
    """A broker for this test alone, of the session's kind, so that it can be frozen with
    SIGSTOP (``own_broker.signal``) or stopped; thawed and stopped afterwards."""
    kafka = private_broker(servers.broker.kind, tmp_path / "own-broker.log")
    yield kafka
    kafka.stop()


def _database_url(servers: Servers, name: str) -> str:
    return make_conninfo(servers.postgres_url, dbname=name)


def _as_url(conninfo_or_url: str) -> str:
    """Settings want a URL; build one from the conninfo pieces."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(conninfo_or_url)
    user = params.get("user", "postgres")
    password = params.get("password", "")
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    auth = f"{user}:{password}@" if password else f"{user}@"
    if host.startswith("/"):
        return f"postgresql://{auth}/{params['dbname']}?host={host}&port={port}"
    return f"postgresql://{auth}{host}:{port}/{params['dbname']}"


@pytest.fixture(scope="session")
def template_database(servers: Servers) -> Iterator[str]:
    """A database migrated once; every test copies it (CREATE DATABASE ... TEMPLATE)."""
    name = f"topology_template_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    upgrade_to_head(Settings(database_url=_as_url(_database_url(servers, name))).sqlalchemy_url)
    yield name
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def copy_template(servers: Servers, template_database: str) -> str:
    """A new migrated, empty database (a copy of the template); its name."""
    name = f"topology_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template_database)))
    return name


def drop_databases(servers: Servers, names: list[str]) -> None:
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def database_url_of(servers: Servers, name: str) -> str:
    return _as_url(_database_url(servers, name))


@pytest.fixture
def new_database(servers: Servers, template_database: str) -> Iterator[Callable[[], str]]:
    """Makes migrated, empty databases (copies of the template); drops them after the test."""
    created: list[str] = []

    def make() -> str:
        created.append(copy_template(servers, template_database))
        return database_url_of(servers, created[-1])

    yield make
    drop_databases(servers, created)


@pytest.fixture
def database_url(new_database: Callable[[], str]) -> str:
    return new_database()


@pytest.fixture
def settings(servers: Servers, database_url: str) -> Settings:
    """Settings naming this test's own database, topics and consumer group."""
    return make_settings(servers, database_url)


def make_settings(servers: Servers, database_url: str) -> Settings:
    """Settings naming ``database_url`` and topics and a consumer group of their own (also for
    a module's shared stack)."""
    run = uuid.uuid4().hex[:10]
    return Settings(
        kafka_bootstrap=servers.kafka_bootstrap,
        database_url=database_url,
        cells_topic=f"test-{run}.cells",
        claims_topic=f"test-{run}.claims",
        claim_requests_topic=f"test-{run}.claim-requests",
        claim_decisions_topic=f"test-{run}.claim-decisions",
        claims_partitions=4,
        consumer_group=f"test-{run}",
        projector_metrics_port=0,
        batch_wait_ms=50,
        snapshot_poll_interval_s=1.0,
        api_tokens=TEST_API_TOKENS,
    )


@pytest.fixture
async def topics(settings: Settings) -> AsyncIterator[Settings]:
    """``settings`` with its topics created on the broker."""
    await ensure_topics(settings)
    yield settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process (``topology ...``) use ``settings``."""
    def plain(value: object) -> str:
        return value.get_secret_value() if isinstance(value, SecretStr) else str(value)

    values = settings.model_dump()
    return {**os.environ, **{f"TOPOLOGY_{key.upper()}": plain(value) for key, value in values.items() if value is not None}}
