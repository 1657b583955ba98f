"""The servers a claim harness measures, as ``topology up`` runs them (adr/0021 for the gRPC
door): a fresh broker (``--broker``, bench/__init__.py), a fresh scratch database on the local
PostgreSQL, its migrations and topics, then ``topology project``, ``topology serve`` and
``topology relay`` as child processes, every setting at its default but the addresses and
what the harness names. Shared by the claim harnesses: the HTTP one of issue 13
(bench/claims_latency.py, whose setup moved here) and the gRPC one of issue 12
(bench/grpc_claims.py); both count CPU with :class:`bench.claims_latency.CpuMeter`.

Imports of the servers stay inside the function: importing this module starts nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from bench import RunningBroker, running_broker
from topology_store.cli.devstack import free_port
from topology_store.runtime.settings import Settings

#: The children, in start order, as ``topology up`` starts them.
COMMANDS = ("project", "serve", "relay")


@dataclass(frozen=True)
class Stack:
    broker: RunningBroker
    database: str
    settings: Settings
    env: Mapping[str, str]
    api_port: int
    children: Mapping[str, subprocess.Popen[bytes]]
    logs: Path

    def alive(self) -> None:
        """Raise when a child has exited (its log says why)."""
        for name, child in self.children.items():
            if child.poll() is not None:
                raise RuntimeError(f"topology {name} exited with {child.returncode}: see {self.logs}/{name}.log")

    def processes(self, admin: str) -> dict[str, Callable[[], list[int]]]:
        """The servers' pids by name, for :class:`bench.claims_latency.CpuMeter`."""
        from bench.claims_latency import backend_pids

        return {
            "API + gRPC door (topology serve)": lambda: [self.children["serve"].pid],
            "projector (topology project)": lambda: [self.children["project"].pid],
            "relay (topology relay)": lambda: [self.children["relay"].pid],
            f"broker ({self.broker.name})": lambda: [self.broker.pid] if self.broker.pid else [],
            "PostgreSQL (scratch database)": lambda: backend_pids(admin, self.database),
        }


def stop_child(child: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    child.terminate()
    try:
        child.wait(timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


@contextmanager
def scratch_stack(broker_name: str, admin: str, logs: Path, env: Mapping[str, str]) -> Iterator[Stack]:
    """The stack for the length of the block, torn down afterwards (children, database, broker).
    ``env``: the harness's settings (tokens, ports, ``--env``); they win over the defaults set here."""
    from topology_store.projector.migrate import upgrade_to_head
    from topology_store.runtime.topics import ensure_topics

    database = f"bench_{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        broker = stack.enter_context(running_broker(broker_name, logs / f"{broker_name}.log"))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))

        def drop() -> None:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))

        stack.callback(drop)
        api_port = free_port()
        full = {**os.environ, "TOPOLOGY_KAFKA_BOOTSTRAP": broker.bootstrap,
                "TOPOLOGY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{database}",
                "TOPOLOGY_PROJECTOR_METRICS_PORT": "0", "TOPOLOGY_RELAY_METRICS_PORT": "0",
                "TOPOLOGY_API_PORT": str(api_port), "TOPOLOGY_LOG_FORMAT": "text", **env}
        settings = Settings(kafka_bootstrap=broker.bootstrap, database_url=full["TOPOLOGY_DATABASE_URL"])
        upgrade_to_head(settings.sqlalchemy_url)
        asyncio.run(ensure_topics(settings))
        arguments = {"project": ["project"], "serve": ["serve"], "relay": ["relay", "--source", settings.libpq_url]}
        children: dict[str, subprocess.Popen[bytes]] = {}
        for name in COMMANDS:
            log = stack.enter_context(open(logs / f"{name}.log", "wb"))
            children[name] = subprocess.Popen([sys.executable, "-m", "topology_store.cli", *arguments[name]],
                                              env=full, stdout=log, stderr=subprocess.STDOUT)
            stack.callback(stop_child, children[name])
        yield Stack(broker, database, settings, full, api_port, children, logs)


def tokens(token: str, scopes: tuple[str, ...] = ("snapshot:read", "claims:read", "claims:write")) -> str:
    """TOPOLOGY_API_TOKENS holding one bearer token with ``scopes``."""
    return json.dumps({token: list(scopes)})
