"""GitLab's claims contract (``claims.v1.ClaimService``) over our claims decider (adr/0022).

Every write is one of our claim commands, published and decided in log order like any
other (:class:`topology_store.service.claims.ClaimsService`); this module only maps:

- GitLab's request messages onto commands: ``BeginUpdate`` is one ``ClaimsRequested`` whose
  ``claims`` are the ``create_records`` (each with its subject, Rails source and user data)
  and whose ``destroy_claims`` are the ``destroy_records``; ``CommitUpdate`` and
  ``RollbackUpdate`` are ``LeaseCommitRequested`` / ``LeaseRollbackRequested``. GitLab's
  buckets map one to one onto ours, except ``ROUTES``: a top-level path is a ``NAMESPACE``
  (what the routing table routes), a nested one a ``ROUTE`` (:func:`our_bucket`).
- a decision onto GitLab's answer or status code (:func:`refusal_of`): a create that is taken
  ALREADY_EXISTS (Rails: "has already been taken"), an unknown lease NOT_FOUND, another
  cell's lease or record PERMISSION_DENIED, not decided within the call's deadline
  UNAVAILABLE (Rails retries it), overload RESOURCE_EXHAUSTED, bad input INVALID_ARGUMENT.
- our rows onto GitLab's ``Record`` / ``LeaseRecord`` (:func:`record_message`).

A ``BeginUpdate`` carries no request id, and Rails retries one that timed out: its request
id is derived from its content (:func:`attempt_ids`), so a retry is the same request and
gets the same lease, while the same content sent again after that lease ended (rolled back,
expired) or was refused is a new attempt (:func:`choose_attempt`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from pydantic import ValidationError

from topology_store.schemas.generated.proto.claims.v1 import messages_pb2, service_pb2
from topology_store.schemas.generated.proto.types.v1 import claim_pb2, uuid_pb2
from topology_store.schemas.models import (
    MAX_CLAIMS_PER_REQUEST,
    MAX_SOURCE_ID_BYTES,
    MAX_USER_DATA_BYTES,
    ClaimBucket,
    ClaimsRequested,
    Event,
    OwnerType,
    RecordMetadata,
    canonical_claim_value,
    stored_claim_value,
)
from topology_store.service import commands
from topology_store.service.admission import Overloaded
from topology_store.service.claims import (
    Decided,
    DecisionUnreadable,
    NotPublished,
    Pending,
    RequestDecision,
    RequestReused,
    Submission,
)
from topology_store.service.refusals import Refusal, invalid

Bucket = messages_pb2.Bucket
Subject = messages_pb2.Subject
Source = messages_pb2.Source
Record = messages_pb2.Record

# GitLab's bucket -> ours (ROUTES also NAMESPACE: see our_bucket).
BUCKETS: dict[int, ClaimBucket] = {
    Bucket.ROUTES: ClaimBucket.ROUTE,
    Bucket.ORGANIZATION_PATH: ClaimBucket.ORGANIZATION_PATH,
    Bucket.REDIRECT_ROUTES: ClaimBucket.REDIRECT_ROUTE,
    Bucket.USERNAMES: ClaimBucket.USERNAME,
    Bucket.EMAILS: ClaimBucket.EMAIL,
    Bucket.PROJECT_IDS: ClaimBucket.PROJECT_ID,
    Bucket.NAMESPACE_IDS: ClaimBucket.NAMESPACE_ID,
    Bucket.GPG_KEYS: ClaimBucket.GPG_KEY,
    Bucket.SSH_KEYS: ClaimBucket.SSH_KEY,
    Bucket.USER_IDS: ClaimBucket.USER_ID,
    Bucket.ORGANIZATION_IDS: ClaimBucket.ORGANIZATION_ID,
    Bucket.SERVICE_DESK_CUSTOM_EMAILS: ClaimBucket.SERVICE_DESK_CUSTOM_EMAIL,
    Bucket.GPG_KEY_FINGERPRINTS: ClaimBucket.GPG_KEY_FINGERPRINT,
    Bucket.SSH_KEY_FINGERPRINTS: ClaimBucket.SSH_KEY_FINGERPRINT,
    Bucket.SNIPPET_IDS: ClaimBucket.SNIPPET_ID,
    Bucket.PAGES_DOMAINS: ClaimBucket.PAGES_DOMAIN,
    Bucket.PAGES_UNIQUE_DOMAINS: ClaimBucket.PAGES_UNIQUE_DOMAIN,
}
GITLAB_BUCKETS: dict[ClaimBucket, int] = {ours: theirs for theirs, ours in BUCKETS.items()}
GITLAB_BUCKETS[ClaimBucket.NAMESPACE] = Bucket.ROUTES
# GitLab's typed Claim field of each bucket, and GetRecord's claim kinds.
CLAIM_FIELDS: dict[int, str] = {
    Bucket.ROUTES: "route", Bucket.ORGANIZATION_PATH: "organization_path", Bucket.REDIRECT_ROUTES: "redirect_route",
    Bucket.USERNAMES: "username", Bucket.EMAILS: "email", Bucket.PROJECT_IDS: "project_id",
    Bucket.NAMESPACE_IDS: "namespace_id", Bucket.GPG_KEYS: "gpg_key", Bucket.SSH_KEYS: "ssh_key",
    Bucket.USER_IDS: "user_id", Bucket.ORGANIZATION_IDS: "organization_id",
    Bucket.SERVICE_DESK_CUSTOM_EMAILS: "service_desk_custom_email", Bucket.GPG_KEY_FINGERPRINTS: "gpg_key_fingerprint",
    Bucket.SSH_KEY_FINGERPRINTS: "ssh_key_fingerprint", Bucket.SNIPPET_IDS: "snippet_id",
    Bucket.PAGES_DOMAINS: "pages_domain", Bucket.PAGES_UNIQUE_DOMAINS: "pages_unique_domain",
}
BUCKET_OF_CLAIM_FIELD = {name: number for number, name in CLAIM_FIELDS.items()}
SUBJECTS: dict[int, OwnerType] = {
    Subject.ORGANIZATION: OwnerType.ORGANIZATION,
    Subject.NAMESPACE: OwnerType.NAMESPACE,
    Subject.PROJECT: OwnerType.PROJECT,
    Subject.USER: OwnerType.USER,
}
GITLAB_SUBJECTS: dict[OwnerType, int] = {ours: theirs for theirs, ours in SUBJECTS.items()}
GITLAB_SUBJECTS[OwnerType.GROUP] = Subject.NAMESPACE  # a group is a namespace to GitLab

#: Namespaces of the ids derived here.
BEGIN_NAMESPACE = uuid.UUID("3b1f0c52-7c9e-5d55-8f1a-2b6de0a4c917")
RECORD_NAMESPACE = uuid.UUID("9e2d7a10-4b6c-5f3e-a1d8-0c5b7e9f2a64")
#: How many attempts of one content a begin looks at (a new attempt after each ended one).
ATTEMPTS = 8
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
#: ListRecords answers at most this many records, and says ``truncated`` when there are more.
RECORDS_PAGE = 1000
#: ... and at most this many bytes of them: a client receives 4 MiB by default (gRPC's
#: max_receive_message_length, Rails' too), and 1000 records of 4 KiB user data are more.
RECORDS_PAGE_BYTES = 3 * 1024 * 1024


# --- GitLab's request -> our commands -----------------------------------------------------------


def our_bucket(bucket_type: int, value: str) -> ClaimBucket:
    """Our bucket for GitLab's ``bucket_type``: ROUTES splits into NAMESPACE (a top-level
    path, what routes) and ROUTE (a nested one)."""
    if bucket_type == Bucket.ROUTES:
        return ClaimBucket.ROUTE if "/" in value else ClaimBucket.NAMESPACE
    found = BUCKETS.get(bucket_type)
    if found is None:
        raise invalid(f"bucket type {bucket_type} is not one of GitLab's buckets "
                      f"({', '.join(Bucket.Type.Name(n) for n in BUCKETS)})")
    return found


def _claim_ref(metadata: messages_pb2.Metadata, where: str, with_record: bool) -> dict[str, object]:
    if not metadata.HasField("bucket") or metadata.bucket.type == Bucket.UNSPECIFIED:
        raise invalid(f"{where}.bucket.type is missing (UNSPECIFIED)")
    value = metadata.bucket.value
    bucket = our_bucket(metadata.bucket.type, value)
    try:
        canonical_claim_value(bucket, value)
    except ValueError as exc:
        raise invalid(f"{where}.bucket.value: {exc}") from None
    ref: dict[str, object] = {"bucket": bucket.value, "value": value}
    if with_record:
        if metadata.subject.type not in SUBJECTS:
            raise invalid(f"{where}.subject.type must be one of ORGANIZATION, NAMESPACE, PROJECT, USER "
                          f"(got {metadata.subject.type})")
        if metadata.subject.id < 0:
            raise invalid(f"{where}.subject.id must not be negative")
        if metadata.source.type not in Source.Type.values():
            raise invalid(f"{where}.source.type {metadata.source.type} is not one of GitLab's Source types")
        if len(metadata.source.rails_primary_key_id) > MAX_SOURCE_ID_BYTES:
            raise invalid(f"{where}.source.rails_primary_key_id is longer than {MAX_SOURCE_ID_BYTES} bytes")
        user_data = metadata.user_data.SerializeToString(deterministic=True) if metadata.HasField("user_data") else None
        if user_data is not None and len(user_data) > MAX_USER_DATA_BYTES:
            raise invalid(f"{where}.user_data is {len(user_data)} bytes; at most {MAX_USER_DATA_BYTES}")
        ref["metadata"] = RecordMetadata(
            owner_type=SUBJECTS[metadata.subject.type], owner_id=metadata.subject.id,
            source_type=Source.Type.Name(metadata.source.type), source_id=metadata.source.rails_primary_key_id,
            user_data=user_data)
    return ref


def attempt_ids(request: service_pb2.BeginUpdateRequest, cell_name: str, start: int = 0,
                count: int = ATTEMPTS) -> list[uuid.UUID]:
    """The request ids a ``BeginUpdate`` of this content may take, ``count`` of them from
    attempt ``start`` on, in order: a function of the cell and the request's bytes
    (deterministic serialization), so a retry finds them."""
    digest = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
    return [uuid.uuid5(BEGIN_NAMESPACE, f"{cell_name}\n{digest}\n{k}") for k in range(start, start + count)]


@dataclass(frozen=True, slots=True)
class Attempt:
    """What is known of one earlier attempt: its outcome and, when granted, its lease's status."""

    outcome: str  # applied | unchanged | rejected
    lease_status: str | None  # OPEN | COMMITTED | RELEASED; None: no lease


