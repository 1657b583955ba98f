"""The gRPC door (adr/0021) over real sockets, on the real stack: events published to the
broker, a ``topology project`` child folding them into PostgreSQL, a ``topology serve`` child
answering GitLab's Topology Service contract from its snapshot, and clients built from our
generated stubs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.conftest import AUTH, TEST_CLAIMS_TOKEN, TEST_TOKEN, TEST_TOKEN_NO_SCOPE, settings_env
from tests.integration.processes import start, stop, wait_until
from tests.servers import Servers
from topology_store.cli.devstack import free_port
from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.projector.migrate import upgrade_to_head
from topology_store.runtime.settings import Settings
from topology_store.schemas.generated.proto import (
    cell_info_pb2,
    cell_service_pb2,
    cell_service_pb2_grpc,
    classify_service_pb2,
    classify_service_pb2_grpc,
    health_service_pb2,
    health_service_pb2_grpc,
    sequence_service_pb2_grpc,
)
from topology_store.schemas.generated.proto.claims.v1 import service_pb2 as claims_pb2
from topology_store.schemas.generated.proto.claims.v1 import service_pb2_grpc as claims_pb2_grpc
from topology_store.schemas.generated.proto.types.v1 import claim_pb2
from topology_store.schemas.models import (
    CellRegistered,
    CellUpdated,
    ClaimBucket,
    ClaimCreated,
    Event,
    OwnerType,
    SequenceRangeRequested,
)

pytestmark = pytest.mark.integration

READ = (("authorization", f"Bearer {TEST_TOKEN}"),)
Code = grpc.StatusCode
ClassifyRequest = classify_service_pb2.ClassifyRequest
Claim = claim_pb2.Claim

# "legacy" has no number in its name: configured as 1 (the first cell). cell-2 derives 2;
# cell-3 and blue-3 both end with 3 (ambiguous); "nonumber" has none.
CELL_IDS = json.dumps({"legacy": 1})
# Our addresses are URLs; GitLab's clients get host:port.
CELLS = {
    "legacy": ("https://legacy.example.com", "legacy-"),
    "cell-2": ("https://cell-2.example.com:8443/", "cell-2-"),
    "cell-3": ("https://cell-3.example.com", "cell-3-"),
    "blue-3": ("https://blue-3.example.com", "blue-3-"),
    "nonumber": ("http://nonumber.example.com", "nonumber-"),
}
NAMESPACES = {"gitlab-org": "cell-2", "acme": "legacy", "orphaned": "nonumber"}
PROJECT_ID = 278964  # a project of cell-2, classified by its id


def events() -> list[Event]:
    cells: list[Event] = [CellRegistered(source="ops", cell_id=name, address=address, session_prefix=prefix,
                                         region="eu") for name, (address, prefix) in CELLS.items()]
    claims: list[Event] = [ClaimCreated(source=cell, bucket=ClaimBucket.NAMESPACE, value=path, cell_id=cell,
                                        owner_type=OwnerType.GROUP, owner_id=n + 1)
                           for n, (path, cell) in enumerate(NAMESPACES.items())]
    claims.append(ClaimCreated(source="cell-2", bucket=ClaimBucket.PROJECT_ID, value=str(PROJECT_ID), cell_id="cell-2",
                               owner_type=OwnerType.PROJECT, owner_id=PROJECT_ID))
    return cells + claims


async def publish(settings: Settings, batch: list[Event]) -> None:
    async with EventPublisher(settings) as publisher:
        async for outcome in publisher.publish_many(batch):
            assert not isinstance(outcome, PublishFailed), outcome


@dataclass(frozen=True)
class Door:
    http: str
    grpc: str
    process: subprocess.Popen[bytes]
    log: Path

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc)


@contextmanager
def serve(settings: Settings, log: Path, cell_ids: str = CELL_IDS, **env: str) -> Iterator[Door]:
    """``topology serve`` with its gRPC door, until the gRPC port answers."""
    api_port, grpc_port = free_port(), free_port()
    process = start(["serve"], settings, log, TOPOLOGY_API_PORT=str(api_port), TOPOLOGY_GRPC_PORT=str(grpc_port),
                    TOPOLOGY_GRPC_CELL_IDS=cell_ids, **env)
    door = Door(f"http://127.0.0.1:{api_port}", f"127.0.0.1:{grpc_port}", process, log)

    def answering() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"topology serve exited: {log.read_text()[-3000:]}")
        with door.channel() as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return True

    try:
        wait_until(answering, timeout_s=60, what="the gRPC door answering")
        yield door
    finally:
        stop(process)


@pytest.fixture
def stack(topics: Settings, tmp_path: Path) -> Iterator[Door]:
    with running(topics, tmp_path) as door:
        yield door


@contextmanager
def running(topics: Settings, tmp_path: Path, cell_ids: str = CELL_IDS) -> Iterator[Door]:
    """The projector and ``topology serve`` on ``topics``, once :func:`events` are in the snapshot."""
    asyncio.run(publish(topics, events()))
    projector = start(["project"], topics, tmp_path / "projector.log")
    try:
        with serve(topics, tmp_path / "serve.log", cell_ids) as door:

            def projected() -> bool:
                response = httpx.get(f"{door.http}/v1/snapshot", headers=AUTH, timeout=2)
                if response.status_code != 200:
                    return False
                body = response.json()
                return len(body["cells"]) == len(CELLS) and body["namespaces"] == NAMESPACES

            wait_until(projected, timeout_s=90, interval_s=0.2, what="cells and namespaces in the snapshot")

            def serving() -> bool:  # the door follows the snapshot every HEALTH_POLL_S, not at once
                with door.channel() as channel:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return status.status == health_pb2.HealthCheckResponse.SERVING

            wait_until(serving, timeout_s=10, interval_s=0.1, what="the gRPC door reporting SERVING")
            yield door
    finally:
        stop(projector)


def refused(call: object, request: object, metadata: tuple[tuple[str, str], ...] = READ) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, metadata=metadata, timeout=5)  # type: ignore[operator]
    return raised.value


def test_every_served_rpc_answers_from_the_projected_snapshot(stack: Door) -> None:
    with stack.channel() as channel:
        cells = cell_service_pb2_grpc.CellServiceStub(channel)
        classify = classify_service_pb2_grpc.ClassifyServiceStub(channel)
        claims = claims_pb2_grpc.ClaimServiceStub(channel)

        legacy = cells.GetCell(cell_service_pb2.GetCellRequest(cell_id=1), metadata=READ, timeout=5).cell_info
        assert (legacy.id, legacy.address, legacy.session_prefix) == (1, "legacy.example.com:443", "legacy-")
        assert list(legacy.sequence_ranges) == []
        assert cells.GetCell(cell_service_pb2.GetCellRequest(cell_id=2), metadata=READ).cell_info.address == \
            "cell-2.example.com:8443"
        # Rails reads NOT_FOUND as "no such cell"; an ambiguous number says how to resolve it.
        assert refused(cells.GetCell, cell_service_pb2.GetCellRequest(cell_id=9)).code() == Code.NOT_FOUND
        ambiguous = refused(cells.GetCell, cell_service_pb2.GetCellRequest(cell_id=3))
        assert ambiguous.code() == Code.FAILED_PRECONDITION
        assert "blue-3, cell-3" in ambiguous.details() and "TOPOLOGY_GRPC_CELL_IDS" in ambiguous.details()

        # GetCells, declared on three services: the numbered cells, by number.
        for stub in (classify, claims, sequence_service_pb2_grpc.SequenceServiceStub(channel)):
            listed = stub.GetCells(cell_info_pb2.GetCellsRequest(), metadata=READ, timeout=5).cells
            assert [(c.id, c.address) for c in listed] == [(1, "legacy.example.com:443"), (2, "cell-2.example.com:8443")]

        def proxy(request: ClassifyRequest) -> tuple[int, str, str]:
            answer = classify.Classify(request, metadata=READ, timeout=5)
            return answer.action, answer.proxy.address, answer.matched_claim.route

        proxy_action = classify_service_pb2.PROXY
        assert proxy(ClassifyRequest(type=classify_service_pb2.FIRST_CELL)) == (proxy_action, "legacy.example.com:443", "")
        assert proxy(ClassifyRequest(type=classify_service_pb2.SESSION_PREFIX, value="cell-2-a1b2c3")) == \
            (proxy_action, "cell-2.example.com:8443", "")
        assert proxy(ClassifyRequest(type=classify_service_pb2.CELL_ID, value="2")) == \
            (proxy_action, "cell-2.example.com:8443", "")
        # By claims: the first that matches answers; a route matches its top-level namespace.
        assert proxy(ClassifyRequest(claims=[Claim(route="nobody/x"), Claim(route="GitLab-Org/gitlab/-/issues")])) == \
            (proxy_action, "cell-2.example.com:8443", "gitlab-org")
        assert proxy(ClassifyRequest(claims=[Claim(route="orphaned")])) == \
            (proxy_action, "nonumber.example.com:80", "orphaned")  # no number needed to proxy
        assert refused(classify.Classify, ClassifyRequest(claims=[Claim(route="nobody")])).code() == Code.NOT_FOUND
        assert refused(classify.Classify, ClassifyRequest(type=classify_service_pb2.SESSION_PREFIX,
                                                          value="zzz-1")).code() == Code.NOT_FOUND
        assert refused(classify.Classify, ClassifyRequest(type=classify_service_pb2.CELL_ID,
                                                          value="3")).code() == Code.FAILED_PRECONDITION
        # Other claim kinds (GitLab's mail router asks by project id, service desk e-mail, ...)
        # are looked up among the committed claims (adr/0022), in order. (Its claim may be
        # projected after the namespaces the fixture waited for: another partition.)
        def project_classified() -> bool:
            try:
                classify.Classify(ClassifyRequest(claims=[Claim(project_id=PROJECT_ID)]), metadata=READ, timeout=5)
            except grpc.RpcError:
                return False
            return True

        wait_until(project_classified, timeout_s=30, interval_s=0.1, what="the project's claim projected")
        assert proxy(ClassifyRequest(claims=[Claim(project_id=7), Claim(project_id=PROJECT_ID)])) == \
            (proxy_action, "cell-2.example.com:8443", "")
        assert classify.Classify(ClassifyRequest(claims=[Claim(project_id=PROJECT_ID)]), metadata=READ,
                                 timeout=5).matched_claim.project_id == PROJECT_ID
        assert refused(classify.Classify, ClassifyRequest(claims=[Claim(project_id=7)])).code() == Code.NOT_FOUND
        assert refused(classify.Classify, ClassifyRequest(claims=[Claim(project_id=0)])).code() == \
            Code.INVALID_ARGUMENT

        probes = health_service_pb2_grpc.HealthServiceStub(channel)
        probes.ReadinessProbe(health_service_pb2.ReadinessProbeRequest(), timeout=5)
        probes.LivenessProbe(health_service_pb2.LivenessProbeRequest(), timeout=5)

        # ClaimService's writes are served (adr/0022; tests/integration/test_grpc_claims.py) and
        # want claims:write, which a router's token does not hold; with it, an empty begin is bad input.
        begin = refused(claims.BeginUpdate, claims_pb2.BeginUpdateRequest(cell_id=1))
        assert begin.code() == Code.PERMISSION_DENIED and "claims:write" in begin.details()
        empty = refused(claims.BeginUpdate, claims_pb2.BeginUpdateRequest(cell_id=1),
                        metadata=(("authorization", f"Bearer {TEST_CLAIMS_TOKEN}"),))
        assert empty.code() == Code.INVALID_ARGUMENT and "names no record" in empty.details()


def test_health_checking_and_reflection(stack: Door) -> None:
    with stack.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "gitlab.cells.topology_service.CellService", "gitlab.cells.topology_service.ClassifyService",
                        "gitlab.cells.topology_service.claims.v1.ClaimService"):  # served whole since adr/0022
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == serving
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="gitlab.cells.topology_service.NoSuchService"))
        assert unknown.value.code() == Code.NOT_FOUND

        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == {
            "gitlab.cells.topology_service.CellService",
            "gitlab.cells.topology_service.ClassifyService",
            "gitlab.cells.topology_service.HealthService",
            "gitlab.cells.topology_service.SequenceService",
            "gitlab.cells.topology_service.claims.v1.ClaimService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        found = database.FindFileContainingSymbol("gitlab.cells.topology_service.ClassifyService")
        assert found.name == "proto/classify_service.proto"  # GitLab's file name


BAD_CLASSIFY = [
    (ClassifyRequest(), "give a classify type"),
    (ClassifyRequest(type=99), "unknown classify type 99"),
    (ClassifyRequest(type=classify_service_pb2.SESSION_PREFIX), "value is empty"),
    (ClassifyRequest(type=classify_service_pb2.CELL_ID, value="cell-2"), "numeric cell id"),
    (ClassifyRequest(type=classify_service_pb2.CELL_ID, value="99999999999999999999"), "numeric cell id"),
    (ClassifyRequest(type=classify_service_pb2.CELL_ID, value="0"), "positive integer"),
    (ClassifyRequest(type=classify_service_pb2.FIRST_CELL, claims=[Claim(route="a")]), "not both"),
    (ClassifyRequest(claims=[Claim()]), "claims[0] is empty"),
    (ClassifyRequest(claims=[Claim(route="/")]), "no path segment"),
    (ClassifyRequest(claims=[Claim(route="a")], value="x"), "leave it empty"),
    (ClassifyRequest(type=classify_service_pb2.SESSION_PREFIX, value="x" * 5000), "at most 4096"),
]


def test_bad_input_is_invalid_argument_with_what_is_wrong(stack: Door) -> None:
    with stack.channel() as channel:
        classify = classify_service_pb2_grpc.ClassifyServiceStub(channel).Classify
        for request, fragment in BAD_CLASSIFY:
            error = refused(classify, request)
            assert (error.code(), fragment in error.details()) == (Code.INVALID_ARGUMENT, True), (request, error)
        bad_cell = refused(cell_service_pb2_grpc.CellServiceStub(channel).GetCell,
                           cell_service_pb2.GetCellRequest(cell_id=-5))
        assert bad_cell.code() == Code.INVALID_ARGUMENT and "positive integer" in bad_cell.details()
        # Larger than the HTTP API's body limit: refused by gRPC itself, before any handler.
        huge = refused(classify, ClassifyRequest(claims=[Claim(route="a" * 70_000)]))
        assert huge.code() == Code.RESOURCE_EXHAUSTED
    assert "Traceback" not in stack.log.read_text()


def test_routing_data_needs_a_token_with_snapshot_read(stack: Door) -> None:
    with stack.channel() as channel:
        cells = cell_service_pb2_grpc.CellServiceStub(channel)
        request = cell_service_pb2.GetCellRequest(cell_id=1)
        assert refused(cells.GetCell, request, metadata=()).code() == Code.UNAUTHENTICATED
        assert refused(cells.GetCell, request, metadata=(("authorization", "Bearer wrong-token-123"),)).code() == \
            Code.UNAUTHENTICATED
        for token in (TEST_TOKEN_NO_SCOPE, TEST_CLAIMS_TOKEN):
            denied = refused(cells.GetCell, request, metadata=(("authorization", f"Bearer {token}"),))
            assert denied.code() == Code.PERMISSION_DENIED and "snapshot:read" in denied.details()
        # Health checking needs no credential (Rails checks without one).
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def unmigrated(servers: Servers, topics: Settings) -> Iterator[Settings]:
    """``topics`` on a database without the projection's tables (no snapshot can load)."""
    name = f"topology_bare_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(servers.postgres_url, dbname=name)
    params = psycopg.conninfo.conninfo_to_dict(url)
    yield topics.model_copy(update={"database_url": (
        f"postgresql://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}/{name}"
    )})
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_health_is_not_serving_until_a_snapshot_is_loaded(unmigrated: Settings, tmp_path: Path) -> None:
    with serve(unmigrated, tmp_path / "serve.log") as door, door.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        not_ready = refused(health_service_pb2_grpc.HealthServiceStub(channel).ReadinessProbe,
                            health_service_pb2.ReadinessProbeRequest())
        assert not_ready.code() == Code.UNAVAILABLE
        loading = refused(cell_service_pb2_grpc.CellServiceStub(channel).GetCell,
                          cell_service_pb2.GetCellRequest(cell_id=1))
        assert loading.code() == Code.UNAVAILABLE  # Rails retries UNAVAILABLE
        upgrade_to_head(unmigrated.sqlalchemy_url)

        def serving() -> bool:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            return status == health_pb2.HealthCheckResponse.SERVING

        wait_until(serving, timeout_s=60, interval_s=0.2, what="SERVING once the snapshot loads")


