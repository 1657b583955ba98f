"""TLS, mutual TLS and per-cell authorization (adr/0021) over real sockets, on the real stack:
a ``topology project`` child deciding, a ``topology serve`` child with its HTTP and gRPC
ports, certificates made here (``cli/devpki.py``'s CA and leaf builders, plus a second CA
nobody trusts). A refused request publishes nothing: the claim-requests topic's end offsets
do not move."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.conftest import AUTH, CLAIMS_AUTH, TEST_CLAIMS_TOKEN, TEST_TOKEN, settings_env
from tests.integration.processes import start, stop, wait_until
from topology_store.cli.devpki import KeyPair, issue, new_ca, write_pair
from topology_store.cli.devstack import free_port
from topology_store.core.access import ADMIN_URI, CELL_URI_PREFIX
from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.runtime.settings import Settings
from topology_store.schemas.generated.proto import cell_info_pb2
from topology_store.schemas.generated.proto.claims.v1 import messages_pb2
from topology_store.schemas.generated.proto.claims.v1 import service_pb2 as claims_pb2
from topology_store.schemas.generated.proto.claims.v1 import service_pb2_grpc as claims_pb2_grpc
from topology_store.schemas.generated.proto.types.v1 import uuid_pb2
from topology_store.schemas.models import CellRegistered

pytestmark = pytest.mark.integration

Code = grpc.StatusCode


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: KeyPair
    clients: dict[str, KeyPair]  # "cell-1", "cell-2", "admin", "stranger" (another CA's cell-1)


def make_pki(directory: Path) -> Pki:
    ca = new_ca("test CA")
    write_pair(*ca, directory / "ca.pem", directory / "ca-key.pem")
    server = write_pair(*issue(ca, "server", hosts=["127.0.0.1", "localhost"]), directory / "server.pem",
                        directory / "server-key.pem")
    clients = {name: write_pair(*issue(ca, name, uris=[uri]), directory / f"{name}.pem", directory / f"{name}-key.pem")
               for name, uri in (("cell-1", f"{CELL_URI_PREFIX}cell-1"), ("cell-2", f"{CELL_URI_PREFIX}cell-2"),
                                 ("admin", ADMIN_URI))}
    other = new_ca("a CA nobody trusts")
    clients["stranger"] = write_pair(*issue(other, "cell-1", uris=[f"{CELL_URI_PREFIX}cell-1"]),
                                     directory / "stranger.pem", directory / "stranger-key.pem")
    return Pki(directory / "ca.pem", server, clients)


def published(settings: Settings) -> int:
    """How many records the claim-requests topic holds (the sum of its end offsets)."""

    async def count() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
        await consumer.start()
        try:
            partitions = [TopicPartition(settings.claim_requests_topic, p)
                          for p in range(settings.claim_requests_partitions)]
            return sum((await consumer.end_offsets(partitions)).values())
        finally:
            await consumer.stop()

    return asyncio.run(count())


async def register_cells(settings: Settings, names: list[str]) -> None:
    async with EventPublisher(settings) as publisher:
        cells = [CellRegistered(source="ops", cell_id=n, address=f"https://{n}.example.com", session_prefix=f"{n}-",
                                region="eu") for n in names]
        async for outcome in publisher.publish_many(cells):
            assert not isinstance(outcome, PublishFailed), outcome


@dataclass(frozen=True)
class Stack:
    settings: Settings
    http: str
    grpc: str
    pki: Pki | None


@contextmanager
def stack(settings: Settings, tmp_path: Path, pki: Pki | None) -> Iterator[Stack]:
    """The projector and ``topology serve`` (both ports); TLS and mutual TLS when ``pki``."""
    asyncio.run(register_cells(settings, ["cell-1", "cell-2"]))
    settings = settings.model_copy(update={"decision_wait_s": 20.0, "claims_max_wait_age_ms": 600_000})
    env = {} if pki is None else {"TOPOLOGY_TLS_CERT": str(pki.server.cert), "TOPOLOGY_TLS_KEY": str(pki.server.key),
                                  "TOPOLOGY_TLS_CLIENT_CA": str(pki.ca)}
    api_port, grpc_port = free_port(), free_port()
    projector = start(["project"], settings, tmp_path / "projector.log")
    serve: subprocess.Popen[bytes] | None = None
    try:
        serve = start(["serve"], settings, tmp_path / "serve.log", TOPOLOGY_API_PORT=str(api_port),
                      TOPOLOGY_GRPC_PORT=str(grpc_port), **env)
        scheme = "http" if pki is None else "https"
        door = Stack(settings, f"{scheme}://127.0.0.1:{api_port}", f"127.0.0.1:{grpc_port}", pki)

        def both_cells_served() -> bool:
            assert serve is not None
            if serve.poll() is not None:
                raise AssertionError(f"topology serve exited: {(tmp_path / 'serve.log').read_text()[-3000:]}")
            try:
                with http_client(door, "admin") as client:
                    cells = client.get(f"{door.http}/v1/cells", headers=AUTH, timeout=2)
                return cells.status_code == 200 and len(cells.json()["cells"]) == 2
            except httpx.TransportError:
                return False

        wait_until(both_cells_served, timeout_s=60, interval_s=0.2, what="topology serve with both cells")
        yield door
    finally:
        if serve is not None:
            assert stop(serve) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert stop(projector) == 0, (tmp_path / "projector.log").read_text()[-3000:]


def http_client(door: Stack, who: str | None) -> httpx.Client:
    """A client presenting ``who``'s certificate (None: none) and trusting the test CA."""
    if door.pki is None:
        return httpx.Client()
    context = ssl.create_default_context(cafile=door.pki.ca)
    if who is not None:
        context.load_cert_chain(door.pki.clients[who].cert, door.pki.clients[who].key)
    return httpx.Client(verify=context)


