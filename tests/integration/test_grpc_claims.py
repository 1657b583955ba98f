"""GitLab's ClaimService over real sockets (adr/0022): BeginUpdate / CommitUpdate /
RollbackUpdate decided through the log by a ``topology project`` child, ListLeases,
ListRecords and GetRecord read from the projection, through a client built from our
generated stubs, as GitLab's Rails client calls them (issue 12, "Tests").

One stack serves the whole module (a ``topology project`` and a ``topology serve`` child
take most of a test's time): every test uses values and Rails primary keys of its own, and
the tests that count a cell's leases or records have a cell to themselves (blue-3 = 4 for
ListLeases, nonumber = 5 for ListRecords paging). Every test closes the leases it opened."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from google.protobuf import any_pb2, timestamp_pb2

from tests.conftest import (
    AUTH,
    TEST_API_TOKENS,
    TEST_CLAIMS_TOKEN,
    TEST_TOKEN,
    copy_template,
    database_url_of,
    drop_databases,
    make_settings,
)
from tests.integration.processes import wait_until
from tests.integration.test_grpc_api import Door, running
from tests.servers import Servers
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics
from topology_store.schemas.generated.proto.claims.v1 import messages_pb2 as m
from topology_store.schemas.generated.proto.claims.v1 import service_pb2 as s
from topology_store.schemas.generated.proto.claims.v1 import service_pb2_grpc
from topology_store.schemas.generated.proto.types.v1 import claim_pb2, uuid_pb2
from topology_store.service import gitlab_claims

pytestmark = pytest.mark.integration

Code = grpc.StatusCode
Metadata = tuple[tuple[str, str], ...]
#: The unbound claims token: an admin, may act for any cell (tests/conftest.py).
ADMIN: Metadata = (("authorization", f"Bearer {TEST_CLAIMS_TOKEN}"),)
#: A token bound to cell-2 (GitLab's RULE_ALLOW_MATCHING_CELL_ONLY), and the router's.
CELL_2_TOKEN = "cell-2-claims-token-0123456789"
CELL_2: Metadata = (("authorization", f"Bearer {CELL_2_TOKEN}"),)
ROUTER: Metadata = (("authorization", f"Bearer {TEST_TOKEN}"),)
#: Every cell of tests/integration/test_grpc_api.py numbered, so that three cells can race.
CELL_NUMBERS = {"legacy": 1, "cell-2": 2, "cell-3": 3, "blue-3": 4, "nonumber": 5}
CELL_NAMES = {number: name for name, number in CELL_NUMBERS.items()}
Bucket, Subject, Source, Record = m.Bucket, m.Subject, m.Source, m.Record


@dataclass(frozen=True)
class World:
    door: Door
    settings: Settings
    claims: service_pb2_grpc.ClaimServiceStub

    def rows(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.settings.libpq_url) as conn:
            return conn.execute(query, params).fetchall()

    def namespaces(self) -> dict[str, str]:
        response = httpx.get(f"{self.door.http}/v1/snapshot", headers=AUTH, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()["namespaces"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def world(servers: Servers, template_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    database = copy_template(servers, template_database)
    try:
        tokens = {**json.loads(TEST_API_TOKENS),
                  CELL_2_TOKEN: {"scopes": ["claims:read", "claims:write"], "cell": "cell-2"}}
        settings = make_settings(servers, database_url_of(servers, database)).model_copy(update={
            "api_tokens": json.dumps(tokens),
            "lease_tick_interval_s": 0.5,  # the opt-in TTL's lease ends within a second or two
            # Two cores shared with other agents: no UNAVAILABLE or load shedding (adr/0018) by slowness.
            "decision_wait_s": 10.0,
            "claims_max_wait_age_ms": 60_000,
        })
        asyncio.run(ensure_topics(settings))
        with running(settings, tmp_path_factory.mktemp("grpc-claims"), json.dumps(CELL_NUMBERS)) as door, \
                door.channel() as channel:
            yield World(door, settings, service_pb2_grpc.ClaimServiceStub(channel))
            assert "Traceback" not in door.log.read_text(), door.log.read_text()[-5000:]
    finally:
        drop_databases(servers, [database])


# --- what Rails sends ------------------------------------------------------------------------------


def pk(n: int) -> bytes:
    """A Rails primary key as Rails sends it: 8 bytes, big-endian."""
    return n.to_bytes(8, "big")


def record(bucket: int, value: str, subject: int, subject_id: int, source: int, n: int) -> m.Metadata:
    return m.Metadata(bucket=Bucket(type=bucket, value=value), subject=Subject(type=subject, id=subject_id),
                      source=Source(type=source, rails_primary_key_id=pk(n)))


def route(path: str, n: int) -> m.Metadata:
    return record(Bucket.ROUTES, path, Subject.NAMESPACE, n, Source.RAILS_TABLE_ROUTES, n)


def username(name: str, n: int) -> m.Metadata:
    return record(Bucket.USERNAMES, name, Subject.USER, n, Source.RAILS_TABLE_USERS, n)


def key(bucket: int, value: str) -> m.Metadata:
    """A record to destroy: its bucket is all that names it."""
    return m.Metadata(bucket=Bucket(type=bucket, value=value))


def signup(name: str, n: int, cell_id: int, email: str | None = None) -> s.BeginUpdateRequest:
    """What Rails sends when a user signs up: route, username and e-mail in one lease."""
    return s.BeginUpdateRequest(cell_id=cell_id, create_records=[
        route(name, n), username(name, n),
        record(Bucket.EMAILS, email or f"{name}@example.com", Subject.USER, n, Source.RAILS_TABLE_EMAILS, n),
    ])


def refused(method: Callable[..., Any], request: Any, metadata: Metadata = ADMIN, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        method(request, metadata=metadata, timeout=20, **kwargs)
    return raised.value


def begin(world: World, cell_id: int, create: list[m.Metadata] = (), destroy: list[m.Metadata] = (),  # type: ignore[assignment]
          metadata: Metadata = ADMIN) -> uuid_pb2.UUID:
    begun = world.claims.BeginUpdate(s.BeginUpdateRequest(cell_id=cell_id, create_records=create,
                                                          destroy_records=destroy), metadata=metadata, timeout=20)
    assert begun.cell_id == cell_id and uuid.UUID(begun.lease_uuid.value)
    return begun.lease_uuid


def commit(world: World, cell_id: int, lease: uuid_pb2.UUID, metadata: Metadata = ADMIN) -> None:
    world.claims.CommitUpdate(s.CommitUpdateRequest(cell_id=cell_id, lease_uuid=lease), metadata=metadata, timeout=20)


def rollback(world: World, cell_id: int, lease: uuid_pb2.UUID, metadata: Metadata = ADMIN) -> None:
    world.claims.RollbackUpdate(s.RollbackUpdateRequest(cell_id=cell_id, lease_uuid=lease), metadata=metadata,
                                timeout=20)


def records(world: World, cell_id: int, first: int, last: int, **filters: Any) -> dict[tuple[int, str], m.Record]:
    """The cell's records whose Rails primary key is in [first, last], by (bucket type, value)."""
    listed = world.claims.ListRecords(s.ListRecordsRequest(cell_id=cell_id, source_id_gt=pk(first - 1),
                                                           source_id_lte=pk(last), **filters),
                                      metadata=ADMIN, timeout=20)
    assert not listed.truncated
    found = {(r.metadata.bucket.type, r.metadata.bucket.value): r for r in listed.records}
    assert len(found) == len(listed.records)  # no record twice
    return found


