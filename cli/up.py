"""``topology up``: the whole stack in one command, for development and demos.

Servers named by ``TOPOLOGY_KAFKA_BOOTSTRAP`` / ``TOPOLOGY_DATABASE_URL`` are used
when set; otherwise the embedded broker and database start here. The projector and
the read API run as child processes, exactly as ``topology project`` and
``topology serve`` would; Ctrl-C stops all of them. A development CA and client
certificates (each demo cell's, an admin's) are made under ``<data dir>/tls``
(``devpki.py``); ``--tls`` serves both ports with mutual TLS using them (adr/0021).

Nothing outlives it: Ctrl-C and SIGTERM stop everything in order; should it die
without doing so (SIGKILL, a crash), its watchdog (``watchdog.py``), told about each
server and child as it starts, stops them; and a pid file per process in the data
directory lets the next run end whatever survived even that, before it starts.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from topology_store.cli.demo import DEMO_CELLS, demo_events
from topology_store.cli.devpki import DevPki, dev_pki
from topology_store.cli.devstack import (
    EmbeddedKafka,
    EmbeddedPostgres,
    PidFile,
    free_port,
    port_holders,
    start_ticks,
    stop_postmaster,
)
from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.projector.migrate import ensure_database, upgrade_to_head
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics
from topology_store.schemas.models import ClaimBucket, ClaimCreated


def _say(message: str) -> None:
    print(f"topology up: {message}", flush=True)


def _reset_database(libpq_url: str) -> None:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = conninfo_to_dict(libpq_url).get("dbname") or "topology"
    with psycopg.connect(make_conninfo(libpq_url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _wait_ready(url: str, children: list[subprocess.Popen[bytes]], timeout_s: float = 60,
                verify: ssl.SSLContext | bool = True) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                raise RuntimeError(f"{' '.join(map(str, child.args))} exited with status {child.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"read API not ready within {timeout_s}s")


async def _emit_demo(settings: Settings) -> int:
    count = 0
    async with EventPublisher(settings) as publisher:
        async for outcome in publisher.publish_many(demo_events()):
            if isinstance(outcome, PublishFailed):
                raise outcome
            count += 1
    return count


# The development token may do everything the API offers.
DEV_SCOPES = ("snapshot:read", "claims:read", "claims:write", "audit:read")


def _dev_tokens(token: str) -> str:
    """TOPOLOGY_API_TOKENS plus a development token with every scope."""
    import json

    try:
        tokens = json.loads(os.environ.get("TOPOLOGY_API_TOKENS") or "{}")
    except json.JSONDecodeError:
        tokens = {}
    return json.dumps({**(tokens if isinstance(tokens, dict) else {}), token: list(DEV_SCOPES)})


def _wait_for_demo(url: str, token: str, timeout_s: float = 120,
                   verify: ssl.SSLContext | bool = True) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    expected = sum(1 for e in demo_events() if isinstance(e, ClaimCreated) and e.bucket is ClaimBucket.NAMESPACE)
    while time.monotonic() < deadline:
        document = httpx.get(f"{url}/v1/snapshot", headers={"Authorization": f"Bearer {token}"}, timeout=5,
                             verify=verify).json()
        if len(document.get("namespaces", {})) >= expected:
            return document  # type: ignore[no-any-return]
        time.sleep(0.3)
    raise RuntimeError("demo data did not reach the snapshot in time")


class Watchdog:
    """The write end of the watchdog's input (``watchdog.py``): what to stop should this
    process die. Its pipe closes with this process, however it ends."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "topology_store.cli.watchdog"], stdin=subprocess.PIPE,
            start_new_session=True,  # out of the terminal's group: Ctrl-C does not reach it
        )

    def tell(self, line: str) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(f"{line}\n".encode())
            self._process.stdin.flush()
        except OSError as exc:  # it died: the pid files still let the next run clean up
            _say(f"warning: the watchdog is gone ({exc.strerror}); a kill -9 now would leave servers running")

    def guard(self, pid: int) -> None:
        self.tell(f"process {pid} {start_ticks(pid)}")

    def close(self) -> None:
        """Everything is stopped: the watchdog exits without acting."""
        self.tell("done")
        assert self._process.stdin is not None
        try:
            self._process.stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _reap_leftovers(data_dir: Path) -> None:
    """End what an earlier run in ``data_dir`` left running (it was killed with its
    watchdog): the processes its pid files name, a PostgreSQL on its data directory."""
    for pid_file in sorted(data_dir.glob("*.pid")):
        ended = PidFile(pid_file).reap()
        if ended is not None:
            _say(f"stopped {pid_file.stem} (pid {ended}), left running by an earlier run in {data_dir}")
    stopped = stop_postmaster(data_dir / "postgres")
    if stopped is not None:
        _say(f"stopped PostgreSQL (pid {stopped}), left running by an earlier run in {data_dir}")


