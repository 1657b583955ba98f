"""Pydantic models of the events, for validation at the edges (producer input,
projector input). They mirror ``*.avsc`` by hand so they read as plain typed
Python; ``tests/unit/test_contract.py`` fails the moment the two drift apart.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class CellState(StrEnum):
    PROVISIONING = "PROVISIONING"
    ACTIVE = "ACTIVE"
    DRAINING = "DRAINING"
    READ_ONLY = "READ_ONLY"
    DECOMMISSIONED = "DECOMMISSIONED"


class ClaimBucket(StrEnum):
    NAMESPACE = "NAMESPACE"
    USERNAME = "USERNAME"
    EMAIL = "EMAIL"
    KEY = "KEY"
    PACKAGE = "PACKAGE"
    IMAGE = "IMAGE"
    ORGANIZATION_ID = "ORGANIZATION_ID"
    # GitLab's buckets (claims.v1.Bucket.Type, adr/0022): a full route path with a '/'
    # (a top-level one is a NAMESPACE), and the rest one to one.
    ROUTE = "ROUTE"
    ORGANIZATION_PATH = "ORGANIZATION_PATH"
    REDIRECT_ROUTE = "REDIRECT_ROUTE"
    PROJECT_ID = "PROJECT_ID"
    NAMESPACE_ID = "NAMESPACE_ID"
    GPG_KEY = "GPG_KEY"
    SSH_KEY = "SSH_KEY"
    USER_ID = "USER_ID"
    SERVICE_DESK_CUSTOM_EMAIL = "SERVICE_DESK_CUSTOM_EMAIL"
    GPG_KEY_FINGERPRINT = "GPG_KEY_FINGERPRINT"
    SSH_KEY_FINGERPRINT = "SSH_KEY_FINGERPRINT"
    SNIPPET_ID = "SNIPPET_ID"
    PAGES_DOMAIN = "PAGES_DOMAIN"
    PAGES_UNIQUE_DOMAIN = "PAGES_UNIQUE_DOMAIN"


class OwnerType(StrEnum):
    GROUP = "GROUP"
    PROJECT = "PROJECT"
    USER = "USER"
    ORGANIZATION = "ORGANIZATION"
    NAMESPACE = "NAMESPACE"  # GitLab's Subject NAMESPACE (a group's or a user's namespace)


# Claim value formats. Each is one regular expression over the value *as given* (before
# lower-casing), written in the subset that Python's ``re`` and ECMA-262 (OpenAPI/JSON
# Schema ``pattern``) read alike: no ``\s``, ``\d`` or ``\w`` (their sets differ), only
# explicit classes and ``\uXXXX`` escapes, matched whole (``re.fullmatch``: Python's ``$``
# also matches before a final line break). ``canonical_claim_value`` decides with these
# patterns and the read API declares the same ones (``claim_value_pattern``).
MAX_CLAIM_VALUE_LENGTH = 255
MAX_BIGINT = 2**63 - 1
PROTECTED_PREFIX = "hmac-sha256:"
# Stored as a keyed hash: e-mails (never in clear at rest), and public keys (too long to
# index; only their equality matters).
SENSITIVE_BUCKETS = frozenset({"EMAIL", "SERVICE_DESK_CUSTOM_EMAIL", "GPG_KEY", "SSH_KEY"})
EMAIL_BUCKETS = frozenset({"EMAIL", "SERVICE_DESK_CUSTOM_EMAIL"})
KEY_BUCKETS = frozenset({"GPG_KEY", "SSH_KEY"})
MAX_KEY_VALUE_LENGTH = 16_384  # an armored GPG public key; stored as its hash
ID_BUCKETS = frozenset({"ORGANIZATION_ID", "PROJECT_ID", "NAMESPACE_ID", "USER_ID", "SNIPPET_ID"})
# Compared as given; every other bucket is unique case-insensitively (lower-cased).
CASE_SENSITIVE_BUCKETS = frozenset({"KEY", "PACKAGE", "GPG_KEY", "SSH_KEY", "SSH_KEY_FINGERPRINT"})
# A sensitive value may arrive already protected: the keyed hash of its canonical form.
_PROTECTED = re.compile(r"^hmac-sha256:[0-9a-f]{64}$")
_CELL_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

# Class bodies (regex syntax) of characters a value may not hold.
NUL = r"\u0000"
CONTROL_CHARACTERS = r"\u0000-\u001f\u007f-\u009f"  # Unicode's Cc: C0, DEL and C1


def _escaped(chars: str) -> str:
    """Characters for a regex class, each as a ``\\uXXXX`` escape."""
    return "".join(f"\\u{ord(c):04x}" for c in chars)


# str.isspace(): what str.strip() strips, hence what "surrounding whitespace" means.
_WHITESPACE = _escaped("".join(chr(c) for c in range(0x3001) if chr(c).isspace()))


def _any_case(text: str) -> str:
    """``text`` in any letter case; its other characters must need no escaping."""
    assert re.fullmatch("[A-Za-z0-9:-]*", text), text
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in text)


def _not_starting_with(prefix: str, excluded: str) -> str:
    """A regex of the non-empty strings of characters outside the class body ``excluded``
    that do not start with ``prefix`` in any letter case (without a lookahead: not every
    regex engine that reads OpenAPI patterns has one)."""
    parts = [_any_case(prefix[:k]) for k in range(1, len(prefix))]  # a proper prefix, whole
    for k, c in enumerate(prefix):  # equal up to k, another character at k, anything after
        parts.append(f"{_any_case(prefix[:k])}[^{excluded}{_escaped(c.upper() + c.lower())}][^{excluded}]*")
    return "(" + "|".join(parts) + ")"


def _decimal_at_most(limit: int) -> str:
    """A regex of the decimal numbers 1..``limit`` without leading zeros."""
    digits = str(limit)
    parts = [f"[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) > 1 else []
    for k, d in enumerate(digits):  # same length: equal up to k, smaller at k, anything after
        low = "1" if k == 0 else "0"
        if int(d) > int(low):
            rest = len(digits) - k - 1
            parts.append(digits[:k] + f"[{low}-{int(d) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    parts.append(digits)
    return "(" + "|".join(parts) + ")"


def claim_value_pattern(bucket: ClaimBucket | str, forbidden: str = NUL) -> str:
    """The format of a ``bucket`` value as given, as a regular expression (see above).
    ``forbidden`` (a class body): characters no value may hold; events forbid NUL
    (PostgreSQL text cannot store it), the read API every control character (as in
    its paths)."""
    bucket = ClaimBucket(bucket)
    segment = "[A-Za-z0-9_][A-Za-z0-9_.-]*"  # GitLab's path segment: starts with a letter, digit or underscore
    label = "[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"  # a DNS label
    if bucket in (ClaimBucket.NAMESPACE, ClaimBucket.USERNAME, ClaimBucket.ORGANIZATION_PATH):
        return f"^{segment}$"
    if bucket is ClaimBucket.ROUTE:
        return f"^{segment}(/{segment})+$"  # a nested full path; a top-level one is a NAMESPACE
    if bucket is ClaimBucket.REDIRECT_ROUTE:
        return f"^{segment}(/{segment})*$"
    if bucket in (ClaimBucket.PAGES_DOMAIN, ClaimBucket.PAGES_UNIQUE_DOMAIN):
        return f"^{label}([.]{label})*$"
    if bucket is ClaimBucket.GPG_KEY_FINGERPRINT:
        return "^[0-9A-Fa-f]{16,64}$"
    if bucket is ClaimBucket.IMAGE:
        return "^[A-Za-z0-9][A-Za-z0-9._/-]*$"
    if bucket.value in ID_BUCKETS:
        return f"^{_decimal_at_most(MAX_BIGINT)}$"
    if bucket.value in EMAIL_BUCKETS:
        # local@domain, or the protected form (its prefix, in any case, means that form).
        excluded = f"@{_WHITESPACE}{forbidden}"
        return f"^(hmac-sha256:[0-9a-f]{{64}}|{_not_starting_with(PROTECTED_PREFIX, excluded)}@[^{excluded}]+)$"
    # KEY, PACKAGE: anything without surrounding whitespace.
    edge, inner = f"[^{_WHITESPACE}{forbidden}]", f"[^{forbidden}]"
    return f"^{edge}({inner}*{edge})?$"


CLAIM_VALUE_RULES: dict[ClaimBucket, str] = {
    ClaimBucket.NAMESPACE: "one path segment of letters, digits, '_', '-' or '.', not starting with '-' or '.' "
    "(a top-level namespace, not a full path); case-insensitive",
    ClaimBucket.USERNAME: "one path segment of letters, digits, '_', '-' or '.', not starting with '-' or '.'; "
    "case-insensitive",
    ClaimBucket.EMAIL: "local@domain (no whitespace, one '@'), case-insensitive; or the protected form "
    "hmac-sha256: and 64 lower-case hex digits",
    ClaimBucket.KEY: "any text without surrounding whitespace; case-sensitive",
    ClaimBucket.PACKAGE: "any text without surrounding whitespace; case-sensitive",
    ClaimBucket.IMAGE: "letters, digits, '.', '_', '-' and '/', starting with a letter or digit; case-insensitive",
    ClaimBucket.ORGANIZATION_ID: f"a positive integer up to {MAX_BIGINT}, in decimal without leading zeros",
    ClaimBucket.ROUTE: "a full path of two or more segments joined by '/' (a one-segment path is a NAMESPACE), "
    "each as a NAMESPACE; case-insensitive",
    ClaimBucket.ORGANIZATION_PATH: "one path segment, as a NAMESPACE; case-insensitive",
    ClaimBucket.REDIRECT_ROUTE: "a full path of one or more segments joined by '/', each as a NAMESPACE; "
    "case-insensitive",
    ClaimBucket.GPG_KEY: f"a public key, any text of at most {MAX_KEY_VALUE_LENGTH} characters without "
    "surrounding whitespace, stored as its keyed hash; case-sensitive",
    ClaimBucket.SSH_KEY: f"a public key, any text of at most {MAX_KEY_VALUE_LENGTH} characters without "
    "surrounding whitespace, stored as its keyed hash; case-sensitive",
    ClaimBucket.SERVICE_DESK_CUSTOM_EMAIL: "local@domain, as an EMAIL; case-insensitive; or the protected form",
    ClaimBucket.GPG_KEY_FINGERPRINT: "16 to 64 hex digits; case-insensitive",
    ClaimBucket.SSH_KEY_FINGERPRINT: "any text without surrounding whitespace (e.g. SHA256:<base64>); case-sensitive",
    ClaimBucket.PAGES_DOMAIN: "a domain name: DNS labels of letters, digits and '-' joined by '.'; case-insensitive",
    ClaimBucket.PAGES_UNIQUE_DOMAIN: "a domain name: DNS labels of letters, digits and '-' joined by '.'; "
    "case-insensitive",
    **{ClaimBucket(b): f"a positive integer up to {MAX_BIGINT}, in decimal without leading zeros"
       for b in ("PROJECT_ID", "NAMESPACE_ID", "USER_ID", "SNIPPET_ID")},
}

_CLAIM_VALUE_FORMATS = {bucket: re.compile(claim_value_pattern(bucket)) for bucket in ClaimBucket}
_PATH_SEGMENT = _CLAIM_VALUE_FORMATS[ClaimBucket.NAMESPACE]

CellId = Annotated[str, Field(pattern=_CELL_ID.pattern, description="Lower-case DNS label, e.g. cell-1")]


def _require_unicode_text(value: str) -> None:
    """Avro strings are UTF-8: a lone surrogate (JSON allows "\\ud800") cannot be
    encoded, and would fail only when published, after earlier events were sent."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None