def leases(world: World, cell_id: int, **request: Any) -> list[str]:
    listed = world.claims.ListLeases(s.ListLeasesRequest(cell_id=cell_id, **request), metadata=ADMIN, timeout=20)
    return [lease.uuid.value for lease in listed.leases]


def get_record(world: World, request: s.GetRecordRequest, metadata: Metadata = ADMIN) -> s.GetRecordResponse:
    return world.claims.GetRecord(request, metadata=metadata, timeout=20)


def by_route(path: str) -> s.GetRecordRequest:
    return s.GetRecordRequest(claim=claim_pb2.Claim(route=path))


def until_namespaces(world: World, check: Callable[[dict[str, str]], bool], what: str) -> dict[str, str]:
    """The snapshot (polled every second by serve) once ``check`` holds."""
    found: dict[str, str] = {}

    def ok() -> bool:
        nonlocal found
        found = world.namespaces()
        return check(found)

    wait_until(ok, timeout_s=20, interval_s=0.2, what=what)
    return found


# --- the flows Rails runs --------------------------------------------------------------------------


def test_sign_up_begins_and_commits_one_lease_and_a_second_cell_conflicts(world: World) -> None:
    lease = begin(world, 2, list(signup("ada", 100, 2).create_records))
    assert lease.value in leases(world, 2)
    opened = records(world, 2, 100, 100)
    assert {(t, r.status, r.lease_uuid.value, r.cell_id) for (t, _), r in opened.items()} == {
        (t, Record.LEASE_CREATING, lease.value, 2) for t in (Bucket.ROUTES, Bucket.USERNAMES, Bucket.EMAILS)}
    user = opened[(Bucket.USERNAMES, "ada")]
    assert (user.metadata.subject.type, user.metadata.subject.id) == (Subject.USER, 100)
    assert (user.metadata.source.type, user.metadata.source.rails_primary_key_id) == (Source.RAILS_TABLE_USERS, pk(100))
    assert opened[(Bucket.ROUTES, "ada")].metadata.subject.type == Subject.NAMESPACE
    # A second cell signing up the same name while the lease is open: taken already.
    racing = refused(world.claims.BeginUpdate, signup("ada", 200, 1, email="ada@cell-1.example.com"))
    assert racing.code() == Code.ALREADY_EXISTS and "cell-2" in racing.details(), racing.details()

    commit(world, 2, lease)
    committed = records(world, 2, 100, 100)
    assert {r.status for r in committed.values()} == {Record.ACTIVE} and len(committed) == 3
    assert all(not r.HasField("lease_uuid") for r in committed.values())
    assert lease.value not in leases(world, 2)
    assert until_namespaces(world, lambda ns: "ada" in ns, "ada routed")["ada"] == "cell-2"

    # After the commit: the same (Rails: "has already been taken"); the loser holds nothing.
    loser = signup("ada", 200, 1, email="ada@cell-1.example.com")
    taken = refused(world.claims.BeginUpdate, loser)
    assert taken.code() == Code.ALREADY_EXISTS and "held by another owner" in taken.details(), taken.details()
    assert records(world, 1, 200, 200) == {}
    assert leases(world, 1) == []
    lost_email = refused(world.claims.GetRecord, s.GetRecordRequest(claim=claim_pb2.Claim(email="ada@cell-1.example.com")))
    assert lost_email.code() == Code.NOT_FOUND  # all or nothing: its free e-mail was not taken either
    assert get_record(world, s.GetRecordRequest(claim=claim_pb2.Claim(username="ada"))).record.cell_id == 2