def grpc_channel(door: Stack, who: str | None) -> grpc.Channel:
    assert door.pki is not None
    pair = door.pki.clients[who] if who is not None else None
    credentials = grpc.ssl_channel_credentials(door.pki.ca.read_bytes(),
                                               pair.key.read_bytes() if pair else None,
                                               pair.cert.read_bytes() if pair else None)
    return grpc.secure_channel(door.grpc, credentials)


def begin(client: httpx.Client, door: Stack, cell: str, owner: int, value: str,
          headers: dict[str, str] = CLAIMS_AUTH) -> httpx.Response:
    body = {"cell_id": cell, "owner_type": "USER", "owner_id": owner, "claims": [{"bucket": "USERNAME", "value": value}]}
    return client.post(f"{door.http}/v1/claims", json=body, headers=headers, timeout=30)


def refused_for_the_cell(answer: httpx.Response, bound: str, named: str) -> None:
    assert answer.status_code == 403, answer.text
    error = answer.json()["error"]
    assert error["code"] == "wrong_cell" and bound in error["message"] and named in error["message"], error


def test_mutual_tls_on_both_ports_and_certificates_bound_to_a_cell(topics: Settings, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with stack(topics, tmp_path, pki) as door:
        before = published(door.settings)
        # No client certificate, or one from a CA the server does not trust: no HTTP answer at all.
        for who in (None, "stranger"):
            with http_client(door, who) as client, pytest.raises(httpx.TransportError):
                begin(client, door, "cell-1", 1, "nobody")
        # Plain HTTP on the TLS port is no way around it.
        with httpx.Client() as plain, pytest.raises(httpx.TransportError):
            begin(plain, door, "cell-1", 1, "nobody")

        with http_client(door, "cell-1") as cell_1, http_client(door, "admin") as admin:
            # The certificate binds; the token (unbound, every scope) does not widen it.
            refused_for_the_cell(begin(cell_1, door, "cell-2", 2, "intruder"), "cell-1", "cell-2")
            assert published(door.settings) == before  # nothing published for a refused request
            # The HTTP API still wants its bearer token beside the certificate.
            assert begin(cell_1, door, "cell-1", 1, "ada", headers={}).status_code == 401
            assert published(door.settings) == before

            granted = begin(cell_1, door, "cell-1", 1, "ada")
            assert granted.status_code == 201, granted.text
            assert published(door.settings) == before + 1
            lease = granted.json()["decisions"][0]["lease_id"]
            # Committing cell-1's lease while naming cell-2: refused at the door, not by the decider.
            refused_for_the_cell(cell_1.post(f"{door.http}/v1/leases/{lease}/commit", json={"cell_id": "cell-2"},
                                             headers=CLAIMS_AUTH, timeout=30), "cell-1", "cell-2")
            assert published(door.settings) == before + 1
            committed = cell_1.post(f"{door.http}/v1/leases/{lease}/commit", json={"cell_id": "cell-1"},
                                    headers=CLAIMS_AUTH, timeout=30)
            assert committed.status_code == 200, committed.text
            # The admin's certificate acts for any cell.
            assert begin(admin, door, "cell-2", 2, "grace").status_code == 201
            # Reads name no cell: any verified certificate with a token reads.
            assert cell_1.get(f"{door.http}/v1/claims/USERNAME/grace", headers=CLAIMS_AUTH).json()["cell_id"] == "cell-2"

        # gRPC: the same CA, the same rules; a verified certificate authenticates a call on its own.
        # No certificate, or another CA's: the handshake fails (UNAVAILABLE), no RPC runs.
        for who in (None, "stranger"):
            with grpc_channel(door, who) as channel:
                stub = claims_pb2_grpc.ClaimServiceStub(channel)
                for method, request in ((stub.GetCells, cell_info_pb2.GetCellsRequest()),
                                        (stub.BeginUpdate, grpc_begin(1, "nobody-grpc"))):
                    with pytest.raises(grpc.RpcError) as failed:
                        method(request, timeout=10)
                    assert failed.value.code() == Code.UNAVAILABLE, who
        assert published(door.settings) == before + 3  # begin, commit, the admin's begin: none of these
        with grpc_channel(door, "cell-1") as channel:
            stub = claims_pb2_grpc.ClaimServiceStub(channel)
            assert sorted(c.id for c in stub.GetCells(cell_info_pb2.GetCellsRequest(), timeout=10).cells) == [1, 2]
            # A certificate bound to cell-1 acting for cell-2: refused before anything is published.
            for call in (lambda: stub.ListLeases(claims_pb2.ListLeasesRequest(cell_id=2), timeout=10),
                         lambda: stub.BeginUpdate(grpc_begin(2, "intruder-grpc"), timeout=10),
                         lambda: stub.CommitUpdate(claims_pb2.CommitUpdateRequest(
                             cell_id=2, lease_uuid=uuid_pb2.UUID(value=lease)), timeout=10)):
                with pytest.raises(grpc.RpcError) as other_cell:
                    call()
                assert other_cell.value.code() == Code.PERMISSION_DENIED
                assert "bound to cell-1; it may not act for cell-2" in (other_cell.value.details() or "")
            with pytest.raises(grpc.RpcError) as admin_only:
                stub.GetRecord(claims_pb2.GetRecordRequest(), timeout=10)
            assert admin_only.value.code() == Code.PERMISSION_DENIED
            assert published(door.settings) == before + 3
            # Its own cell: served (adr/0022), a lease begun, listed and committed through the log.
            begun = stub.BeginUpdate(grpc_begin(1, "ada-grpc"), timeout=30)
            assert begun.cell_id == 1
            listed = stub.ListLeases(claims_pb2.ListLeasesRequest(cell_id=1), timeout=10)
            assert [lease.uuid.value for lease in listed.leases] == [begun.lease_uuid.value]
            stub.CommitUpdate(claims_pb2.CommitUpdateRequest(cell_id=1, lease_uuid=begun.lease_uuid), timeout=30)
            assert list(stub.ListLeases(claims_pb2.ListLeasesRequest(cell_id=1), timeout=10).leases) == []
            # A token sent beside the certificate must be valid.
            with pytest.raises(grpc.RpcError) as bad_token:
                stub.GetCells(cell_info_pb2.GetCellsRequest(), metadata=(("authorization", "Bearer nope-nope-nope"),),
                              timeout=10)
            assert bad_token.value.code() == Code.UNAUTHENTICATED
        assert published(door.settings) == before + 5  # and the cell's own begin and commit
        with grpc_channel(door, "admin") as channel:
            stub = claims_pb2_grpc.ClaimServiceStub(channel)
            # The admin's certificate lists any cell's leases (cell-2's: the admin's HTTP begin) and reads records.
            assert len(stub.ListLeases(claims_pb2.ListLeasesRequest(cell_id=2), timeout=10).leases) == 1
            found = stub.GetRecord(claims_pb2.GetRecordRequest(bucket=messages_pb2.Bucket(
                type=messages_pb2.Bucket.USERNAMES, value="ada-grpc")), timeout=10)
            assert (found.record.cell_id, found.cell_info.id) == (1, 1)
            with pytest.raises(grpc.RpcError) as empty:
                stub.GetRecord(claims_pb2.GetRecordRequest(), timeout=10)
            assert empty.value.code() == Code.INVALID_ARGUMENT  # past authorization: the request itself
        assert published(door.settings) == before + 5


def grpc_begin(cell_id: int, name: str) -> claims_pb2.BeginUpdateRequest:
    """A Rails sign-up's username record."""
    return claims_pb2.BeginUpdateRequest(cell_id=cell_id, create_records=[messages_pb2.Metadata(
        bucket=messages_pb2.Bucket(type=messages_pb2.Bucket.USERNAMES, value=name),
        subject=messages_pb2.Subject(type=messages_pb2.Subject.USER, id=7),
        source=messages_pb2.Source(type=messages_pb2.Source.RAILS_TABLE_USERS, rails_primary_key_id=(7).to_bytes(8, "big")))])


def test_bearer_tokens_bound_to_a_cell_over_plain_http(topics: Settings, tmp_path: Path) -> None:
    tokens = {TEST_TOKEN: ["snapshot:read"], TEST_CLAIMS_TOKEN: ["claims:read", "claims:write"],
              "cell-1-token-0123456789": {"scopes": ["claims:read", "claims:write"], "cell": "cell-1"},
              "admin-token-0123456789": {"scopes": ["claims:read", "claims:write"], "admin": True}}
    settings = topics.model_copy(update={"api_tokens": json.dumps(tokens)})
    cell_1 = {"Authorization": "Bearer cell-1-token-0123456789"}
    admin = {"Authorization": "Bearer admin-token-0123456789"}
    with stack(settings, tmp_path, None) as door, httpx.Client() as client:
        before = published(door.settings)
        refused_for_the_cell(begin(client, door, "cell-2", 2, "intruder", headers=cell_1), "cell-1", "cell-2")
        destroy = client.delete(f"{door.http}/v1/claims/USERNAME/anyone", headers=cell_1, timeout=30,
                                params={"cell_id": "cell-2", "owner_type": "USER", "owner_id": 2})
        refused_for_the_cell(destroy, "cell-1", "cell-2")
        assert published(door.settings) == before

        granted = begin(client, door, "cell-1", 1, "ada", headers=cell_1)
        assert granted.status_code == 201, granted.text
        lease = granted.json()["decisions"][0]["lease_id"]
        refused_for_the_cell(client.post(f"{door.http}/v1/leases/{lease}/rollback", json={"cell_id": "cell-2"},
                                         headers=cell_1, timeout=30), "cell-1", "cell-2")
        assert client.post(f"{door.http}/v1/leases/{lease}/commit", json={"cell_id": "cell-1"}, headers=cell_1,
                           timeout=30).status_code == 200
        assert begin(client, door, "cell-2", 2, "grace", headers=admin).status_code == 201
        # The list form of the token configuration is still valid: unbound, an admin.
        assert begin(client, door, "cell-2", 3, "linus", headers=CLAIMS_AUTH).status_code == 201
        assert published(door.settings) == before + 4


def test_topology_up_makes_a_development_ca_and_serves_mutual_tls_with_it(topics: Settings, tmp_path: Path) -> None:
    """``topology up --demo --tls`` on the tests' broker and database: it prints where the
    development CA and certificates are; a demo cell's certificate reads over gRPC and may not
    act for another cell; HTTPS wants a certificate, and the admin's works."""
    grpc_port, api_port = free_port(), free_port()
    env = {**settings_env(topics), "TOPOLOGY_GRPC_PORT": str(grpc_port)}
    data_dir = tmp_path / "data"
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "topology_store.cli", "up", "--demo", "--tls", "--data-dir",
                               str(data_dir), "--api-port", str(api_port)],
                              env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "Ctrl-C stops everything" in log.read_text() or up.poll() is not None, timeout_s=150,
                   interval_s=0.5, what="topology up to start")
        text = log.read_text()
        printed = re.search(r"TLS files\s+(\S+)", text)
        token = re.search(r"dev token\s+(\S+)", text)
        assert printed is not None and token is not None, text[-3000:]
        tls = Path(printed.group(1))
        assert tls == (data_dir / "tls").resolve()
        names = {"ca", "server", "admin", "cell-1", "cell-2", "cell-3", "cell-4"}
        assert {p.name for p in tls.glob("*.pem")} >= {f"{n}.pem" for n in names} | {f"{n}-key.pem" for n in names}
        assert (tls / "cell-1-key.pem").stat().st_mode & 0o077 == 0  # keys readable by their owner only
        pki = Pki(tls / "ca.pem", KeyPair(tls / "server.pem", tls / "server-key.pem"),
                  {n: KeyPair(tls / f"{n}.pem", tls / f"{n}-key.pem") for n in ("admin", "cell-1")})
        door = Stack(topics, f"https://127.0.0.1:{api_port}", f"127.0.0.1:{grpc_port}", pki)
        with grpc_channel(door, "cell-1") as channel:
            stub = claims_pb2_grpc.ClaimServiceStub(channel)
            assert [c.id for c in stub.GetCells(cell_info_pb2.GetCellsRequest(), timeout=10).cells] == [1, 2, 3, 4]
            with pytest.raises(grpc.RpcError) as other_cell:
                stub.ListLeases(claims_pb2.ListLeasesRequest(cell_id=3), timeout=10)
            assert other_cell.value.code() == Code.PERMISSION_DENIED
        bearer = {"Authorization": f"Bearer {token.group(1)}"}
        with http_client(door, None) as anonymous, pytest.raises(httpx.TransportError):
            anonymous.get(f"{door.http}/v1/cells", headers=bearer, timeout=10)
        with http_client(door, "admin") as admin:
            assert len(admin.get(f"{door.http}/v1/cells", headers=bearer, timeout=10).json()["cells"]) == 4
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
