"""GitLab's ClaimService over real sockets (adr/0022): BeginUpdate / CommitUpdate /
RollbackUpdate decided through the log by a ``topology project`` child, ListLeases,
ListRecords and GetRecord read from the projection, through a client built from our
generated stubs, as GitLab's Rails client calls them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import TEST_CLAIMS_TOKEN
from tests.integration.test_grpc_api import Door, stack  # noqa: F401 - the fixture
from topology_store.schemas.generated.proto.claims.v1 import messages_pb2 as m
from topology_store.schemas.generated.proto.claims.v1 import service_pb2 as s
from topology_store.schemas.generated.proto.claims.v1 import service_pb2_grpc
from topology_store.schemas.generated.proto.types.v1 import uuid_pb2

pytestmark = pytest.mark.integration

WRITE = (("authorization", f"Bearer {TEST_CLAIMS_TOKEN}"),)
Code = grpc.StatusCode


def record(bucket: int, value: str, subject: int, subject_id: int, source: int, pk: int) -> m.Metadata:
    return m.Metadata(bucket=m.Bucket(type=bucket, value=value), subject=m.Subject(type=subject, id=subject_id),
                      source=m.Source(type=source, rails_primary_key_id=pk.to_bytes(8, "big")))


def signup(n: int, cell_id: int = 2) -> s.BeginUpdateRequest:
    """What Rails sends when user ``n`` signs up: route, username and e-mail in one lease."""
    return s.BeginUpdateRequest(cell_id=cell_id, create_records=[
        record(m.Bucket.ROUTES, f"user-{n}", m.Subject.NAMESPACE, n, m.Source.RAILS_TABLE_ROUTES, n),
        record(m.Bucket.USERNAMES, f"user-{n}", m.Subject.USER, n, m.Source.RAILS_TABLE_USERS, n),
        record(m.Bucket.EMAILS, f"user-{n}@example.com", m.Subject.USER, n, m.Source.RAILS_TABLE_EMAILS, n),
    ])


@pytest.fixture
def claims(stack: Door) -> Iterator[service_pb2_grpc.ClaimServiceStub]:  # noqa: F811
    with stack.channel() as channel:
        yield service_pb2_grpc.ClaimServiceStub(channel)


def test_sign_up_begins_and_commits_one_lease(claims: service_pb2_grpc.ClaimServiceStub) -> None:
    begun = claims.BeginUpdate(signup(1), metadata=WRITE, timeout=10)
    assert begun.cell_id == 2 and begun.lease_uuid.value
    leases = claims.ListLeases(s.ListLeasesRequest(cell_id=2), metadata=WRITE, timeout=10)
    assert [lease.uuid.value for lease in leases.leases] == [begun.lease_uuid.value]
    listed = claims.ListRecords(s.ListRecordsRequest(cell_id=2), metadata=WRITE, timeout=10)
    assert {r.status for r in listed.records} == {m.Record.LEASE_CREATING}
    claims.CommitUpdate(s.CommitUpdateRequest(cell_id=2, lease_uuid=begun.lease_uuid), metadata=WRITE, timeout=10)
    listed = claims.ListRecords(s.ListRecordsRequest(cell_id=2), metadata=WRITE, timeout=10)
    assert {r.status for r in listed.records} == {m.Record.ACTIVE}
    assert len(listed.records) == 3
    assert list(claims.ListLeases(s.ListLeasesRequest(cell_id=2), metadata=WRITE, timeout=10).leases) == []
    with pytest.raises(grpc.RpcError) as taken:
        claims.BeginUpdate(signup(1, cell_id=1), metadata=WRITE, timeout=10)
    assert taken.value.code() == Code.ALREADY_EXISTS