def choose_attempt(ids: Sequence[uuid.UUID], known: Mapping[uuid.UUID, Attempt]) -> uuid.UUID | None:
    """The request id this ``BeginUpdate`` takes: the first attempt not decided yet (a retry
    of one in flight joins it) or granted with its lease still open (a retry after the grant
    gets that lease); a refused or ended attempt leaves its id to history, and the same
    content is asked again under the next id. All used: None, look at the next ``ATTEMPTS``
    (a fresh random id would make a retry of that attempt conflict with its own lease)."""
    for request_id in ids:
        attempt = known.get(request_id)
        if attempt is None or attempt.lease_status == "OPEN":
            return request_id
    return None


def _kept(creates: list[dict[str, object]], destroys: list[dict[str, object]], secret: bytes
          ) -> list[dict[str, object]]:
    """``destroys`` without those a create of the same lease names again as the same claim:
    a change of letter case only ("Foo" to "foo", the claim is unique case-insensitively),
    or an e-mail given clear and hashed. The claim stays; destroying and creating it again in
    one lease would be refused as naming one claim twice (adr/0022)."""
    def stored(ref: dict[str, object]) -> tuple[str, str]:
        bucket = str(ref["bucket"])
        return bucket, stored_claim_value(bucket, str(ref["value"]), secret)

    created = {stored(ref) for ref in creates}
    return [ref for ref in destroys if stored(ref) not in created]