def max_claim_value_length(bucket: ClaimBucket | str) -> int:
    """How long a ``bucket`` value may be, once canonical."""
    return MAX_KEY_VALUE_LENGTH if ClaimBucket(bucket).value in KEY_BUCKETS else MAX_CLAIM_VALUE_LENGTH


def canonical_claim_value(bucket: ClaimBucket | str, value: str) -> str:
    """The one spelling of a claimed value under which uniqueness is decided.

    Namespace paths, usernames and e-mails are unique case-insensitively, so the
    canonical form is lower-case; keys (fingerprints) and package names are
    compared as given. A sensitive value may also be given already protected
    (``hmac-sha256:<hex>``, see :func:`protect_value`).
    Raises ValueError with a readable reason for a value the bucket cannot hold:
    one that does not match :func:`claim_value_pattern`, is longer than 255
    characters once canonical, or is not valid Unicode.
    """
    bucket = ClaimBucket(bucket)
    if not value or value != value.strip():
        raise ValueError("must be non-empty without surrounding whitespace")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    _require_unicode_text(value)
    if bucket.value in EMAIL_BUCKETS and value[:len(PROTECTED_PREFIX)].lower() == PROTECTED_PREFIX:
        if not _PROTECTED.fullmatch(value):
            raise ValueError(f"a protected {bucket.value} must be {PROTECTED_PREFIX} and 64 lower-case hex digits")
        return value
    canonical = value if bucket.value in CASE_SENSITIVE_BUCKETS else value.lower()
    # Measured after lower-casing, which can lengthen some Unicode text.
    limit = max_claim_value_length(bucket)
    if len(canonical) > limit:
        raise ValueError(f"must be at most {limit} characters")
    if not _CLAIM_VALUE_FORMATS[bucket].fullmatch(value):
        if bucket.value in EMAIL_BUCKETS:
            what = "look like local@domain"
        elif bucket.value in ID_BUCKETS:
            what = "be a positive integer below 2**63"
        else:
            what = "be " + CLAIM_VALUE_RULES[bucket]
        raise ValueError(f"{bucket.value} must {what}")
    return canonical