def _broker_port() -> int:
    if _port_free(9092):
        return 9092
    port = free_port()
    holders = ", ".join(port_holders(9092)) or "another process"
    _say(f"warning: port 9092 is taken by {holders}; the embedded broker listens on {port} instead")
    return port


def _grpc_port() -> str:
    """TOPOLOGY_GRPC_PORT when set (0: no gRPC door), else 9095 or, when taken, a free port."""
    if os.environ.get("TOPOLOGY_GRPC_PORT"):
        return os.environ["TOPOLOGY_GRPC_PORT"]
    if _port_free(9095):
        return "9095"
    port = free_port()
    _say(f"warning: port 9095 is taken; the gRPC door listens on {port} instead")
    return str(port)


def _admin_tls(pki: DevPki) -> ssl.SSLContext:
    """What this command's own HTTP checks present under mutual TLS: the admin's certificate."""
    context = ssl.create_default_context(cafile=pki.ca)
    context.load_cert_chain(pki.clients["admin"].cert, pki.clients["admin"].key)
    return context


def _say_tls(pki: DevPki, tls: bool, url: str, grpc_address: str | None, token: str) -> None:
    cells = ", ".join(f"{name}.pem" for name in pki.clients if name != "admin")
    _say(f"TLS files   {pki.directory}   (development CA ca.pem; server.pem; a client certificate per demo "
         f"cell: {cells}; admin.pem acts for any cell)")
    if not tls:
        _say("            mutual TLS on both ports with them: topology up --tls")
        return
    c, k = pki.clients["cell-1"].cert.name, pki.clients["cell-1"].key.name
    _say(f"            cd {pki.directory} && curl --cacert ca.pem --cert admin.pem --key admin-key.pem "
         f"-H 'Authorization: Bearer {token}' {url}/v1/cells")
    if grpc_address:
        _say(f"            cd {pki.directory} && grpcurl -cacert ca.pem -cert {c} -key {k} {grpc_address} list")


