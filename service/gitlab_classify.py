"""GitLab's ``Classify`` over one snapshot (adr/0021): which cell serves a request, the one
decision both doors answer with: ``ClassifyService.Classify`` over gRPC (``grpc_api``) and
``POST /v1/classify`` over HTTP (``query_api/gitlab_api.py``), each calling
:meth:`Tables.classify` with the same ``ClassifyRequest`` message.

The lookups are the read API's own (``schemas.router_sync.classify_in``, what
``GET /v1/classify`` answers with); this module maps GitLab's request onto them and
their answer onto ``ClassifyResponse`` (action PROXY, the cell's address as ``host:port``):

- ``FIRST_CELL``: the default cell (:func:`topology_store.service.gitlab_cells.first_cell`);
  a value, if any, is ignored.
- ``SESSION_PREFIX``: the cell whose session prefix starts the value (the longest).
- ``CELL_ID``: the value is GitLab's numeric cell id, in decimal.
- ``UNSPECIFIED`` with ``claims``: the first claim that matches answers, and is returned as
  ``matched_claim``. A ``route`` claim matches the owner of the path's top-level namespace
  (the routing table holds top-level namespaces, not GitLab's full paths), and
  ``matched_claim.route`` is that namespace. Other claim kinds (a project id, a service desk
  e-mail: what GitLab's mail router asks) are not in the routing table: they are looked up
  among the committed claims (:class:`ClaimOwners`, adr/0022) by :meth:`Tables.classify_claims`,
  which the gRPC door calls; without such a lookup (the REST door) they are UNIMPLEMENTED.

Anything else is refused with a :class:`Refusal`: bad input is INVALID_ARGUMENT with what
is wrong, an unknown key NOT_FOUND (what GitLab's clients read as "unknown"); each door
turns it into its own status (a gRPC status; an HTTP status as GitLab's grpc-gateway maps it).
:class:`Tables` holds the cells' numbers for the snapshot a door serves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from topology_store.runtime.settings import INT64_MAX
from topology_store.schemas.generated.proto import cell_info_pb2, classify_service_pb2
from topology_store.schemas.generated.proto.types.v1 import claim_pb2
from topology_store.schemas.models import stored_claim_value
from topology_store.schemas.router_sync import classify_in
from topology_store.service.gitlab_cells import (
    CellNumbers,
    all_cell_infos,
    first_cell,
    gitlab_address,
    number_cells,
    recorded_numbers,
)
from topology_store.service.gitlab_claims import BUCKET_OF_CLAIM_FIELD, our_bucket
from topology_store.service.refusals import Refusal as Refusal  # re-exported: the doors import it from here
from topology_store.service.refusals import invalid as invalid

log = logging.getLogger(__name__)

ClassifyType = classify_service_pb2.ClassifyType
MAX_VALUE_CHARS = 4096  # a path, a session cookie, a decimal id: far below this
CLAIM_KINDS = tuple(field.name for field in claim_pb2.Claim.DESCRIPTOR.oneofs_by_name["claim"].fields)
SERVED_CLAIM_KINDS = ("route",)


class Lookup(Protocol):
    def get(self, key: str, default: None = None, /) -> str | None: ...


class RoutingTables(Protocol):
    """What classification reads of a snapshot (``query_api.snapshot.Snapshot`` is one)."""

    @property
    def version(self) -> int: ...

    @property
    def cells_by_id(self) -> Mapping[str, Mapping[str, Any]]: ...

    @property
    def namespaces(self) -> Lookup: ...


@dataclass(frozen=True, slots=True)
class Classified:
    cell: Mapping[str, Any]
    matched_claim: claim_pb2.Claim | None = None

    def response(self) -> classify_service_pb2.ClassifyResponse:
        return classify_service_pb2.ClassifyResponse(
            action=classify_service_pb2.PROXY,
            proxy=classify_service_pb2.ProxyInfo(address=gitlab_address(self.cell["address"])),
            matched_claim=self.matched_claim,
        )


def _lookup(tables: RoutingTables, kind: str, value: str) -> Mapping[str, Any]:
    """The read API's classification, its HTTP answer turned into a cell or a Refusal."""
    status, document = classify_in(tables.version, tables.namespaces, tables.cells_by_id, kind, value)
    if status == 200:
        return document["cell"]  # type: ignore[no-any-return]
    message = document["error"]["message"]
    raise Refusal(grpc.StatusCode.NOT_FOUND if status == 404 else grpc.StatusCode.INVALID_ARGUMENT, message)


def _value(value: str, what: str) -> str:
    if not value.strip():
        raise invalid(f"value is empty: {what}")
    if len(value) > MAX_VALUE_CHARS:
        raise invalid(f"value is {len(value)} characters long; at most {MAX_VALUE_CHARS}")
    return value