def test_a_rename_is_one_lease_committed(world: World) -> None:
    first = begin(world, 3, [route("rn-old", 300)])
    commit(world, 3, first)
    until_namespaces(world, lambda ns: ns.get("rn-old") == "cell-3", "rn-old routed to cell-3")

    rename = begin(world, 3, [route("rn-new", 300)], destroy=[key(Bucket.ROUTES, "rn-old")])
    during = records(world, 3, 300, 300)
    old, new = during[(Bucket.ROUTES, "rn-old")], during[(Bucket.ROUTES, "rn-new")]
    assert (old.status, old.lease_uuid.value) == (Record.LEASE_DESTROYING, rename.value)
    assert (new.status, new.lease_uuid.value) == (Record.LEASE_CREATING, rename.value)
    assert old.updated_at.ToDatetime() >= old.created_at.ToDatetime()
    # While the lease is open the old path still routes, the new one does not yet.
    namespaces = world.namespaces()
    assert namespaces.get("rn-old") == "cell-3" and "rn-new" not in namespaces
    classified = httpx.get(f"{world.door.http}/v1/classify", params={"type": "ROUTE", "value": "rn-old/project"},
                           headers=AUTH, timeout=5)
    assert classified.status_code == 200 and "cell-3" in classified.text, classified.text
    # Nobody else may take the new path meanwhile; the old one is not free either.
    for path in ("rn-new", "rn-old"):
        assert refused(world.claims.BeginUpdate, s.BeginUpdateRequest(
            cell_id=2, create_records=[route(path, 301)])).code() == Code.ALREADY_EXISTS

    commit(world, 3, rename)
    after = records(world, 3, 300, 300)
    assert list(after) == [(Bucket.ROUTES, "rn-new")] and after[(Bucket.ROUTES, "rn-new")].status == Record.ACTIVE
    routed = until_namespaces(world, lambda ns: "rn-new" in ns and "rn-old" not in ns, "the rename routed")
    assert routed["rn-new"] == "cell-3"
    classified = httpx.get(f"{world.door.http}/v1/classify", params={"type": "ROUTE", "value": "rn-old"},
                           headers=AUTH, timeout=5)
    assert classified.status_code == 404, classified.text
    assert refused(world.claims.GetRecord, by_route("rn-old")).code() == Code.NOT_FOUND
    # The old path is free again, for anyone.
    commit(world, 2, begin(world, 2, [route("rn-old", 302)]))
    assert get_record(world, by_route("rn-old")).record.cell_id == 2


def test_a_change_of_letter_case_keeps_the_claim(world: World) -> None:
    # Rails renames "rn-case" to "RN-Case": destroy the old spelling, create the new. One claim
    # to this store (unique case-insensitively): it stays, routed, through the lease (adr/0022).
    commit(world, 3, begin(world, 3, [route("rn-case", 320)]))
    until_namespaces(world, lambda ns: ns.get("rn-case") == "cell-3", "rn-case routed to cell-3")
    lease = begin(world, 3, [route("RN-Case", 320)], destroy=[key(Bucket.ROUTES, "rn-case")])
    commit(world, 3, lease)
    kept = records(world, 3, 320, 320)
    assert list(kept) == [(Bucket.ROUTES, "rn-case")] and kept[(Bucket.ROUTES, "rn-case")].status == Record.ACTIVE
    assert world.namespaces().get("rn-case") == "cell-3"


def test_a_rename_rolled_back_leaves_both_as_before(world: World) -> None:
    commit(world, 3, begin(world, 3, [route("rb-old", 310), username("rb-old", 310)]))
    before = records(world, 3, 310, 310)
    until_namespaces(world, lambda ns: ns.get("rb-old") == "cell-3", "rb-old routed")
    rename = begin(world, 3, [route("rb-new", 310), username("rb-new", 310)],
                   destroy=[key(Bucket.ROUTES, "rb-old"), key(Bucket.USERNAMES, "rb-old")])
    assert {v: r.status for (_, v), r in records(world, 3, 310, 310).items()} == {
        "rb-old": Record.LEASE_DESTROYING, "rb-new": Record.LEASE_CREATING}
    rollback(world, 3, rename)
    after = records(world, 3, 310, 310)
    assert after == before  # the same records, ACTIVE, the same ids and times
    assert {r.status for r in after.values()} == {Record.ACTIVE}
    assert rename.value not in leases(world, 3)
    namespaces = world.namespaces()
    assert namespaces.get("rb-old") == "cell-3" and "rb-new" not in namespaces
    # rb-new was never taken: another cell may have it; rb-old may be destroyed by its cell.
    commit(world, 1, begin(world, 1, [route("rb-new", 311)]))
    commit(world, 3, begin(world, 3, destroy=[key(Bucket.ROUTES, "rb-old")]))
    assert list(records(world, 3, 310, 310)) == [(Bucket.USERNAMES, "rb-old")]


