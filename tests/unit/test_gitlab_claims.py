"""GitLab's ClaimService mapped onto our claims (service/gitlab_claims.py, adr/0022): buckets,
BeginUpdate onto a ClaimsRequested, a begin's request id from its content, decisions onto
status codes, rows onto Records. Pure: no server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import any_pb2

from topology_store.schemas.generated.proto.claims.v1 import messages_pb2 as m
from topology_store.schemas.generated.proto.claims.v1 import service_pb2 as s
from topology_store.schemas.generated.proto.types.v1 import claim_pb2
from topology_store.schemas.models import ClaimBucket, OwnerType, stored_claim_value
from topology_store.service import gitlab_claims as g
from topology_store.service.admission import Overloaded
from topology_store.service.claims import Decided, NotPublished, Pending, RequestDecision
from topology_store.service.gitlab_classify import Refusal

AT = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def metadata(bucket: int, value: str, pk: int = 7, subject: int = m.Subject.USER) -> m.Metadata:
    return m.Metadata(bucket=m.Bucket(type=bucket, value=value), subject=m.Subject(type=subject, id=pk),
                      source=m.Source(type=m.Source.RAILS_TABLE_USERS, rails_primary_key_id=pk.to_bytes(8, "big")))


def signup() -> s.BeginUpdateRequest:
    return s.BeginUpdateRequest(cell_id=1, create_records=[
        metadata(m.Bucket.ROUTES, "Alice"), metadata(m.Bucket.USERNAMES, "alice"),
        metadata(m.Bucket.EMAILS, "alice@example.com")])


def test_every_gitlab_bucket_maps_to_one_of_ours_and_back() -> None:
    numbers = [n for n in m.Bucket.Type.values() if n != m.Bucket.UNSPECIFIED]
    assert sorted(g.BUCKETS) == sorted(numbers)
    assert {g.GITLAB_BUCKETS[g.BUCKETS[n]] for n in numbers} == set(numbers)
    assert set(g.CLAIM_FIELDS.values()) == {f.name for f in claim_pb2.Claim.DESCRIPTOR.oneofs_by_name["claim"].fields}
    # Claim types are numbered as buckets.
    assert all(claim_pb2.ClaimType.Name(n) == "CLAIM_TYPE_" + g.CLAIM_FIELDS[n].upper() for n in numbers)


def test_a_top_level_route_is_a_namespace_and_a_nested_one_a_route() -> None:
    assert g.our_bucket(m.Bucket.ROUTES, "gitlab-org") is ClaimBucket.NAMESPACE
    assert g.our_bucket(m.Bucket.ROUTES, "gitlab-org/gitlab") is ClaimBucket.ROUTE
    assert g.lookup_keys([m.Bucket.ROUTES], []) == ["NAMESPACE", "ROUTE"]
    assert g.lookup_keys([], []) is None
    with pytest.raises(Refusal) as bad:
        g.our_bucket(99, "x")
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "99" in bad.value.message


def test_begin_update_becomes_one_claims_requested() -> None:
    request = signup()
    request.destroy_records.append(metadata(m.Bucket.ROUTES, "old-alice"))
    request.create_records[1].user_data.CopyFrom(any_pb2.Any(type_url="type.example/x", value=b"\x01"))
    command = g.begin_command(request, "cell-1", uuid.UUID(int=5), 0, "grpc@test")
    assert [(c.bucket.value, c.value) for c in command.claims] == [
        ("NAMESPACE", "alice"), ("USERNAME", "alice"), ("EMAIL", "alice@example.com")]
    assert [(c.bucket.value, c.value, c.metadata) for c in command.destroy_claims] == [("NAMESPACE", "old-alice", None)]
    first = command.claims[1].metadata
    assert first is not None
    assert (first.owner_type, first.owner_id, first.source_type) == (OwnerType.USER, 7, "RAILS_TABLE_USERS")
    assert first.source_id == (7).to_bytes(8, "big")
    assert any_pb2.Any.FromString(first.user_data or b"").type_url == "type.example/x"
    assert (command.owner_type, command.owner_id, command.lease_ttl_ms) == (OwnerType.USER, 7, 0)
    assert command.event_id == uuid.UUID(int=5)


@pytest.mark.parametrize(("change", "says"), [
    (lambda r: r.ClearField("create_records"), "no record"),
    (lambda r: r.create_records[0].bucket.__setattr__("type", 0), "create_records[0].bucket.type"),
    (lambda r: r.create_records[1].bucket.__setattr__("value", ""), "create_records[1].bucket.value"),
    (lambda r: r.create_records[2].bucket.__setattr__("value", "no-at-sign"), "local@domain"),
    (lambda r: r.create_records[0].subject.__setattr__("type", 42), "create_records[0].subject.type"),
    (lambda r: r.create_records[0].source.__setattr__("type", 77), "create_records[0].source.type"),
    (lambda r: r.create_records[0].source.__setattr__("rails_primary_key_id", b"x" * 65), "longer than 64"),
    (lambda r: r.create_records.extend([metadata(m.Bucket.PROJECT_IDS, str(n + 1)) for n in range(98)]), "at most 100"),
])
def test_bad_begin_updates_are_invalid_arguments_that_say_why(change: object, says: str) -> None:
    request = signup()
    change(request)  # type: ignore[operator]
    with pytest.raises(Refusal) as refused:
        g.begin_command(request, "cell-1", uuid.uuid4(), 0, "grpc@test")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert says in refused.value.message


def test_a_begin_retried_is_the_same_request_and_sent_again_later_a_new_one() -> None:
    ids = g.attempt_ids(signup(), "cell-1")
    assert ids == g.attempt_ids(signup(), "cell-1") and len(set(ids)) == g.ATTEMPTS
    assert ids != g.attempt_ids(signup(), "cell-2")
    assert g.choose_attempt(ids, {}) == ids[0]  # first time, or in flight: joins it
    assert g.choose_attempt(ids, {ids[0]: g.Attempt("applied", "OPEN")}) == ids[0]  # granted: same lease
    for ended in (g.Attempt("applied", "RELEASED"), g.Attempt("applied", "COMMITTED"), g.Attempt("rejected", None)):
        assert g.choose_attempt(ids, {ids[0]: ended}) == ids[1]
    # All of them used: the next ones (the same every time, so a retry of that attempt joins it).
    spent = {i: g.Attempt("rejected", None) for i in ids}
    assert g.choose_attempt(ids, spent) is None
    later = g.attempt_ids(signup(), "cell-1", start=g.ATTEMPTS)
    assert later == g.attempt_ids(signup(), "cell-1", start=g.ATTEMPTS) and not set(later) & set(ids)
    assert g.attempt_ids(signup(), "cell-1", start=1)[:-1] == ids[1:]


def decision(outcome: str, *decisions: dict[str, object], reason: str | None = None) -> Decided:
    return Decided(RequestDecision(uuid.uuid4(), "ClaimsRequested", outcome, reason, list(decisions)), None)


@pytest.mark.parametrize(("submission", "code"), [
    (decision("rejected", {"type": "RequestRejected", "reason": "CONFLICT", "conflicts": [{}]}),
     grpc.StatusCode.ALREADY_EXISTS),
    (decision("rejected", {"type": "RequestRejected", "reason": "UNKNOWN_LEASE", "conflicts": []}),
     grpc.StatusCode.NOT_FOUND),
    (decision("rejected", {"type": "RequestRejected", "reason": "WRONG_CELL", "conflicts": [{}]}),
     grpc.StatusCode.PERMISSION_DENIED),
    (decision("rejected", {"type": "RequestRejected", "reason": "NOT_HELD", "conflicts": []}),
     grpc.StatusCode.NOT_FOUND),
    (decision("rejected", {"type": "RequestRejected", "reason": "NOT_HELD", "conflicts": [{}]}),
     grpc.StatusCode.FAILED_PRECONDITION),
    (decision("rejected", {"type": "RequestRejected", "reason": "LEASE_EXPIRED", "conflicts": []}),
     grpc.StatusCode.FAILED_PRECONDITION),
    (Overloaded(2, "in_flight"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Pending(uuid.uuid4(), None), grpc.StatusCode.UNAVAILABLE),
    (NotPublished(uuid.uuid4(), OSError("down")), grpc.StatusCode.UNAVAILABLE),
])
def test_decisions_map_to_the_status_codes_rails_reads(submission: object, code: grpc.StatusCode) -> None:
    refusal = g.refusal_of(submission)  # type: ignore[arg-type]
    assert refusal is not None and refusal.code == code


def test_applied_and_unchanged_decisions_are_answers() -> None:
    assert g.refusal_of(decision("applied", {"type": "LeaseGranted", "lease_id": str(uuid.UUID(int=3))})) is None
    assert g.refusal_of(decision("unchanged")) is None
    assert g.granted_lease(decision("applied", {"type": "LeaseGranted", "lease_id": str(uuid.UUID(int=3))}).decision
                           ) == uuid.UUID(int=3)


def row(**changes: object) -> g.RecordRow:
    values: dict[str, object] = dict(
        bucket="USERNAME", value="alice", cell_id="cell-1", owner_type="USER", owner_id=7, status="COMMITTED",
        lease_id=None, claimed_at=AT, source_type="RAILS_TABLE_USERS", source_id=(7).to_bytes(8, "big"),
        user_data=None, lease_granted_at=None)
    values.update(changes)
    return g.RecordRow(**values)  # type: ignore[arg-type]


def test_rows_become_records_with_gitlab_statuses() -> None:
    active = g.record_message(row(), 1)
    assert (active.status, active.cell_id, active.metadata.bucket.type) == (m.Record.ACTIVE, 1, m.Bucket.USERNAMES)
    assert active.metadata.subject == m.Subject(type=m.Subject.USER, id=7)
    assert active.metadata.source.rails_primary_key_id == (7).to_bytes(8, "big")
    assert not active.HasField("lease_uuid") and active.created_at.ToDatetime(tzinfo=UTC) == AT
    lease = uuid.uuid4()
    creating = g.record_message(row(status="LEASED", lease_id=lease), 1)
    assert creating.status == m.Record.LEASE_CREATING and creating.lease_uuid.value == str(lease)
    later = datetime(2026, 12, 4, tzinfo=UTC)
    destroying = g.record_message(row(lease_id=lease, lease_granted_at=later), 1)
    assert destroying.status == m.Record.LEASE_DESTROYING and destroying.updated_at.ToDatetime(tzinfo=UTC) == later
    # One id per record, stable across reads (and replays), another once claimed again.
    assert active.uuid == g.record_message(row(), 1).uuid != g.record_message(row(claimed_at=later), 1).uuid
    group = g.record_message(row(bucket="NAMESPACE", value="acme", owner_type="GROUP"), 2)
    assert (group.metadata.bucket.type, group.metadata.subject.type) == (m.Bucket.ROUTES, m.Subject.NAMESPACE)


def test_get_record_reads_the_typed_claim_or_the_bucket() -> None:
    assert g.get_record_key(s.GetRecordRequest(claim=claim_pb2.Claim(project_id=42))) == (ClaimBucket.PROJECT_ID, "42")
    assert g.get_record_key(s.GetRecordRequest(bucket=m.Bucket(type=m.Bucket.ROUTES, value="a/b"))) == (
        ClaimBucket.ROUTE, "a/b")
    with pytest.raises(Refusal):
        g.get_record_key(s.GetRecordRequest())


def page_row(n: int, bucket: str = "USERNAME", user_data: bytes | None = None) -> g.RecordRow:
    return g.RecordRow(bucket, f"user-{n}", "cell-1", "USER", n, "COMMITTED", None, AT, "RAILS_TABLE_USERS",
                       n.to_bytes(8, "big"), user_data, None)


def test_a_records_page_ends_at_a_whole_rails_row_and_fits_what_a_client_receives() -> None:
    small = [r for n in range(1, 502) for r in (page_row(n, "NAMESPACE"), page_row(n))]  # 1002 rows, 2 per Rails row
    page, truncated = g.records_page(small[:g.RECORDS_PAGE + 1], 1)
    ids = {r.metadata.source.rails_primary_key_id for r in page}
    assert truncated and len(page) == g.RECORDS_PAGE - 2 and max(ids) == (499).to_bytes(8, "big")
    assert g.records_page(small[:20], 1) == (g.records_page(small[:20], 1)[0], False)
    assert len(g.records_page(small[:20], 1)[0]) == 20
    # 1000 records of the largest user data are more than the 4 MiB a gRPC client takes by default.
    data = any_pb2.Any(type_url="type.googleapis.com/x.Y", value=b"u" * 4000).SerializeToString()
    assert len(data) <= g.MAX_USER_DATA_BYTES
    large = [page_row(n, user_data=data) for n in range(1, g.RECORDS_PAGE + 2)]
    page, truncated = g.records_page(large, 1)
    assert truncated and 0 < len(page) < g.RECORDS_PAGE
    answer = s.ListRecordsResponse(records=page, truncated=truncated)
    assert answer.ByteSize() <= g.RECORDS_PAGE_BYTES < 4 * 1024 * 1024
    assert [r.metadata.source.rails_primary_key_id for r in page] == [n.to_bytes(8, "big") for n in range(1, len(page) + 1)]


def test_a_change_of_letter_case_keeps_the_claim_instead_of_destroying_it() -> None:
    # Rails renames "Alice" to "alice": it destroys the old spelling and creates the new; to
    # this store both are one claim, which stays (adr/0022). Also for an e-mail sent hashed.
    request = signup()
    request.destroy_records.extend([metadata(m.Bucket.USERNAMES, "ALICE"), metadata(m.Bucket.ROUTES, "old-alice")])
    hashed = stored_claim_value(ClaimBucket.EMAIL, "alice@example.com", b"k")
    request.destroy_records.append(metadata(m.Bucket.EMAILS, hashed))
    command = g.begin_command(request, "cell-1", uuid.uuid4(), 0, "grpc@test", b"k")
    assert [(c.bucket.value, c.value) for c in command.destroy_claims] == [("NAMESPACE", "old-alice")]
    assert len(command.claims) == 3