def protect_value(bucket: ClaimBucket | str, canonical: str, secret: bytes) -> str:
    """The value as stored and compared: sensitive buckets keep only a keyed hash
    (HMAC-SHA256 with the deployment's secret), so a clear e-mail never reaches
    PostgreSQL, logs, metrics or snapshots, while equal e-mails still collide."""
    name = ClaimBucket(bucket).value
    if name not in SENSITIVE_BUCKETS or (name in EMAIL_BUCKETS and _PROTECTED.fullmatch(canonical)):
        return canonical  # a key is always given in clear (no protected form), so always hashed
    return PROTECTED_PREFIX + hmac.new(secret, canonical.encode("utf-8"), hashlib.sha256).hexdigest()


def stored_claim_value(bucket: ClaimBucket | str, value: str, secret: bytes) -> str:
    """The spelling under which a value a client gives is stored: canonical, then protected."""
    return protect_value(bucket, canonical_claim_value(bucket, value), secret)


def _now() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """The envelope every event carries."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    EVENT_TYPE: ClassVar[str]

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Idempotency key")
    occurred_at: AwareDatetime = Field(default_factory=_now, validate_default=True)
    source: str = Field(min_length=1, max_length=255, description="Emitting cell or service")
    trace_id: str | None = Field(default=None, max_length=64)

    @property
    def partition_key(self) -> str:
        raise NotImplementedError

    @field_validator("*", mode="after")
    @classmethod
    def _fits_the_wire(cls, value: Any) -> Any:
        # PostgreSQL text cannot hold NUL: such an event would fail its batch's
        # transaction on every retry, so it is refused at the edge instead.
        if isinstance(value, str):
            if "\x00" in value:
                raise ValueError("must not contain NUL characters")
            if not value.isascii():  # ASCII is always valid UTF-8; this runs for every field of every event
                _require_unicode_text(value)
        # Avro carries timestamp-millis; truncating keeps a model equal to its
        # own round trip through the wire format (and a replay to the live run).
        elif isinstance(value, datetime) and value.microsecond % 1000:
            return value.replace(microsecond=value.microsecond // 1000 * 1000)
        return value

    def to_avro(self) -> dict[str, Any]:
        """The record handed to the Avro writer. fastavro takes UUIDs for uuid
        fields and StrEnum members (which are str) for enum symbols as they are."""
        return self.model_dump(mode="python")


class _CellEvent(Event):
    cell_id: CellId

    @property
    def partition_key(self) -> str:
        return self.cell_id


class CellRegistered(_CellEvent):
    EVENT_TYPE: ClassVar[str] = "CellRegistered"

    address: str = Field(pattern=r"^https?://\S+$", max_length=2048)
    session_prefix: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    region: str = Field(min_length=1, max_length=64)
    # GitLab's numeric cell id (CellInfo.id, Rails' cell.id), unique across cells (adr/0021).
    number: int | None = Field(default=None, ge=1, le=MAX_BIGINT)


class CellUpdated(_CellEvent):
    EVENT_TYPE: ClassVar[str] = "CellUpdated"

    address: str | None = Field(default=None, pattern=r"^https?://\S+$", max_length=2048)
    region: str | None = Field(default=None, min_length=1, max_length=64)
    weight: int | None = Field(default=None, ge=0, le=2**31 - 1)
    # Records the number of a cell registered without one; a number never changes (adr/0021).
    number: int | None = Field(default=None, ge=1, le=MAX_BIGINT)

    @model_validator(mode="after")
    def _changes_something(self) -> CellUpdated:
        if self.address is None and self.region is None and self.weight is None and self.number is None:
            raise ValueError("CellUpdated must set at least one of address, region, weight, number")
        return self


class CellStateChanged(_CellEvent):
    EVENT_TYPE: ClassVar[str] = "CellStateChanged"

    state: CellState
    reason: str = Field(default="", max_length=1024)


class _ClaimEvent(Event):
    bucket: ClaimBucket
    value: str
    cell_id: CellId
    owner_type: OwnerType
    owner_id: int = Field(ge=0, le=MAX_BIGINT)

    @field_validator("value")
    @classmethod
    def _canonical_value(cls, value: str, info: ValidationInfo) -> str:
        bucket = info.data.get("bucket")
        if bucket is None:  # the bucket itself failed validation and is reported
            return value
        return canonical_claim_value(bucket, value)

    @property
    def partition_key(self) -> str:
        return f"{self.bucket.value}:{self.value}"


class ClaimCreated(_ClaimEvent):
    EVENT_TYPE: ClassVar[str] = "ClaimCreated"


class ClaimReleased(_ClaimEvent):
    EVENT_TYPE: ClassVar[str] = "ClaimReleased"


MAX_SOURCE_ID_BYTES = 64
MAX_USER_DATA_BYTES = 4096


class RecordMetadata(BaseModel):
    """What a record made through GitLab's claims contract carries besides its value
    (adr/0022): its subject (our owner), the Rails row behind it, and opaque user data.
    Bytes travel as Avro bytes, and as base64 in JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    owner_type: OwnerType
    owner_id: int = Field(ge=0, le=MAX_BIGINT)
    source_type: str = Field(pattern=r"^[A-Z][A-Z0-9_]{0,63}$", description="a GitLab Source.Type name")
    source_id: bytes = Field(max_length=MAX_SOURCE_ID_BYTES)
    user_data: bytes | None = Field(default=None, max_length=MAX_USER_DATA_BYTES)