def test_a_grpc_port_in_use_stops_serve_with_a_clear_error(topics: Settings, tmp_path: Path) -> None:
    with serve(topics, tmp_path / "first.log") as first:
        taken = first.grpc.rsplit(":", 1)[1]
        log = tmp_path / "second.log"
        second = start(["serve"], topics, log, TOPOLOGY_API_PORT=str(free_port()), TOPOLOGY_GRPC_PORT=taken)
        try:
            assert second.wait(60) != 0
        finally:
            stop(second)
        assert f"cannot listen on 127.0.0.1:{taken}" in log.read_text()


def test_topology_up_opens_the_grpc_door_and_prints_its_address(topics: Settings, tmp_path: Path) -> None:
    """``topology up --demo`` on the tests' broker and database: the printed gRPC address answers
    GetCells with the demo cells (numbered by their names) and FIRST_CELL with cell-1."""
    grpc_port, api_port = free_port(), free_port()
    env = {**settings_env(topics), "TOPOLOGY_GRPC_PORT": str(grpc_port)}
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "topology_store.cli", "up", "--demo", "--data-dir",
                               str(tmp_path / "data"), "--api-port", str(api_port)],
                              env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "Ctrl-C stops everything" in log.read_text() or up.poll() is not None, timeout_s=150,
                   interval_s=0.5, what="topology up to start")
        text = log.read_text()
        printed = re.search(r"topology up: gRPC\s+(\S+)", text)
        token = re.search(r"dev token\s+(\S+)", text)
        assert printed is not None and token is not None, text[-3000:]
        assert printed.group(1) == f"127.0.0.1:{grpc_port}"
        metadata = (("authorization", f"Bearer {token.group(1)}"),)
        with grpc.insecure_channel(printed.group(1)) as channel:
            classify = classify_service_pb2_grpc.ClassifyServiceStub(channel)
            cells = classify.GetCells(cell_info_pb2.GetCellsRequest(), metadata=metadata, timeout=10).cells
            assert [(c.id, c.address) for c in cells] == [(n, f"cell-{n}.demo.example.com:443") for n in (1, 2, 3, 4)]
            first = classify.Classify(ClassifyRequest(type=classify_service_pb2.FIRST_CELL), metadata=metadata,
                                      timeout=10)
            assert first.proxy.address == "cell-1.demo.example.com:443"
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def test_cells_answer_their_recorded_numbers_and_granted_sequence_ranges(topics: Settings, tmp_path: Path) -> None:
    """GitLab's cell id as data (adr/0021): the number a cell event recorded is the cell's id
    (over TOPOLOGY_GRPC_CELL_IDS and the name's digits), a taken number is refused by the cell
    rules, and CellInfo carries the sequence ranges the decider granted the cell."""
    cells: list[Event] = [
        CellRegistered(source="ops", cell_id="legacy", address="https://legacy.example.com",
                       session_prefix="legacy-", region="eu", number=5),  # configured as 1: the event wins
        CellRegistered(source="ops", cell_id="cell-2", address="https://cell-2.example.com",
                       session_prefix="cell-2-", region="eu", number=20),  # not its digits
        CellRegistered(source="ops", cell_id="core", address="https://core.example.com",
                       session_prefix="core-", region="eu", number=10),
        CellRegistered(source="ops", cell_id="late", address="https://late.example.com",
                       session_prefix="late-", region="eu"),
        CellUpdated(source="ops", cell_id="late", number=50),  # recorded after registration
        CellRegistered(source="ops", cell_id="cell-7", address="https://cell-7.example.com",
                       session_prefix="cell-7-", region="eu", number=20),  # taken by cell-2: rejected
    ]
    ranges: list[Event] = [
        SequenceRangeRequested(source="core", cell_id="core", sequence_name="projects.id", size=1000),
        SequenceRangeRequested(source="core", cell_id="core", sequence_name="projects.id", size=500),
        SequenceRangeRequested(source="core", cell_id="core", sequence_name="users.id", size=100),
    ]
    asyncio.run(publish(topics, cells))
    projector = start(["project"], topics, tmp_path / "projector.log")
    try:
        asyncio.run(publish(topics, ranges))  # decided by the live projector
        with serve(topics, tmp_path / "serve.log") as door:

            def projected() -> dict[str, Any] | None:
                response = httpx.get(f"{door.http}/v1/snapshot", headers=AUTH, timeout=2)
                if response.status_code != 200:
                    return None
                served = {c["cell_id"]: c for c in response.json()["cells"]}
                done = (len(served) == 4 and served["late"]["number"] == 50
                        and len(served["core"]["sequence_ranges"]) == 3)
                return served if done else None

            served = wait_until(projected, timeout_s=90, interval_s=0.2, what="numbers and ranges in the snapshot")
            assert "cell-7" not in served
            assert {name: c["number"] for name, c in served.items()} == {"legacy": 5, "cell-2": 20, "core": 10,
                                                                          "late": 50}
            with psycopg.connect(topics.libpq_url) as conn:
                granted = conn.execute('SELECT sequence_name, start, "end" FROM sequence_ranges WHERE cell_id = '
                                       "'core' ORDER BY 1, 2").fetchall()
            assert len(granted) == 3
            assert [(r["sequence_name"], r["start"], r["end"]) for r in served["core"]["sequence_ranges"]] == granted
            expected = [cell_info_pb2.SequenceRange(minval=start, maxval=end - 1) for _, start, end in granted]

            def current_cells() -> list[tuple[int, str]]:  # the door follows the snapshot every 0.25 s
                with door.channel() as channel:
                    listed = claims_pb2_grpc.ClaimServiceStub(channel).GetCells(
                        cell_info_pb2.GetCellsRequest(), metadata=READ, timeout=5).cells
                return [(c.id, c.address) for c in listed]

            wait_until(lambda: [n for n, _ in current_cells()] == [5, 10, 20, 50], timeout_s=10, interval_s=0.1,
                       what="GetCells answering the recorded numbers")
            with door.channel() as channel:
                stub = cell_service_pb2_grpc.CellServiceStub(channel)
                core = stub.GetCell(cell_service_pb2.GetCellRequest(cell_id=10), metadata=READ, timeout=5).cell_info
                assert (core.id, core.address, core.session_prefix) == (10, "core.example.com:443", "core-")
                assert list(core.sequence_ranges) == expected
                assert not core.HasField("sequence_range")  # several ranges: the older single field stays unset
                legacy = stub.GetCell(cell_service_pb2.GetCellRequest(cell_id=5), metadata=READ, timeout=5).cell_info
                assert legacy.address == "legacy.example.com:443" and list(legacy.sequence_ranges) == []
                for gone in (1, 2, 7):  # the configured, the digits, the rejected cell's: none is a cell's id
                    assert refused(stub.GetCell, cell_service_pb2.GetCellRequest(cell_id=gone)).code() == \
                        Code.NOT_FOUND
                sessions = classify_service_pb2_grpc.ClassifyServiceStub(channel).GetCells(
                    cell_info_pb2.GetCellsRequest(), metadata=READ, timeout=5).cells
                assert [list(c.sequence_ranges) for c in sessions if c.id == 10] == [expected]
        assert "TOPOLOGY_GRPC_CELL_IDS disagrees" in (tmp_path / "serve.log").read_text()
    finally:
        stop(projector)