def cell_by_number(tables: RoutingTables, numbers: CellNumbers, number: int) -> str:
    """Our cell name of GitLab's cell id ``number``, or a Refusal."""
    if number <= 0:
        raise invalid(f"cell id must be a positive integer (GitLab's int64 cell id), got {number}")
    if number in numbers.ambiguous:
        raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                      f"cell id {number} is ambiguous: cells {', '.join(numbers.ambiguous[number])} all claim it; "
                      "record each cell's number (CellUpdated number, adr/0021) or name it in TOPOLOGY_GRPC_CELL_IDS")
    name = numbers.by_number.get(number)
    if name is None or name not in tables.cells_by_id:
        raise Refusal(grpc.StatusCode.NOT_FOUND, f"no cell has id {number}")
    return name


def classify(request: classify_service_pb2.ClassifyRequest, tables: RoutingTables,
             numbers: CellNumbers) -> Classified:
    kind = request.type
    if kind not in ClassifyType.values():
        raise invalid(f"unknown classify type {kind}: one of {', '.join(ClassifyType.keys())}")
    if kind != classify_service_pb2.UNSPECIFIED and len(request.claims):
        raise invalid("give either a classify type (with its value) or claims, not both")
    if kind == classify_service_pb2.FIRST_CELL:
        name = first_cell(tables.cells_by_id, numbers)
        if name is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND, "no cell can be the first cell: no cell has a numeric id, or "
                          "every one is decommissioned (record a cell's number, adr/0021)")
        return Classified(tables.cells_by_id[name])
    if kind == classify_service_pb2.SESSION_PREFIX:
        return Classified(_lookup(tables, "SESSION_PREFIX", _value(request.value, "SESSION_PREFIX needs a session "
                                                                   "prefix (or a session value starting with one)")))
    if kind == classify_service_pb2.CELL_ID:
        text = _value(request.value, "CELL_ID needs a cell id").strip()
        if not text.isascii() or not text.isdigit() or int(text) > INT64_MAX:
            raise invalid(f"CELL_ID needs GitLab's numeric cell id (an int64, in decimal), got {text[:64]!r}")
        return Classified(_lookup(tables, "CELL_ID", cell_by_number(tables, numbers, int(text))))
    return _by_claims(request, tables)


def _claim_kinds(request: classify_service_pb2.ClassifyRequest, served: Iterable[str]) -> list[str]:
    """Each claim's kind, after checking the request is a claims request of ``served`` kinds."""
    if not request.claims:
        raise invalid("give a classify type (FIRST_CELL, SESSION_PREFIX or CELL_ID) with its value, or claims")
    if request.value:
        raise invalid("a value goes with a classify type; with claims, leave it empty")
    kinds = []
    for position, claim in enumerate(request.claims):
        kind = claim.WhichOneof("claim")
        if kind is None:
            raise invalid(f"claims[{position}] is empty: set one of {', '.join(CLAIM_KINDS)}")
        if kind not in served:
            raise Refusal(grpc.StatusCode.UNIMPLEMENTED,
                          f"claims[{position}]: classifying by {kind} is not served on this door; "
                          f"served: {', '.join(served)} (gRPC: every kind, adr/0022)")
        kinds.append(kind)
    return kinds


def _route(claim: claim_pb2.Claim, position: int) -> str:
    route = _value(claim.route, f"claims[{position}].route needs a path").strip("/")
    if not route:
        raise invalid(f"claims[{position}].route has no path segment")
    return route


def _routed(tables: RoutingTables, route: str) -> Classified | None:
    status, document = classify_in(tables.version, tables.namespaces, tables.cells_by_id, "ROUTE", route)
    if status == 200:
        return Classified(document["cell"], claim_pb2.Claim(route=document["key"]))
    return None


def _by_claims(request: classify_service_pb2.ClassifyRequest, tables: RoutingTables) -> Classified:
    _claim_kinds(request, SERVED_CLAIM_KINDS)
    routes = [_route(claim, position) for position, claim in enumerate(request.claims)]  # all checked first
    for route in routes:
        if (found := _routed(tables, route)) is not None:
            return found
    raise Refusal(grpc.StatusCode.NOT_FOUND, "no cell owns any of the claims")


class ClaimOwners(Protocol):
    """Which cell holds a committed claim (``grpc_api/claim_owners.py`` reads the projection)."""

    async def cell_of(self, bucket: str, stored_value: str) -> str | None: ...