def begin_command(request: service_pb2.BeginUpdateRequest, cell_name: str, request_id: uuid.UUID,
                  lease_ttl_ms: int, source: str, secret: bytes = b"") -> ClaimsRequested:
    """The ``ClaimsRequested`` of a ``BeginUpdate`` (a Refusal for bad input). ``secret``: the
    claim secret, under which a destroy and a create of one claim are told apart (:func:`_kept`)."""
    count = len(request.create_records) + len(request.destroy_records)
    if count == 0:
        raise invalid("BeginUpdate names no record: create_records and destroy_records are both empty")
    if count > MAX_CLAIMS_PER_REQUEST:
        raise invalid(f"BeginUpdate names {count} records; at most {MAX_CLAIMS_PER_REQUEST}")
    creates = [_claim_ref(m, f"create_records[{i}]", True) for i, m in enumerate(request.create_records)]
    destroys = _kept(creates, [_claim_ref(m, f"destroy_records[{i}]", False)
                               for i, m in enumerate(request.destroy_records)], secret)
    # The lease's own owner: the first record's subject (each create keeps its own).
    first = (request.create_records or request.destroy_records)[0]
    owner_type = SUBJECTS.get(first.subject.type, OwnerType.NAMESPACE)
    try:
        return commands.begin(source=source, cell_id=cell_name, owner_type=owner_type.value,
                              owner_id=max(first.subject.id, 0), claims=creates, destroy_claims=destroys,
                              lease_ttl_ms=lease_ttl_ms, request_id=request_id)
    except ValidationError as exc:
        raise invalid("; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}"
                              for e in exc.errors(include_url=False))) from None


