"""Response documents of the read API. The snapshot body is serialized once per
version from these models and then served as bytes."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from schemas.models import CellState, ClaimBucket, OwnerType


class CellView(BaseModel):
    cell_id: str
    address: str
    session_prefix: str
    region: str
    weight: int
    state: CellState
    state_reason: str


class SnapshotDocument(BaseModel):
    version: int = Field(description="Topology version; also the ETag")
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
    version: int = Field(description="The version the client holds once it applied them; also the ETag")
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