async def classify_claims(request: classify_service_pb2.ClassifyRequest, tables: RoutingTables,
                          owners: ClaimOwners, secret: bytes) -> Classified:
    """Classify by claims of every kind, in order: a route by the routing table, any other by
    the committed claim of its bucket (an e-mail by its keyed hash)."""
    kinds = _claim_kinds(request, CLAIM_KINDS)
    wanted: list[tuple[claim_pb2.Claim, str | None, tuple[str, str] | None]] = []
    for position, (claim, kind) in enumerate(zip(request.claims, kinds, strict=True)):  # all checked first
        if kind == "route":
            wanted.append((claim, _route(claim, position), None))
            continue
        value = str(getattr(claim, kind))
        bucket = our_bucket(BUCKET_OF_CLAIM_FIELD[kind], value)
        try:
            stored = stored_claim_value(bucket, value, secret)
        except ValueError as exc:
            raise invalid(f"claims[{position}].{kind}: {exc}") from None
        wanted.append((claim, None, (bucket.value, stored)))
    for claim, route, key in wanted:
        if route is not None:
            if (found := _routed(tables, route)) is not None:
                return found
        elif key is not None and (cell := await owners.cell_of(*key)) is not None and cell in tables.cells_by_id:
            return Classified(tables.cells_by_id[cell], claim)
    raise Refusal(grpc.StatusCode.NOT_FOUND, "no cell owns any of the claims")


class SnapshotSource(Protocol):
    """Where the current snapshot is (``query_api.snapshot.SnapshotCache`` is one)."""

    @property
    def current(self) -> RoutingTables | None: ...


class Tables:
    """The current snapshot, and its cells' numbers (computed again when the cells or their
    recorded numbers change). One per door; the numbers depend on the cell names, the numbers
    their events recorded and ``TOPOLOGY_GRPC_CELL_IDS`` only (service/gitlab_cells.py)."""

    def __init__(self, snapshots: SnapshotSource, configured: dict[str, int]) -> None:
        self._snapshots = snapshots
        self._configured = configured
        self._numbers: tuple[tuple[tuple[str, int | None], ...], CellNumbers] | None = None

    def current(self) -> tuple[RoutingTables, CellNumbers]:
        tables = self._snapshots.current
        if tables is None:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "no snapshot loaded yet; retry shortly")
        recorded = recorded_numbers(tables.cells_by_id)
        key = tuple((name, recorded.get(name)) for name in tables.cells_by_id)  # not the version: few changes
        if self._numbers is None or self._numbers[0] != key:
            numbers = number_cells(tables.cells_by_id, self._configured, recorded)
            unnumbered = sorted(set(tables.cells_by_id) - set(numbers.by_name))
            if unnumbered:
                log.warning("cells without a numeric id are left out of GetCells: %s (record their numbers, "
                            "adr/0021)", ", ".join(unnumbered))
            overridden = sorted(f"{name} (recorded {recorded[name]}, configured {self._configured[name]})"
                                for name in recorded.keys() & self._configured.keys()
                                if recorded[name] != self._configured[name])
            if overridden:
                log.warning("TOPOLOGY_GRPC_CELL_IDS disagrees with the numbers the cell events recorded; the "
                            "events win: %s", ", ".join(overridden))
            self._numbers = (key, numbers)
        return tables, self._numbers[1]

    def cell_name(self, number: int) -> str:
        """Our cell name of GitLab's int64 cell id ``number`` (a request's ``cell_id``), in the
        current snapshot; else a :class:`Refusal`: INVALID_ARGUMENT (not a positive id),
        FAILED_PRECONDITION (two cells claim it), NOT_FOUND (no cell has it)."""
        tables, numbers = self.current()
        return cell_by_number(tables, numbers, number)

    def cell_number(self, name: str) -> int:
        """GitLab's int64 cell id of our cell ``name``; a :class:`Refusal` NOT_FOUND for a cell
        the snapshot does not hold or that has no number."""
        tables, numbers = self.current()
        if name not in tables.cells_by_id:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"no cell is named {name[:200]!r}")
        number = numbers.by_name.get(name)
        if number is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"cell {name!r} has no numeric id (GitLab's cell id): record "
                          "it with a CellUpdated number (adr/0021)")
        return number

    def classify(self, request: classify_service_pb2.ClassifyRequest) -> classify_service_pb2.ClassifyResponse:
        """GitLab's Classify over the current snapshot, or a :class:`Refusal`."""
        return self.classify_at(request)[0]

    def classify_at(self, request: classify_service_pb2.ClassifyRequest
                    ) -> tuple[classify_service_pb2.ClassifyResponse, RoutingTables]:
        """:meth:`classify`, and the snapshot that decided (its version is the answer's)."""
        tables, numbers = self.current()
        return classify(request, tables, numbers).response(), tables

    async def classify_claims(self, request: classify_service_pb2.ClassifyRequest, owners: ClaimOwners,
                              secret: bytes) -> classify_service_pb2.ClassifyResponse:
        """:meth:`classify`, with claims of every kind looked up in ``owners``."""
        tables, numbers = self.current()
        if request.type == classify_service_pb2.UNSPECIFIED and any(
                claim.WhichOneof("claim") not in (None, *SERVED_CLAIM_KINDS) for claim in request.claims):
            return (await classify_claims(request, tables, owners, secret)).response()
        return classify(request, tables, numbers).response()

    def get_cells(self) -> cell_info_pb2.GetCellsResponse:
        tables, numbers = self.current()
        return cell_info_pb2.GetCellsResponse(cells=all_cell_infos(tables.cells_by_id, numbers))