def test_who_may_destroy_commit_and_roll_back(world: World) -> None:
    commit(world, 2, begin(world, 2, [username("dr-a", 400)]))
    wrong_cell = refused(world.claims.BeginUpdate, s.BeginUpdateRequest(cell_id=1, destroy_records=[
        key(Bucket.USERNAMES, "dr-a")]))
    assert wrong_cell.code() == Code.PERMISSION_DENIED and "another cell" in wrong_cell.details(), wrong_cell.details()
    unclaimed = refused(world.claims.BeginUpdate, s.BeginUpdateRequest(cell_id=2, destroy_records=[
        key(Bucket.USERNAMES, "dr-nobody")]))
    assert unclaimed.code() == Code.NOT_FOUND and "not claimed" in unclaimed.details(), unclaimed.details()
    # The refused destroys changed nothing, and left no lease behind.
    assert records(world, 2, 400, 400)[(Bucket.USERNAMES, "dr-a")].status == Record.ACTIVE
    assert leases(world, 1) == []

    lease = begin(world, 2, [username("dr-b", 401)])
    # Only the cell that began a lease commits or rolls it back.
    for method, request in ((world.claims.CommitUpdate, s.CommitUpdateRequest(cell_id=1, lease_uuid=lease)),
                            (world.claims.RollbackUpdate, s.RollbackUpdateRequest(cell_id=1, lease_uuid=lease))):
        other = refused(method, request)
        assert other.code() == Code.PERMISSION_DENIED and "cell-2" in other.details(), other.details()
    # A lease that is destroying a record or creating one: its records cannot be destroyed meanwhile
    # (by another request: the same bytes again would be a retry of the first, and get its lease).
    destroying = begin(world, 2, destroy=[key(Bucket.USERNAMES, "dr-a")])
    for value in ("dr-a", "dr-b"):
        busy = refused(world.claims.BeginUpdate, s.BeginUpdateRequest(cell_id=2, create_records=[
            username("dr-z", 403)], destroy_records=[key(Bucket.USERNAMES, value)]))
        assert busy.code() == Code.FAILED_PRECONDITION and "open lease" in busy.details(), busy.details()
    rollback(world, 2, destroying)

    unknown = uuid_pb2.UUID(value=str(uuid.uuid4()))
    for method, request in ((world.claims.CommitUpdate, s.CommitUpdateRequest(cell_id=2, lease_uuid=unknown)),
                            (world.claims.RollbackUpdate, s.RollbackUpdateRequest(cell_id=2, lease_uuid=unknown))):
        assert refused(method, request).code() == Code.NOT_FOUND
    # Commit twice: OK both times (Rails retries); a rollback after the commit: too late.
    commit(world, 2, lease)
    commit(world, 2, lease)
    late = refused(world.claims.RollbackUpdate, s.RollbackUpdateRequest(cell_id=2, lease_uuid=lease))
    assert late.code() == Code.FAILED_PRECONDITION and "committed" in late.details(), late.details()
    assert records(world, 2, 401, 401)[(Bucket.USERNAMES, "dr-b")].status == Record.ACTIVE
    # Rolled back twice: OK both times; a commit after it: the lease is gone.
    gone = begin(world, 2, [username("dr-c", 402)])
    rollback(world, 2, gone)
    rollback(world, 2, gone)
    assert refused(world.claims.CommitUpdate, s.CommitUpdateRequest(cell_id=2, lease_uuid=gone)).code() == \
        Code.NOT_FOUND
    assert records(world, 2, 402, 402) == {}
    # Its own cell destroys it: gone at the commit.
    commit(world, 2, begin(world, 2, destroy=[key(Bucket.USERNAMES, "dr-a")]))
    assert records(world, 2, 400, 400) == {}


# --- ListLeases and Rails' reconciliation ----------------------------------------------------------


def list_all(world: World, cell_id: int, limit: int, created_after: datetime | None = None
             ) -> tuple[list[m.LeaseRecord], int]:
    """Every page of ListLeases, as Rails walks them (``next`` handed back until absent)."""
    listed: list[m.LeaseRecord] = []
    cursor: any_pb2.Any | None = None
    pages = 0
    while True:
        request = s.ListLeasesRequest(cell_id=cell_id, limit=limit)
        if created_after is not None:
            request.created_after.FromDatetime(created_after)
        if cursor is not None:
            request.next.CopyFrom(cursor)
        response = world.claims.ListLeases(request, metadata=ADMIN, timeout=20)
        pages += 1
        listed += response.leases
        if not response.HasField("next"):
            return listed, pages
        assert len(response.leases) == limit
        cursor = response.next


def test_list_leases_pages_and_rails_reconciliation(world: World) -> None:
    cell = 4  # blue-3: this test's alone
    started = datetime.now(UTC)
    local = begin(world, cell, [username("rc-local", 500)])  # Rails still has its outstanding lease
    lost = begin(world, cell, [username("rc-lost", 501)])  # Rails lost it (a crash after BeginUpdate)
    wait_until(lambda: datetime.now(UTC) > started + timedelta(seconds=1.2), interval_s=0.05, what="a second")
    stale_before = datetime.now(UTC)  # GitLab's LEASE_STALENESS_THRESHOLD, scaled down
    fresh = begin(world, cell, [username("rc-fresh", 502)])  # in flight: neither stale nor ended

    # limit=1 over 3 leases: each visited exactly once, in the order they were granted.
    one_by_one, pages = list_all(world, cell, limit=1)
    assert [lease.uuid.value for lease in one_by_one] == [local.value, lost.value, fresh.value]
    assert pages == 3
    created = [lease.created_at.ToDatetime(tzinfo=UTC) for lease in one_by_one]
    assert started - timedelta(seconds=5) < created[0] <= created[1] < stale_before < created[2]
    assert leases(world, cell, created_after=timestamp_of(stale_before)) == [fresh.value]
    assert leases(world, cell, created_after=timestamp_of(datetime.now(UTC) + timedelta(minutes=1))) == []
    assert leases(world, cell) == [local.value, lost.value, fresh.value]  # no limit: GitLab's default

    # Rails' ReconciliationService (app/services/cells/leases/reconciliation_service.rb): leases
    # created in the window, page by page; stale ones Rails still has are committed, stale ones
    # only the Topology Service knows are rolled back, fresh ones left pending.
    outstanding = {local.value}
    committed, rolled_back, pending = [], [], []
    cursor: any_pb2.Any | None = None
    while True:
        request = s.ListLeasesRequest(cell_id=cell, limit=2, created_after=timestamp_of(started - timedelta(hours=2)))
        if cursor is not None:
            request.next.CopyFrom(cursor)
        response = world.claims.ListLeases(request, metadata=ADMIN, timeout=20)
        if not response.leases:
            break
        for lease in response.leases:
            stale = lease.created_at.ToDatetime(tzinfo=UTC) < stale_before
            if stale and lease.uuid.value in outstanding:
                commit(world, cell, lease.uuid)
                committed.append(lease.uuid.value)
            elif stale:
                rollback(world, cell, lease.uuid)
                rolled_back.append(lease.uuid.value)
            else:
                pending.append(lease.uuid.value)
        if not response.HasField("next"):
            break
        cursor = response.next
    assert (committed, rolled_back, pending) == ([local.value], [lost.value], [fresh.value])
    assert leases(world, cell) == [fresh.value]  # the reconciled ones are no longer listed
    assert {v: r.status for (_, v), r in records(world, cell, 500, 502).items()} == {
        "rc-local": Record.ACTIVE, "rc-fresh": Record.LEASE_CREATING}
    rollback(world, cell, fresh)
    assert leases(world, cell) == []
    assert list_all(world, cell, limit=1) == ([], 1)


