"""The read API's response documents (pydantic): what each route answers, for validation
and for the OpenAPI document (adr/0009). The snapshot body is serialized once per version
from plain data (``query_api/snapshot.py``) and then served as bytes; these models only
describe it. The event and command models are ``schemas/models.py``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from topology_store.schemas.models import CellState, ClaimBucket, OwnerType


def any_case_pattern(names: Iterable[str]) -> str:
    """An OpenAPI (ECMA) regular expression of ``names`` in any letter case. Some
    parameters are upper-cased before use, and OpenAPI patterns have no
    case-insensitive flag; stating the pattern lets clients and fuzzers know it."""
    def letter(c: str) -> str:
        return f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c)

    return "^(" + "|".join("".join(map(letter, name)) for name in names) + ")$"


class SequenceRangeView(BaseModel):
    sequence_name: str
    start: int = Field(description="The first id of the range")
    end: int = Field(description="The id after the last one: the range is [start, end)")


class CellView(BaseModel):
    cell_id: str
    address: str
    session_prefix: str
    region: str
    weight: int
    state: CellState
    state_reason: str
    number: int | None = Field(default=None, description="GitLab's numeric cell id (Rails' cell.id); null: none "
                               "recorded (adr/0021). Absent from servers before it was added")
    sequence_ranges: list[SequenceRangeView] = Field(
        default_factory=list, description="The id ranges granted to the cell, by sequence name and start")


class SnapshotDocument(BaseModel):
    version: int = Field(description="Topology version (X-Topology-Version; the ETag starts with it)")
    committed_at: datetime = Field(description="When the projector committed this version")
    namespace_count: int = Field(description="Entries in namespaces")
    namespace_digest: int = Field(
        description="Sum mod 2**64 of CRC-32(path + TAB + cell_id) over namespaces: lets a client check its copy"
    )
    cells: list[CellView]
    namespaces: dict[str, str] = Field(description="Top-level namespace path -> owning cell id")


class DeltaDocument(BaseModel):
    """The net changes from ``since`` to ``version``: apply deletions, then upserts."""

    since: int = Field(description="The version the changes start from (the client's)")
    version: int = Field(description="The version the client holds once it applied them (X-Topology-Version)")
    committed_at: datetime
    namespace_count: int = Field(description="Namespaces in the whole table at version")
    namespace_digest: int = Field(description="Digest of the whole namespace table at version (see snapshot)")
    cells: list[CellView] = Field(description="Cells added or changed (whole rows)")
    deleted_cells: list[str]
    namespaces: dict[str, str] = Field(description="Namespaces added or moved: path -> cell id")
    deleted_namespaces: list[str] = Field(description="Namespaces that no longer route")


class ClassifyDocument(BaseModel):
    version: int = Field(description="The topology version the answer comes from")
    type: str = Field(description="ROUTE, SESSION_PREFIX or CELL_ID")
    value: str
    key: str = Field(description="What was looked up: the top-level namespace of a ROUTE, the matching prefix, ...")
    cell: CellView


class CellsDocument(BaseModel):
    version: int
    cells: list[CellView]


class ClaimView(BaseModel):
    bucket: ClaimBucket
    value: str
    cell_id: str
    owner_type: OwnerType
    owner_id: int
    claimed_at: datetime
    version: int = Field(description="Topology version at which the claim last changed")
    status: str = Field(description="COMMITTED, or LEASED while a lease reserves it (leased claims do not route)")


class ReadyDocument(BaseModel):
    status: str = Field(description="ready, or stale while PostgreSQL is unreachable")
    stale: bool = Field(description="True while the snapshot served cannot be refreshed")
    version: int = Field(description="Topology version of the snapshot served")
    age_seconds: float = Field(description="Since the projector last committed, as this process knows it")
    database: str | None = Field(default=None, description="Why PostgreSQL is unreachable (only when stale)")


class AuditDocument(BaseModel):
    kind: str = Field(description="The audit index's kind: claim, cell, lease or owner")
    key: str = Field(description="The key looked up (claim values canonical, e-mails hashed)")
    events: list[dict[str, Any]] = Field(
        description="In log order: position, log_time, event_type, source, outcome, reason, payload, decisions")
    truncated: bool = Field(description="More events touched the key than limit")


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorDocument(BaseModel):
    error: ErrorBody


class GoneBody(ErrorBody):
    oldest_since: int = Field(description="The oldest since a delta can start from now")
    version: int = Field(description="The current version")


class GoneDocument(BaseModel):
    error: GoneBody