def lease_uuid(message: uuid_pb2.UUID, where: str = "lease_uuid") -> uuid.UUID:
    if not message.value:
        raise invalid(f"{where} is missing")
    try:
        return uuid.UUID(message.value)
    except ValueError:
        raise invalid(f"{where} {message.value[:64]!r} is not a UUID") from None


def commit_request_id(lease_id: uuid.UUID, cell_name: str) -> uuid.UUID:
    """A commit's request id: one per lease and cell, so Rails' retry of a commit is the same
    request, while another cell's attempt (refused: WRONG_CELL) is a request of its own and
    cannot take the id of the lease's own commit (which would then be RequestReused)."""
    return uuid.uuid5(lease_id, f"commit\n{cell_name}")


def rollback_request_id(lease_id: uuid.UUID, cell_name: str) -> uuid.UUID:
    return uuid.uuid5(lease_id, f"rollback\n{cell_name}")


def end_command(request: service_pb2.CommitUpdateRequest | service_pb2.RollbackUpdateRequest, cell_name: str,
                source: str) -> Event:
    """The commit or the rollback a ``CommitUpdate`` / ``RollbackUpdate`` asks for, under its
    request id per lease and cell."""
    lease = lease_uuid(request.lease_uuid)
    if isinstance(request, service_pb2.CommitUpdateRequest):
        return commands.commit(source=source, lease_id=lease, cell_id=cell_name,
                               request_id=commit_request_id(lease, cell_name))
    return commands.rollback(source=source, lease_id=lease, cell_id=cell_name,
                             request_id=rollback_request_id(lease, cell_name))


# --- our answers -> GitLab's ---------------------------------------------------------------------