def timestamp_of(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


# --- ListRecords and GetRecord ---------------------------------------------------------------------


def test_list_records_pages_by_rails_source_id(world: World) -> None:
    cell, users = 5, 550  # nonumber: this test's alone; two records a user, more than a page
    assert 2 * users > gitlab_claims.RECORDS_PAGE
    expected = {(t, f"pg-{n}") for n in range(1, users + 1) for t in (Bucket.ROUTES, Bucket.USERNAMES)}
    batch = 50  # 100 records a BeginUpdate, GitLab's most
    for first in range(1, users + 1, batch):
        created = [r for n in range(first, first + batch) for r in (route(f"pg-{n}", n), username(f"pg-{n}", n))]
        commit(world, cell, begin(world, cell, created))

    def page(**request: Any) -> s.ListRecordsResponse:
        return world.claims.ListRecords(s.ListRecordsRequest(cell_id=cell, **request), metadata=ADMIN, timeout=30)

    first_page = page()
    assert first_page.truncated and 0 < len(first_page.records) <= gitlab_claims.RECORDS_PAGE
    ids = [int.from_bytes(r.metadata.source.rails_primary_key_id, "big") for r in first_page.records]
    assert ids == sorted(ids)  # in source id order
    rest = page(source_id_gt=pk(ids[-1]))  # Rails' next page: past the last id it saw
    assert not rest.truncated
    later = [int.from_bytes(r.metadata.source.rails_primary_key_id, "big") for r in rest.records]
    assert min(later) > ids[-1]  # no Rails row split across pages, none listed twice
    listed = [(r.metadata.bucket.type, r.metadata.bucket.value) for r in (*first_page.records, *rest.records)]
    assert len(listed) == len(expected) and set(listed) == expected
    assert {(r.cell_id, r.status) for r in (*first_page.records, *rest.records)} == {(5, Record.ACTIVE)}

    usernames = page(bucket_types=[Bucket.USERNAMES])
    assert not usernames.truncated and len(usernames.records) == users
    assert {r.metadata.bucket.type for r in usernames.records} == {Bucket.USERNAMES}
    assert {r.metadata.source.type for r in page(claim_types=[claim_pb2.CLAIM_TYPE_ROUTE]).records} == {Source.RAILS_TABLE_ROUTES}
    assert len(page(source_type=Source.RAILS_TABLE_USERS).records) == users
    window = page(source_id_gt=pk(10), source_id_lte=pk(20))
    assert sorted({int.from_bytes(r.metadata.source.rails_primary_key_id, "big") for r in window.records}) == \
        list(range(11, 21))
    assert len(window.records) == 20
    assert page(source_id_gt=pk(users)).records == []
    assert page(bucket_types=[Bucket.EMAILS]).records == []


def test_get_record_answers_admins_with_the_cell(world: World) -> None:
    records_of_grace = list(signup("grace", 600, 2).create_records)
    user_data = any_pb2.Any()
    user_data.Pack(timestamp_pb2.Timestamp(seconds=1_700_000_000))  # any message Rails keeps beside a record
    records_of_grace[1].user_data.CopyFrom(user_data)
    commit(world, 2, begin(world, 2, records_of_grace))
    found = get_record(world, s.GetRecordRequest(bucket=Bucket(type=Bucket.USERNAMES, value="Grace")))
    assert (found.record.cell_id, found.record.status) == (2, Record.ACTIVE)
    assert found.record.metadata.source.rails_primary_key_id == pk(600)
    assert found.record.metadata.user_data == user_data  # given back as sent
    assert (found.cell_info.id, found.cell_info.address) == (2, "cell-2.example.com:8443")
    assert found.cell_info.session_prefix == "cell-2-"
    # The typed claim form, an e-mail by its clear value, and a route the router knows.
    assert get_record(world, s.GetRecordRequest(claim=claim_pb2.Claim(email="grace@example.com"))).record.cell_id == 2
    assert get_record(world, by_route("grace")).record.uuid.value == \
        get_record(world, by_route("grace")).record.uuid.value  # stable
    seeded = get_record(world, by_route("gitlab-org"))  # claimed by our own API, not by Rails
    assert (seeded.record.cell_id, seeded.cell_info.id) == (2, 2)
    assert refused(world.claims.GetRecord, by_route("nobody-here")).code() == Code.NOT_FOUND
    # Admin only (RULE_ALLOW_ANY_ADMIN): a credential bound to a cell may not, even its own.
    bound = refused(world.claims.GetRecord, by_route("grace"), metadata=CELL_2)
    assert bound.code() == Code.PERMISSION_DENIED and "admin" in bound.details(), bound.details()
    assert refused(world.claims.GetRecord, by_route("grace"), metadata=ROUTER).code() == Code.PERMISSION_DENIED
    # A record being destroyed: LEASE_DESTROYING, with the destroying lease.
    destroying = begin(world, 2, destroy=[key(Bucket.EMAILS, "GRACE@Example.com")])  # the same e-mail, any case
    marked = get_record(world, s.GetRecordRequest(claim=claim_pb2.Claim(email="grace@example.com"))).record
    assert (marked.status, marked.lease_uuid.value) == (Record.LEASE_DESTROYING, destroying.value)
    commit(world, 2, destroying)
    assert refused(world.claims.GetRecord, s.GetRecordRequest(claim=claim_pb2.Claim(email="grace@example.com"))
                   ).code() == Code.NOT_FOUND
    # The cell-bound credential acts for its own cell, and for no other: refused at the door,
    # nothing published.
    mine = begin(world, 2, [username("grace-2", 601)], metadata=CELL_2)
    commit(world, 2, mine, metadata=CELL_2)
    before = decided(world)
    other = refused(world.claims.BeginUpdate, s.BeginUpdateRequest(cell_id=1, create_records=[username("grace-3", 602)]),
                    metadata=CELL_2)
    assert other.code() == Code.PERMISSION_DENIED and "cell-2" in other.details()
    assert refused(world.claims.CommitUpdate, s.CommitUpdateRequest(cell_id=1, lease_uuid=mine),
                   metadata=CELL_2).code() == Code.PERMISSION_DENIED
    assert refused(world.claims.ListLeases, s.ListLeasesRequest(cell_id=1), metadata=CELL_2).code() == \
        Code.PERMISSION_DENIED
    rollback(world, 2, begin(world, 2, [username("grace-4", 603)], metadata=CELL_2))  # decided after those
    assert decided(world) == before + 2


# --- retries, TTL, races ---------------------------------------------------------------------------


@pytest.mark.both_brokers  # a request published twice: the broker's duplicates and ordering
def test_a_retried_begin_update_gets_the_same_lease(world: World) -> None:
    request = signup("retry", 700, 1)
    # Rails' deadline is about 0.3 s; this one is shorter than any decision: the call fails
    # (the client's deadline, or the door's UNAVAILABLE: published, not decided yet), its request
    # published or not. Rails retries both; the retry must not conflict with the first.
    with pytest.raises(grpc.RpcError) as timed_out:
        world.claims.BeginUpdate(request, metadata=ADMIN, timeout=0.02)
    assert timed_out.value.code() in (Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE), timed_out.value
    first = world.claims.BeginUpdate(request, metadata=ADMIN, timeout=20).lease_uuid
    again = world.claims.BeginUpdate(request, metadata=ADMIN, timeout=20).lease_uuid
    assert again == first
    assert leases(world, 1) == [first.value]
    assert {r.lease_uuid.value for r in records(world, 1, 700, 700).values()} == {first.value}
    # The same bytes after that lease ended: a new attempt, a new lease.
    rollback(world, 1, first)
    second = world.claims.BeginUpdate(request, metadata=ADMIN, timeout=20).lease_uuid
    assert second != first
    assert world.claims.BeginUpdate(request, metadata=ADMIN, timeout=20).lease_uuid == second
    commit(world, 1, second)
    assert {r.status for r in records(world, 1, 700, 700).values()} == {Record.ACTIVE}
    # However many times the same bytes were begun and ended before (a route renamed back and
    # forth sends the same request each time), a retry still joins the latest attempt's lease.
    flip = s.BeginUpdateRequest(cell_id=1, create_records=[username("retry-flip", 702)])
    seen = set()
    for _ in range(gitlab_claims.ATTEMPTS + 2):
        lease = world.claims.BeginUpdate(flip, metadata=ADMIN, timeout=20).lease_uuid
        assert world.claims.BeginUpdate(flip, metadata=ADMIN, timeout=20).lease_uuid == lease
        seen.add(lease.value)
        rollback(world, 1, lease)
    assert len(seen) == gitlab_claims.ATTEMPTS + 2
    # A request refused (taken) and sent again: refused again, never another cell's lease.
    for _ in range(2):
        assert refused(world.claims.BeginUpdate, signup("retry", 701, 2)).code() == Code.ALREADY_EXISTS
    assert leases(world, 1) == []


def lease_row(world: World, lease: uuid_pb2.UUID) -> tuple[str, datetime, datetime | None]:
    rows = world.rows("SELECT status, expires_at, granted_at FROM leases WHERE lease_id = %s", uuid.UUID(lease.value))
    assert len(rows) == 1
    return rows[0]  # type: ignore[return-value]


@pytest.mark.both_brokers  # log time: Apache Kafka stamps claim requests itself (LogAppendTime), Tansu does not
def test_leases_do_not_expire_unless_a_ttl_is_asked_for(world: World) -> None:
    forever = begin(world, 3, [username("ttl-none", 800)])
    status, expires_at, _ = lease_row(world, forever)
    assert status == "OPEN" and (expires_at.year, expires_at.month, expires_at.day) == (9999, 12, 31)
    short = world.claims.BeginUpdate(s.BeginUpdateRequest(cell_id=3, create_records=[username("ttl-short", 801)]),
                                     metadata=(*ADMIN, ("x-topology-lease-ttl-ms", "1000")), timeout=20).lease_uuid
    _, short_end, short_granted = lease_row(world, short)
    assert timedelta(milliseconds=900) <= short_end - short_granted <= timedelta(seconds=3)  # from the decision
    # The projector's ticks (every 0.5 s here) end the short one; the other stays open.
    wait_until(lambda: lease_row(world, short)[0] == "RELEASED", timeout_s=30, interval_s=0.2,
               what="the 1 s lease expired by a tick")
    assert world.rows("SELECT cause FROM leases WHERE lease_id = %s", uuid.UUID(short.value)) == [("EXPIRED",)]
    expired = refused(world.claims.CommitUpdate, s.CommitUpdateRequest(cell_id=3, lease_uuid=short))
    assert expired.code() == Code.FAILED_PRECONDITION and "expired" in expired.details(), expired.details()
    assert lease_row(world, forever)[0] == "OPEN"
    assert forever.value in leases(world, 3) and short.value not in leases(world, 3)
    # Its value is free again; the lease without TTL still holds its own.
    commit(world, 2, begin(world, 2, [username("ttl-short", 802)]))
    assert refused(world.claims.BeginUpdate, s.BeginUpdateRequest(
        cell_id=2, create_records=[username("ttl-none", 803)])).code() == Code.ALREADY_EXISTS
    commit(world, 3, forever)
    assert lease_row(world, forever)[0] == "COMMITTED"


@pytest.mark.both_brokers  # concurrent producers onto the same partitions
def test_three_cells_race_for_the_same_values(world: World) -> None:
    values = [f"race-{k}" for k in range(6)]
    cells = (1, 2, 3)
    barrier = threading.Barrier(len(values) * len(cells))

    def claim(value: str, cell: int) -> tuple[str, int, Code, str | None]:
        n = 900 + 10 * values.index(value) + cell
        request = s.BeginUpdateRequest(cell_id=cell, create_records=[route(value, n), username(value, n)])
        barrier.wait(timeout=30)
        try:
            lease = world.claims.BeginUpdate(request, metadata=ADMIN, timeout=30).lease_uuid.value
        except grpc.RpcError as error:
            return value, cell, error.code(), None
        return value, cell, Code.OK, lease

    with ThreadPoolExecutor(len(values) * len(cells)) as pool:
        outcomes = list(pool.map(lambda vc: claim(*vc), [(v, c) for v in values for c in cells]))
    winners = {}
    for value in values:
        codes = sorted((code.name, cell) for v, cell, code, _ in outcomes if v == value)
        assert [name for name, _ in codes].count("OK") == 1, (value, codes)
        assert [name for name, _ in codes].count("ALREADY_EXISTS") == 2, (value, codes)
        winners[value] = next((cell, lease) for v, cell, code, lease in outcomes if v == value and code == Code.OK)
    for value, (cell, lease) in winners.items():
        commit(world, cell, uuid_pb2.UUID(value=lease))
        assert get_record(world, s.GetRecordRequest(claim=claim_pb2.Claim(username=value))).record.cell_id == cell
        assert get_record(world, by_route(value)).record.cell_id == cell
    routed = until_namespaces(world, lambda ns: all(v in ns for v in values), "every race's winner routed")
    assert {v: CELL_NUMBERS[routed[v]] for v in values} == {v: c for v, (c, _) in winners.items()}
    for cell in cells:  # the losers hold nothing and kept no lease
        assert leases(world, cell) == []
        held = records(world, cell, 900, 999)
        assert {v for (_, v) in held} == {v for v, (c, _) in winners.items() if c == cell}


# --- bad input -------------------------------------------------------------------------------------


def bad_inputs() -> list[tuple[str, Any, str]]:
    """(RPC, request, what the message says) of requests that are INVALID_ARGUMENT."""
    good = username("bad-x", 1)

    def begin_with(*create: m.Metadata, destroy: tuple[m.Metadata, ...] = ()) -> s.BeginUpdateRequest:
        return s.BeginUpdateRequest(cell_id=2, create_records=create, destroy_records=destroy)

    wrong_type = any_pb2.Any()
    wrong_type.Pack(timestamp_pb2.Timestamp(seconds=1))
    bad_cursor = any_pb2.Any()
    bad_cursor.Pack(m.LeaseRecord(uuid=uuid_pb2.UUID(value="not-a-uuid"), created_at=timestamp_pb2.Timestamp(seconds=1)))
    too_late = timestamp_pb2.Timestamp(seconds=2**62)
    big_user_data = any_pb2.Any(type_url="type.googleapis.com/x.Y", value=b"x" * 5000)
    return [
        ("BeginUpdate", s.BeginUpdateRequest(cell_id=2), "names no record"),
        ("BeginUpdate", begin_with(record(99, "bad-x", Subject.USER, 1, Source.RAILS_TABLE_USERS, 1)), "bucket type 99"),
        ("BeginUpdate", begin_with(record(Bucket.USERNAMES, "bad-x", 42, 1, Source.RAILS_TABLE_USERS, 1)),
         "subject.type"),
        ("BeginUpdate", begin_with(record(Bucket.USERNAMES, "bad-x", Subject.USER, 1, 77, 1)), "source.type 77"),
        ("BeginUpdate", begin_with(record(Bucket.USERNAMES, "", Subject.USER, 1, Source.RAILS_TABLE_USERS, 1)),
         "create_records[0].bucket.value"),
        ("BeginUpdate", begin_with(record(Bucket.UNSPECIFIED, "x", Subject.USER, 1, Source.RAILS_TABLE_USERS, 1)),
         "bucket.type is missing"),
        ("BeginUpdate", begin_with(good, destroy=(key(Bucket.USERNAMES, " "),)), "destroy_records[0].bucket.value"),
        ("BeginUpdate", begin_with(good, destroy=(key(99, "x"),)), "bucket type 99"),
        ("BeginUpdate", begin_with(m.Metadata(bucket=Bucket(type=Bucket.USERNAMES, value="bad-x"))), "subject.type"),
        ("BeginUpdate", begin_with(record(Bucket.USER_IDS, "abc", Subject.USER, 1, Source.RAILS_TABLE_USERS, 1)),
         "positive integer"),
        ("BeginUpdate", begin_with(record(Bucket.USERNAMES, "bad-x", Subject.USER, -1, Source.RAILS_TABLE_USERS, 1)),
         "must not be negative"),
        ("BeginUpdate", begin_with(m.Metadata(bucket=good.bucket, subject=good.subject, source=Source(
            type=Source.RAILS_TABLE_USERS, rails_primary_key_id=b"\x01" * 65))), "longer than 64 bytes"),
        ("BeginUpdate", begin_with(m.Metadata(bucket=good.bucket, subject=good.subject, source=good.source,
                                              user_data=big_user_data)), "user_data"),
        ("BeginUpdate", begin_with(*[username(f"bad-{i}", i) for i in range(101)]), "at most 100"),
        ("BeginUpdate", begin_with(*[username(f"bad-{i}", i) for i in range(60)],
                                   destroy=tuple(key(Bucket.USERNAMES, f"gone-{i}") for i in range(41))), "at most 100"),
        ("BeginUpdate", begin_with(good, username("BAD-X", 2)), "each (bucket, value) once"),
        ("CommitUpdate", s.CommitUpdateRequest(cell_id=2), "lease_uuid is missing"),
        ("CommitUpdate", s.CommitUpdateRequest(cell_id=2, lease_uuid=uuid_pb2.UUID(value="zzz")), "is not a UUID"),
        ("RollbackUpdate", s.RollbackUpdateRequest(cell_id=2, lease_uuid=uuid_pb2.UUID(value="1234-")),
         "is not a UUID"),
        ("ListLeases", s.ListLeasesRequest(cell_id=2, limit=0), "limit must be 1..1000"),
        ("ListLeases", s.ListLeasesRequest(cell_id=2, limit=5000), "limit must be 1..1000"),
        ("ListLeases", s.ListLeasesRequest(cell_id=2, limit=-1), "limit must be 1..1000"),
        ("ListLeases", s.ListLeasesRequest(cell_id=2, next=wrong_type), "next must be the cursor"),
        ("ListLeases", s.ListLeasesRequest(cell_id=2, next=bad_cursor), "next.uuid"),
        ("ListLeases", s.ListLeasesRequest(cell_id=2, created_after=too_late), "created_after"),
        ("ListLeases", s.ListLeasesRequest(cell_id=2, created_after=timestamp_pb2.Timestamp(nanos=-5)), "created_after"),
        ("ListRecords", s.ListRecordsRequest(cell_id=2, bucket_types=[99]), "type 99"),
        ("ListRecords", s.ListRecordsRequest(cell_id=2, claim_types=[42]), "type 42"),
        ("ListRecords", s.ListRecordsRequest(cell_id=2, source_type=77), "source_type 77"),
        ("GetRecord", s.GetRecordRequest(), "neither a claim nor a bucket"),
        ("GetRecord", s.GetRecordRequest(bucket=Bucket(type=99, value="x")), "bucket type 99"),
        ("GetRecord", s.GetRecordRequest(bucket=Bucket(type=Bucket.USERNAMES)), "value"),
        ("GetRecord", s.GetRecordRequest(claim=claim_pb2.Claim(email="no-at-sign")), "value"),
    ]


def decided(world: World) -> int:
    """How many requests were decided (lease expiry ticks aside)."""
    return int(world.rows("SELECT count(*) FROM processed_events WHERE event_type <> 'LeaseExpiryTick'")[0][0])


def test_bad_input_is_invalid_argument_with_what_is_wrong(world: World) -> None:
    decided_before = decided(world)
    for rpc, request, fragment in bad_inputs():
        error = refused(getattr(world.claims, rpc), request)
        assert (error.code(), fragment in (error.details() or "")) == (Code.INVALID_ARGUMENT, True), \
            (rpc, request, error.code(), error.details())
    for ttl in ("abc", "500", "-1", str(10**12)):
        error = refused(world.claims.BeginUpdate, signup("bad-ttl", 1, 2),
                        metadata=(*ADMIN, ("x-topology-lease-ttl-ms", ttl)))
        assert error.code() == Code.INVALID_ARGUMENT and "x-topology-lease-ttl-ms" in error.details(), (ttl, error)
    # Cells GitLab's numbering does not know.
    for cell_id in (0, -3, 99):
        error = refused(world.claims.BeginUpdate, signup("bad-cell", 1, cell_id))
        assert error.code() in (Code.INVALID_ARGUMENT, Code.NOT_FOUND), (cell_id, error)
        assert error.code() != Code.INVALID_ARGUMENT or "cell" in error.details()
    # Over the message size limit: refused by gRPC itself, before any handler.
    huge = s.BeginUpdateRequest(cell_id=2, create_records=[
        record(Bucket.USERNAMES, f"huge-{i}", Subject.USER, i, Source.RAILS_TABLE_USERS, i) for i in range(100)])
    for r in huge.create_records:
        r.user_data.CopyFrom(any_pb2.Any(type_url="type.googleapis.com/x.Y", value=b"u" * 1000))
    assert huge.ByteSize() > world.settings.api_max_body_bytes
    assert refused(world.claims.BeginUpdate, huge).code() == Code.RESOURCE_EXHAUSTED
    # None of it reached the log: nothing decided, nothing held. A good begin and rollback
    # afterwards are decided, and are all that was.
    rollback(world, 2, begin(world, 2, [username("bad-sentinel", 1)]))
    assert decided(world) == decided_before + 2
    assert world.rows("SELECT count(*) FROM claims WHERE value LIKE 'bad-%%' OR value LIKE 'huge-%%'") == [(0,)]
    assert "Traceback" not in world.door.log.read_text()