def up(data_dir: Path, api_port: int, demo: bool, tls: bool = False) -> int:
    env_kafka = os.environ.get("TOPOLOGY_KAFKA_BOOTSTRAP")
    env_database = os.environ.get("TOPOLOGY_DATABASE_URL")
    kafka: EmbeddedKafka | None = None
    postgres: EmbeddedPostgres | None = None
    children: list[subprocess.Popen[bytes]] = []
    watchdog: Watchdog | None = None
    pgdata: Path | None = None  # the embedded database's, once it may be running
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        # SIGTERM as Ctrl-C: stop now, also in the middle of starting up.
        if not stopping:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir = data_dir.resolve()
        watchdog = Watchdog()
        _reap_leftovers(data_dir)
        # A development CA and certificates for the demo cells and an admin (adr/0021).
        pki = dev_pki(data_dir / "tls", [name for name, _, _ in DEMO_CELLS])
        if env_kafka:
            bootstrap = env_kafka
            _say(f"using Kafka at {bootstrap}")
        else:
            kafka = EmbeddedKafka(port=_broker_port(), log_path=data_dir / "tansu.log")
            bootstrap = kafka.start().bootstrap
            assert kafka.pid is not None
            watchdog.guard(kafka.pid)
            PidFile(data_dir / "tansu.pid").write(kafka.pid)
            _say(f"embedded Tansu broker (memory storage) at {bootstrap}")
        if env_database:
            database_url = env_database
            _say("using PostgreSQL from TOPOLOGY_DATABASE_URL")
        else:
            pgdata = data_dir / "postgres"
            watchdog.tell(f"postgres {pgdata}")  # before it starts: this process may die starting it
            postgres = EmbeddedPostgres(pgdata).start()
            database_url = postgres.url("topology")
            _say(f"embedded PostgreSQL, data in {data_dir / 'postgres'}")
        if kafka is not None and postgres is not None:
            # The embedded broker forgets its log on exit; offsets stored from an
            # earlier run would point past the new, empty log. Start clean — but
            # only ever the embedded database, never one named by the operator.
            _reset_database(Settings(database_url=database_url).libpq_url)
        elif kafka is not None:
            _say("warning: a fresh embedded broker with an existing database: offsets stored by an earlier "
                 "run point past the new, empty log, and the projector will stop and say so")
        overrides = {
            "TOPOLOGY_KAFKA_BOOTSTRAP": bootstrap,
            "TOPOLOGY_DATABASE_URL": database_url,
            "TOPOLOGY_API_PORT": str(api_port),
            "TOPOLOGY_GRPC_PORT": _grpc_port(),  # GitLab's Topology Service contract (adr/0021)
        }
        if tls:  # mutual TLS on both ports, with the development PKI
            overrides |= {"TOPOLOGY_TLS_CERT": str(pki.server.cert), "TOPOLOGY_TLS_KEY": str(pki.server.key),
                          "TOPOLOGY_TLS_CLIENT_CA": str(pki.ca)}
        if kafka is not None:
            overrides["TOPOLOGY_PRODUCER_IDEMPOTENCE"] = "off"
        # The children share this terminal: human-readable logs unless asked otherwise (adr/0011).
        overrides.setdefault("TOPOLOGY_LOG_FORMAT", os.environ.get("TOPOLOGY_LOG_FORMAT", "text"))
        dev_token = f"dev-{secrets.token_urlsafe(24)}"  # routing data needs a bearer token (adr/0009)
        overrides["TOPOLOGY_API_TOKENS"] = _dev_tokens(dev_token)
        env = {**os.environ, **overrides}
        settings = Settings(**{k.removeprefix("TOPOLOGY_").lower(): v for k, v in overrides.items()})  # type: ignore[arg-type]
        ensure_database(settings.libpq_url)
        upgrade_to_head(settings.sqlalchemy_url)
        asyncio.run(ensure_topics(settings))
        # The relay publishes the projector's claim decisions (its outbox) to the decision log.
        for command in (["project"], ["serve"], ["relay", "--source", settings.libpq_url]):
            child = subprocess.Popen([sys.executable, "-m", "topology_store.cli", *command], env=env)
            children.append(child)
            watchdog.guard(child.pid)
            PidFile(data_dir / f"{command[0]}.pid").write(child.pid)
        url = f"{'https' if tls else 'http'}://{settings.api_host}:{api_port}"
        verify: ssl.SSLContext | bool = _admin_tls(pki) if tls else True
        _wait_ready(url, children, verify=verify)
        if demo:
            count = asyncio.run(_emit_demo(settings))
            document = _wait_for_demo(url, dev_token, verify=verify)
            _say(f"demo: {count} events emitted; snapshot version {document['version']} "
                 f"with {len(document['cells'])} cells and {len(document['namespaces'])} namespaces")  # type: ignore[arg-type]
        _say(f"read API    {url}/v1/snapshot   (OpenAPI: {url}/docs)")
        _say(f"dev token   {dev_token}   ({', '.join(DEV_SCOPES)}; valid until this stack stops)")
        _say(f"            curl -H 'Authorization: Bearer {dev_token}' {url}/v1/snapshot")
        _say(f"metrics     {url}/metrics")
        if settings.grpc_port:
            grpc_address = f"{settings.api_host}:{settings.grpc_port}"
            _say(f"gRPC        {grpc_address}   (GitLab's Topology Service contract; cell ids: the names' digits)")
            if not tls:
                _say(f"            grpcurl -plaintext -H 'authorization: Bearer {dev_token}' {grpc_address} list")
        _say_tls(pki, tls, url, f"{settings.api_host}:{settings.grpc_port}" if settings.grpc_port else None, dev_token)
        _say(f"Kafka       {bootstrap}")
        _say(f"PostgreSQL  {database_url}")
        _say("Ctrl-C stops everything")
        while True:
            for child in children:
                if child.poll() is not None:
                    _say(f"{' '.join(map(str, child.args))} exited with status {child.returncode}; stopping")
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C or SIGTERM must not cut the teardown short and orphan a server.
        stopping = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _say("stopping")
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if kafka is not None:
            kafka.stop()
        if postgres is not None:
            postgres.stop()
        if pgdata is not None:
            stop_postmaster(pgdata)  # also one interrupted while it started
        for name in ("project", "serve", "relay", "tansu"):
            (data_dir / f"{name}.pid").unlink(missing_ok=True)
        if watchdog is not None:
            watchdog.close()
        _say("stopped")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