def refusal_of(submission: Submission) -> Refusal | None:
    """The status of a submission that is not an applied or unchanged decision; None for one that is."""
    if isinstance(submission, Decided):
        return _rejection(submission.decision)
    if isinstance(submission, Overloaded):
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"overloaded: retry in {submission.retry_after_s:g} s (adr/0018)")
    if isinstance(submission, Pending):
        return Refusal(grpc.StatusCode.UNAVAILABLE, "published, not decided within the call's deadline; retry")
    if isinstance(submission, NotPublished):
        return Refusal(grpc.StatusCode.UNAVAILABLE, f"the event log did not take the request; retry ({submission.cause})")
    if isinstance(submission, DecisionUnreadable):
        return Refusal(grpc.StatusCode.UNAVAILABLE, "published; its decision cannot be read now; retry")
    if isinstance(submission, RequestReused):
        return Refusal(grpc.StatusCode.ABORTED, "the derived request id names another request; send it again")
    raise TypeError(f"unknown submission {submission!r}")


_REJECTIONS = {
    "CONFLICT": grpc.StatusCode.ALREADY_EXISTS,
    "UNKNOWN_LEASE": grpc.StatusCode.NOT_FOUND,
    "WRONG_CELL": grpc.StatusCode.PERMISSION_DENIED,
    "LEASE_EXPIRED": grpc.StatusCode.FAILED_PRECONDITION,
    "INVALID": grpc.StatusCode.FAILED_PRECONDITION,
    "EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _rejection(decision: RequestDecision) -> Refusal | None:
    if decision.outcome != "rejected":
        return None
    reason = next((d.get("reason") for d in decision.decisions if d.get("type") == "RequestRejected"), None)
    message = decision.reason or "rejected"
    if reason == "NOT_HELD":
        # Destroying what is not claimed: NOT_FOUND; what another lease is changing: try later.
        rejected = next(d for d in decision.decisions if d.get("type") == "RequestRejected")
        code = grpc.StatusCode.FAILED_PRECONDITION if rejected.get("conflicts") else grpc.StatusCode.NOT_FOUND
        return Refusal(code, message)
    return Refusal(_REJECTIONS.get(str(reason), grpc.StatusCode.FAILED_PRECONDITION), message)


def granted_lease(decision: RequestDecision) -> uuid.UUID:
    granted = next(d for d in decision.decisions if d.get("type") == "LeaseGranted")
    return uuid.UUID(str(granted["lease_id"]))


def moment(stamp: timestamp_pb2.Timestamp, where: str) -> datetime:
    """A request's Timestamp as a datetime; one out of protobuf's range (years 1..9999,
    nanos 0..999999999) is bad input, not an error of ours."""
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise invalid(f"{where} is not a valid Timestamp (seconds {stamp.seconds}, nanos {stamp.nanos}): "
                      "years 1 to 9999, nanos 0 to 999999999") from None


def timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(at)
    return message


@dataclass(frozen=True, slots=True)
class RecordRow:
    """One claim, as ``ListRecords`` and ``GetRecord`` read it."""

    bucket: str
    value: str
    cell_id: str
    owner_type: str
    owner_id: int
    status: str  # LEASED | COMMITTED
    lease_id: uuid.UUID | None
    claimed_at: datetime
    source_type: str | None
    source_id: bytes | None
    user_data: bytes | None
    lease_granted_at: datetime | None  # of the lease destroying it, if any


def record_id(bucket: str, value: str, claimed_at: datetime) -> uuid.UUID:
    """A record's UUID: a function of what it is and when it was claimed, so a replay of the
    log gives every record the same id, and a value claimed again later gets a new one."""
    return uuid.uuid5(RECORD_NAMESPACE, f"{bucket}\n{value}\n{claimed_at.isoformat()}")


def record_message(row: RecordRow, cell_number: int) -> messages_pb2.Record:
    bucket_type = GITLAB_BUCKETS.get(ClaimBucket(row.bucket), Bucket.UNSPECIFIED)
    metadata = messages_pb2.Metadata(
        bucket=Bucket(type=bucket_type, value=row.value),  # e-mails and keys as stored: their keyed hash
        subject=Subject(type=GITLAB_SUBJECTS.get(OwnerType(row.owner_type), Subject.UNSPECIFIED), id=row.owner_id),
        source=Source(type=Source.Type.Value(row.source_type) if row.source_type in Source.Type.keys() else 0,
                      rails_primary_key_id=row.source_id or b""),
    )
    if row.user_data is not None:
        metadata.user_data.CopyFrom(any_pb2.Any.FromString(row.user_data))
    if row.status == "LEASED":
        status, updated = Record.LEASE_CREATING, row.claimed_at
    elif row.lease_id is not None:
        status, updated = Record.LEASE_DESTROYING, row.lease_granted_at or row.claimed_at
    else:
        status, updated = Record.ACTIVE, row.claimed_at
    record = messages_pb2.Record(uuid=uuid_pb2.UUID(value=str(record_id(row.bucket, row.value, row.claimed_at))),
                                 metadata=metadata, cell_id=cell_number, status=status,
                                 created_at=timestamp(row.claimed_at), updated_at=timestamp(updated))
    if row.lease_id is not None:
        record.lease_uuid.value = str(row.lease_id)
    return record


def records_page(rows: Sequence[RecordRow], cell_number: int) -> tuple[list[messages_pb2.Record], bool]:
    """ListRecords' page of ``rows`` (up to ``RECORDS_PAGE + 1`` read, in source id order): at
    most ``RECORDS_PAGE`` records of at most ``RECORDS_PAGE_BYTES``, and whether more follow.
    A page with more after it ends at a whole Rails row (every record of the last source id
    listed, or none of them), so ``source_id_gt`` = the last id listed pages on."""
    page: list[messages_pb2.Record] = []
    size = 0
    for row in rows[:RECORDS_PAGE]:
        message = record_message(row, cell_number)
        size += message.ByteSize() + 8  # with its field tag and length
        if size > RECORDS_PAGE_BYTES and page:
            break
        page.append(message)
    truncated = len(page) < len(rows)
    if truncated:
        last = page[-1].metadata.source.rails_primary_key_id
        page = [message for message in page if message.metadata.source.rails_primary_key_id != last] or page
    return page, truncated


def lookup_keys(bucket_types: Iterable[int], claim_types: Iterable[int]) -> list[str] | None:
    """Our buckets of ``ListRecords``' bucket and claim type filters (claim types are numbered
    as buckets); None: no filter."""
    wanted = {*bucket_types, *claim_types}
    wanted.discard(0)
    if not wanted:
        return None
    ours: list[str] = []
    for number in sorted(wanted):
        if number == Bucket.ROUTES:
            ours += [ClaimBucket.NAMESPACE.value, ClaimBucket.ROUTE.value]
        elif number in BUCKETS:
            ours.append(BUCKETS[number].value)
        else:
            raise invalid(f"bucket or claim type {number} is not one of GitLab's")
    return ours


def get_record_key(request: service_pb2.GetRecordRequest) -> tuple[ClaimBucket, str]:
    """The (our bucket, value as given) a ``GetRecord`` asks for: its typed ``claim`` if set,
    else its ``bucket``."""
    if request.HasField("claim") and request.claim.WhichOneof("claim") is not None:
        kind = request.claim.WhichOneof("claim")
        value = str(getattr(request.claim, kind))
        bucket_type = BUCKET_OF_CLAIM_FIELD[kind]
    else:
        bucket_type, value = request.bucket.type, request.bucket.value
        if bucket_type == Bucket.UNSPECIFIED:
            raise invalid("GetRecord names neither a claim nor a bucket type")
    bucket = our_bucket(bucket_type, value)
    try:
        canonical_claim_value(bucket, value)
    except ValueError as exc:
        raise invalid(f"value: {exc}") from None
    return bucket, value


def claim_types_of(bucket: ClaimBucket) -> int:
    return GITLAB_BUCKETS.get(bucket, claim_pb2.CLAIM_TYPE_UNSPECIFIED)