class ClaimRef(BaseModel):
    """One (bucket, value) of a request, value in canonical form; ``metadata`` only for
    GitLab's records (adr/0022)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: ClaimBucket
    value: str
    metadata: RecordMetadata | None = None

    @field_validator("value")
    @classmethod
    def _canonical_value(cls, value: str, info: ValidationInfo) -> str:
        bucket = info.data.get("bucket")
        if bucket is None:
            return value
        return canonical_claim_value(bucket, value)

    @property
    def key(self) -> tuple[str, str]:
        return (self.bucket.value, self.value)


MAX_CLAIMS_PER_REQUEST = 100
MAX_LEASE_TTL_MS = 24 * 3600 * 1000
#: The end of a lease without a server-side expiry (lease_ttl_ms 0, GitLab's leases): the
#: last millisecond Avro's timestamp-millis, Python and PostgreSQL all hold; never due.
NO_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
MAX_SEQUENCE_RANGE = 2**40

ClaimRefs = Annotated[tuple[ClaimRef, ...], Field(min_length=1, max_length=MAX_CLAIMS_PER_REQUEST)]
LeaseId = uuid.UUID
OwnerId = Annotated[int, Field(ge=0, le=MAX_BIGINT)]


def _distinct(claims: tuple[ClaimRef, ...]) -> tuple[ClaimRef, ...]:
    keys = [c.key for c in claims]
    if len(set(keys)) != len(keys):
        raise ValueError("a request names each (bucket, value) once")
    return claims


def _owner_key(cell_id: str, owner_type: OwnerType, owner_id: int) -> str:
    return f"{cell_id}/{owner_type.value}/{owner_id}"


# --- Commands: requests on the claim-requests topic; event_id is the request id. ---


class ClaimsRequested(Event):
    """Begin: reserve every claim for one owner under a lease, or none."""

    EVENT_TYPE: ClassVar[str] = "ClaimsRequested"

    lease_id: LeaseId = Field(default_factory=uuid.uuid4)
    cell_id: CellId
    owner_type: OwnerType
    owner_id: OwnerId
    claims: tuple[ClaimRef, ...] = Field(max_length=MAX_CLAIMS_PER_REQUEST)
    destroy_claims: tuple[ClaimRef, ...] = Field(default=(), max_length=MAX_CLAIMS_PER_REQUEST)
    # 0: no server-side expiry (GitLab's leases, adr/0022); else at least a second.
    lease_ttl_ms: int = Field(default=60_000, ge=0, le=MAX_LEASE_TTL_MS)

    _distinct_claims = field_validator("claims", "destroy_claims")(_distinct)

    @model_validator(mode="after")
    def _creates_and_destroys(self) -> ClaimsRequested:
        if not self.claims and not self.destroy_claims:
            raise ValueError("claims and destroy_claims are both empty: a lease creates or destroys at least one claim")
        if len(self.claims) + len(self.destroy_claims) > MAX_CLAIMS_PER_REQUEST:
            raise ValueError(f"a lease names at most {MAX_CLAIMS_PER_REQUEST} claims")
        if {c.key for c in self.claims} & {c.key for c in self.destroy_claims}:
            raise ValueError("a lease cannot create and destroy the same (bucket, value)")
        if 0 < self.lease_ttl_ms < 1000:
            raise ValueError("lease_ttl_ms is 0 (no server-side expiry) or at least 1000")
        return self

    @property
    def partition_key(self) -> str:
        return str(self.lease_id)


class LeaseCommitRequested(Event):
    EVENT_TYPE: ClassVar[str] = "LeaseCommitRequested"

    lease_id: LeaseId
    cell_id: CellId

    @property
    def partition_key(self) -> str:
        return str(self.lease_id)


class LeaseRollbackRequested(Event):
    EVENT_TYPE: ClassVar[str] = "LeaseRollbackRequested"

    lease_id: LeaseId
    cell_id: CellId

    @property
    def partition_key(self) -> str:
        return str(self.lease_id)


class ClaimsDestroyRequested(Event):
    EVENT_TYPE: ClassVar[str] = "ClaimsDestroyRequested"

    cell_id: CellId
    owner_type: OwnerType
    owner_id: OwnerId
    claims: ClaimRefs

    _distinct_claims = field_validator("claims")(_distinct)

    @property
    def partition_key(self) -> str:
        return _owner_key(self.cell_id, self.owner_type, self.owner_id)


class OwnerTransferRequested(Event):
    EVENT_TYPE: ClassVar[str] = "OwnerTransferRequested"

    owner_type: OwnerType
    owner_id: OwnerId
    from_cell_id: CellId
    to_cell_id: CellId
    to_owner_id: OwnerId | None = None

    @model_validator(mode="after")
    def _two_cells(self) -> OwnerTransferRequested:
        if self.from_cell_id == self.to_cell_id:
            raise ValueError("to_cell_id must differ from from_cell_id")
        return self

    @property
    def partition_key(self) -> str:
        return _owner_key(self.from_cell_id, self.owner_type, self.owner_id)


class SequenceRangeRequested(Event):
    EVENT_TYPE: ClassVar[str] = "SequenceRangeRequested"

    cell_id: CellId
    sequence_name: str = Field(min_length=1, max_length=128, pattern=r"^[a-z0-9_.:-]+$")
    size: int = Field(ge=1, le=MAX_SEQUENCE_RANGE)

    @property
    def partition_key(self) -> str:
        return self.sequence_name


MAX_LEASES_PER_TICK = 1000


class LeaseExpiryTick(Event):
    """Expire the named leases whose end this record's log time reached (adr/0017).

    Keyed by the first lease it names, so it lands on that lease's partition; the
    publisher names only leases of one partition in one tick. A tick naming none
    (schema version 1) expires nothing."""

    EVENT_TYPE: ClassVar[str] = "LeaseExpiryTick"

    lease_ids: tuple[LeaseId, ...] = Field(default=(), max_length=MAX_LEASES_PER_TICK)

    @property
    def partition_key(self) -> str:
        return str(self.lease_ids[0]) if self.lease_ids else "tick"


# --- Decisions: on the claim-decisions topic, written once by the decider. ---


class ReleaseCause(StrEnum):
    ROLLBACK = "ROLLBACK"
    EXPIRED = "EXPIRED"


class RejectionReason(StrEnum):
    CONFLICT = "CONFLICT"
    UNKNOWN_LEASE = "UNKNOWN_LEASE"
    LEASE_EXPIRED = "LEASE_EXPIRED"
    WRONG_CELL = "WRONG_CELL"
    NOT_HELD = "NOT_HELD"
    INVALID = "INVALID"
    EXHAUSTED = "EXHAUSTED"


class Conflict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: ClaimBucket
    value: str
    cell_id: str


class _Decision(Event):
    request_id: uuid.UUID

    @property
    def partition_key(self) -> str:
        return str(self.request_id)


class LeaseGranted(_Decision):
    EVENT_TYPE: ClassVar[str] = "LeaseGranted"

    lease_id: LeaseId
    cell_id: str
    owner_type: OwnerType
    owner_id: OwnerId
    claims: tuple[ClaimRef, ...]
    destroy_claims: tuple[ClaimRef, ...] = ()
    expires_at: AwareDatetime  # NO_EXPIRY: the lease has no server-side end (adr/0022)


class LeaseCommitted(_Decision):
    EVENT_TYPE: ClassVar[str] = "LeaseCommitted"

    lease_id: LeaseId
    cell_id: str
    owner_type: OwnerType
    owner_id: OwnerId
    claims: tuple[ClaimRef, ...]
    destroy_claims: tuple[ClaimRef, ...] = ()


class LeaseReleased(Event):
    EVENT_TYPE: ClassVar[str] = "LeaseReleased"

    request_id: uuid.UUID | None = None  # None: expired, no request asked for it
    lease_id: LeaseId
    cell_id: str
    owner_type: OwnerType
    owner_id: OwnerId
    claims: tuple[ClaimRef, ...]
    destroy_claims: tuple[ClaimRef, ...] = ()
    cause: ReleaseCause

    @property
    def partition_key(self) -> str:
        return str(self.lease_id)


class ClaimsCommitted(_Decision):
    EVENT_TYPE: ClassVar[str] = "ClaimsCommitted"

    cell_id: str
    owner_type: OwnerType
    owner_id: OwnerId
    claims: tuple[ClaimRef, ...]


class ClaimsDestroyed(_Decision):
    EVENT_TYPE: ClassVar[str] = "ClaimsDestroyed"

    cell_id: str
    owner_type: OwnerType
    owner_id: OwnerId
    claims: tuple[ClaimRef, ...]


class OwnerTransferred(_Decision):
    EVENT_TYPE: ClassVar[str] = "OwnerTransferred"

    owner_type: OwnerType
    owner_id: OwnerId
    from_cell_id: str
    to_cell_id: str
    to_owner_id: OwnerId
    claims: tuple[ClaimRef, ...]


class SequenceRangeGranted(_Decision):
    EVENT_TYPE: ClassVar[str] = "SequenceRangeGranted"

    cell_id: str
    sequence_name: str
    start: int = Field(ge=0, le=2**63 - 1)
    end: int = Field(ge=0, le=2**63 - 1)


class RequestRejected(_Decision):
    EVENT_TYPE: ClassVar[str] = "RequestRejected"

    request_type: str
    reason: RejectionReason
    message: str
    conflicts: tuple[Conflict, ...] = ()


EVENT_MODELS: dict[str, type[Event]] = {
    model.EVENT_TYPE: model
    for model in (
        CellRegistered, CellUpdated, CellStateChanged, ClaimCreated, ClaimReleased,
        ClaimsRequested, LeaseCommitRequested, LeaseRollbackRequested, ClaimsDestroyRequested,
        OwnerTransferRequested, SequenceRangeRequested, LeaseExpiryTick,
        LeaseGranted, LeaseCommitted, LeaseReleased, ClaimsCommitted, ClaimsDestroyed, OwnerTransferred,
        SequenceRangeGranted, RequestRejected,
    )
}

CELL_EVENT_TYPES = frozenset({"CellRegistered", "CellUpdated", "CellStateChanged"})
CLAIM_EVENT_TYPES = frozenset({"ClaimCreated", "ClaimReleased"})
REQUEST_EVENT_TYPES = frozenset(
    {"ClaimsRequested", "LeaseCommitRequested", "LeaseRollbackRequested", "ClaimsDestroyRequested",
     "OwnerTransferRequested", "SequenceRangeRequested", "LeaseExpiryTick"}
)
DECISION_EVENT_TYPES = frozenset(
    {"LeaseGranted", "LeaseCommitted", "LeaseReleased", "ClaimsCommitted", "ClaimsDestroyed", "OwnerTransferred",
     "SequenceRangeGranted", "RequestRejected"}
)


class EventInputError(ValueError):
    """Input that is not a valid event; the message names every offending field."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(event)"
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


def parse_event(data: dict[str, Any], event_type: str | None = None) -> Event:
    """Validate one event given as a mapping with a ``type`` field (or ``event_type``)."""
    if not isinstance(data, dict):
        raise EventInputError("an event must be a JSON object")
    fields = dict(data)
    stated_type = fields.pop("type", None)
    if event_type is not None and stated_type is not None and stated_type != event_type:
        raise EventInputError(f"type: {stated_type!r} contradicts the event type {event_type!r}")
    given_type = event_type or stated_type
    if given_type is None:
        raise EventInputError(f"type: missing; one of {', '.join(sorted(EVENT_MODELS))}")
    model = EVENT_MODELS.get(given_type)
    if model is None:
        raise EventInputError(f"type: unknown event type {given_type!r}; one of {', '.join(sorted(EVENT_MODELS))}")
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise EventInputError(f"{given_type}: {_describe(exc)}", exc.errors(include_url=False)) from None


