"""The router sync protocol's wire details, shared by the read API and the router
client (``router/``). Pure functions, no I/O and no web framework (adr/0009).

Documents (JSON; MessagePack carries the same fields, see below):

- full snapshot (``GET /v1/snapshot``)::

    {"version": 7, "committed_at": "...", "namespace_count": 2, "namespace_digest": 123,
     "cells": [{cell}, ...], "namespaces": {"gitlab-org": "cell-1", ...}}

- delta (``GET /v1/snapshot?since=5``): the net changes from version 5 to 7::

    {"since": 5, "version": 7, "committed_at": "...", "namespace_count": 2, "namespace_digest": 123,
     "cells": [{cell}, ...], "deleted_cells": [], "namespaces": {"a": "cell-1"}, "deleted_namespaces": ["b"]}

``namespace_count`` and ``namespace_digest`` describe the whole namespace table at
``version``, so a client that applied a delta can check that it now holds exactly
what the server holds. The digest is the sum, modulo 2**64, of the CRC-32 of each
``path + "\\t" + cell_id`` (UTF-8): order-independent and cheap to maintain as rows
change.

The MessagePack full snapshot stores namespaces as two columns, which is what
makes it smaller: ``cell_ids`` (the distinct owning cell ids), ``namespace_paths``
and ``namespace_cells`` (an index into ``cell_ids`` per path). Deltas in MessagePack
have exactly the JSON fields.

Every document is serialized in one order, whatever built it: namespaces by path and
cells by id (code point order), each cell's fields by name, the delta's lists sorted.
So the bytes of a version's snapshot do not depend on whether the API process loaded
it whole or derived it from deltas, and two processes send the same bytes.

Entity tags name a representation (RFC 9110 §8.8.3), :func:`representation_etag`:
``"7-json"`` and ``"7-msgpack"`` are strong (the uncompressed bytes are fixed by the
version and the format); ``W/"7-json+zstd"``, ``W/"7-msgpack+gzip"`` are weak (the
compressed bytes depend on the compressor's level and library, not on the data); a
delta adds where it starts, ``"7-since-5-json"``, so it never carries the full
snapshot's tag. The coding in a tag is the one negotiated (a body under 512 bytes goes
out uncompressed under the same weak tag). In If-None-Match the server reads any tag
by its leading version (:func:`etag_versions`): ``"7"`` (what servers before these
tags sent), ``"7-json"``, ``W/"7-msgpack+zstd"`` all say "I hold version 7".
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any, Protocol

JSON = "application/json"
MSGPACK = "application/msgpack"
MSGPACK_ALIASES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
ENCODINGS = ("zstd", "gzip")  # in order of preference, after the client's q-values

VERSION_HEADER = "X-Topology-Version"
AGE_HEADER = "X-Topology-Age-Seconds"
SNAPSHOT_READ = "snapshot:read"
# The claims scopes, checked by the HTTP and the gRPC doors alike.
CLAIMS_READ = "claims:read"
CLAIMS_WRITE = "claims:write"

DIGEST_MODULUS = 1 << 64


def error_document(code: str, message: str, **extra: object) -> dict[str, object]:
    """The error document of every API and the router sidecar:
    ``{"error": {"code": ..., "message": ..., **extra}}``."""
    return {"error": {"code": code, "message": message, **extra}}


def entry_digest(path: str, cell_id: str) -> int:
    return zlib.crc32(f"{path}\t{cell_id}".encode())


def namespace_digest(namespaces: Mapping[str, str]) -> int:
    return sum(map(zlib.crc32, map(str.encode, map("\t".join, namespaces.items())))) % DIGEST_MODULUS


# What parse_wait reads, and the OpenAPI pattern of ?wait=: ASCII digits and spaces only (a
# line break or a non-ASCII digit is not a number of seconds).
WAIT_PATTERN = r"^ *([0-9]+(\.[0-9]+)?) *(ms|s|m)? *$"


def parse_wait(value: str) -> float:
    """``30s``, ``500ms``, ``2m`` or a bare number of seconds."""
    match = re.fullmatch(WAIT_PATTERN, value)
    if match is None:
        raise ValueError("wait must look like 30s, 500ms, 1m or 30")
    number = float(match.group(1))
    return number / 1000 if match.group(3) == "ms" else number * 60 if match.group(3) == "m" else number


_FORMAT_NAMES = {JSON: "json", MSGPACK: "msgpack"}
_TAGGED = re.compile(r"(\d+)(?:-[!#-~]*)?")  # the version, then anything a tag may hold


@lru_cache(maxsize=256)
def representation_etag(version: int, fmt: str, encoding: str = "identity", since: int | None = None) -> str:
    """The entity tag of one representation: the full snapshot at ``version`` (or the
    delta from ``since``) in ``fmt`` under the negotiated content coding ``encoding``.
    Strong uncompressed, weak compressed (see the module docstring)."""
    name = _FORMAT_NAMES[fmt]
    start = "" if since is None else f"-since-{since}"
    if encoding == "identity":
        return f'"{version}{start}-{name}"'
    return f'W/"{version}{start}-{name}+{encoding}"'


@lru_cache(maxsize=1024)
def etag_versions(if_none_match: str) -> tuple[bool, int | None]:
    """(matches anything, the highest version named) of an If-None-Match value.
    Every entity tag here starts with a version (``"7"``, ``"7-json"``,
    ``W/"7-since-5-msgpack+zstd"``), and versions only grow, so a client naming
    version V already holds everything up to V, in whatever representation."""
    if if_none_match.strip() == "*":
        return True, None
    highest: int | None = None
    for tag in if_none_match.split(","):
        match = _TAGGED.fullmatch(tag.strip().removeprefix("W/").strip('"'))
        if match is not None:
            version = int(match.group(1))
            highest = version if highest is None else max(highest, version)
    return False, highest


def _qvalues(header: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, val = param.strip().partition("=")
            if key.strip() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        values[name] = q
    return values


@lru_cache(maxsize=256)
def choose_encoding(accept_encoding: str) -> str:
    """``zstd``, ``gzip`` or ``identity`` for an Accept-Encoding value."""
    if not accept_encoding:
        return "identity"
    offered = _qvalues(accept_encoding)
    wildcard = offered.get("*", 0.0)
    best, best_q = "identity", 0.0
    for encoding in ENCODINGS:
        q = offered.get(encoding, wildcard)
        if q > best_q:
            best, best_q = encoding, q
    return best


@lru_cache(maxsize=256)
def choose_format(accept: str) -> str | None:
    """``JSON`` or ``MSGPACK`` for an Accept value; None when neither is acceptable."""
    if not accept:
        return JSON
    offered = _qvalues(accept)
    msgpack_q = max((offered.get(alias, 0.0) for alias in MSGPACK_ALIASES), default=0.0)
    json_q = max(offered.get(JSON, 0.0), offered.get("application/*", 0.0), offered.get("*/*", 0.0))
    if msgpack_q > json_q:
        return MSGPACK
    if json_q > 0:
        return JSON
    return None


def apply_delta(
    cells: dict[str, dict[str, Any]], namespaces: dict[str, str], delta: Mapping[str, Any]
) -> None:
    """Apply a delta document to plain tables, in place."""
    for cell_id in delta.get("deleted_cells", ()):
        cells.pop(cell_id, None)
    for cell in delta.get("cells", ()):
        cells[cell["cell_id"]] = dict(cell)
    for path in delta.get("deleted_namespaces", ()):
        namespaces.pop(path, None)
    namespaces.update(delta.get("namespaces", {}))


def digest_after(
    namespaces: Mapping[str, str], digest: int, count: int, upserts: Mapping[str, str], deletions: Iterable[str]
) -> tuple[int, int]:
    """(digest, count) of ``namespaces`` once ``upserts`` and ``deletions`` are applied,
    without changing it."""
    for path in deletions:
        old = namespaces.get(path)
        if old is not None and path not in upserts:
            digest -= entry_digest(path, old)
            count -= 1
    for path, cell_id in upserts.items():
        old = namespaces.get(path)
        if old is None:
            count += 1
        else:
            digest -= entry_digest(path, old)
        digest += entry_digest(path, cell_id)
    return digest % DIGEST_MODULUS, count


def decode_msgpack_snapshot(document: dict[str, Any]) -> dict[str, Any]:
    """The MessagePack full snapshot, in the JSON document's shape."""
    if "namespace_paths" not in document:
        return document
    cell_ids = document.pop("cell_ids")
    paths = document.pop("namespace_paths")
    indexes = document.pop("namespace_cells")
    document["namespaces"] = dict(zip(paths, map(cell_ids.__getitem__, indexes), strict=True))
    return document


# A cell's document, as routers and the gRPC door see it, from the projection tables: the
# projector writes the change log with it and the read API loads a full snapshot with it, so
# a version's cells are the same whichever way a process built them. ``number``: GitLab's cell
# id or null; ``sequence_ranges``: the ids [start, end) granted to the cell, by sequence and
# start (adr/0021). Both were added after the first readers: a reader ignores fields it does
# not know. Placeholders: {cells}, {ranges} (the tables), {where} (a filter on ``c``).
CELL_DOCUMENTS_SQL = (
    "SELECT c.cell_id, c.address, c.session_prefix, c.region, c.weight, c.state, c.state_reason, c.number, "
    "coalesce((SELECT jsonb_agg(jsonb_build_object('sequence_name', r.sequence_name, 'start', r.start, "
    "'end', r.\"end\") ORDER BY r.sequence_name, r.start) FROM {ranges} r WHERE r.cell_id = c.cell_id), "
    "'[]'::jsonb) AS sequence_ranges FROM {cells} c {where} ORDER BY c.cell_id"
)
# Every cell, from the tables the search path finds.
CELLS_QUERY = CELL_DOCUMENTS_SQL.format(cells="cells", ranges="sequence_ranges", where="")


CLASSIFY_TYPES = ("ROUTE", "SESSION_PREFIX", "CELL_ID")


class _Lookup(Protocol):
    def get(self, key: str, default: None = None, /) -> str | None: ...


def classify_in(
    version: int, namespaces: _Lookup, cells_by_id: Mapping[str, Mapping[str, Any]], kind: str, value: str
) -> tuple[int, dict[str, Any]]:
    """Which cell serves a request, from the tables at ``version``: (HTTP status,
    document). ROUTE: the owner of the path's top-level namespace; SESSION_PREFIX:
    the cell whose session prefix starts the value (the longest); CELL_ID: the cell."""
    kind = kind.upper()
    if kind == "ROUTE":
        key = value.strip("/").split("/", 1)[0].lower()
        cell_id = namespaces.get(key) if key else None
        if cell_id is None:
            return 404, error_document("not_found", f"no cell owns the namespace {key!r}")
    elif kind == "SESSION_PREFIX":
        owners = [c for c in cells_by_id.values() if c["session_prefix"] and value.startswith(c["session_prefix"])]
        if not owners:
            return 404, error_document("not_found", "no cell's session prefix starts this value")
        owner = max(owners, key=lambda c: len(c["session_prefix"]))
        key, cell_id = owner["session_prefix"], owner["cell_id"]
    elif kind == "CELL_ID":
        key, cell_id = value, value
    else:
        return 400, error_document("bad_type", f"type must be one of {', '.join(CLASSIFY_TYPES)}")
    cell = cells_by_id.get(cell_id)
    if cell is None:
        return 404, error_document("cell_not_found", f"{key!r} belongs to unknown cell {cell_id!r}")
    return 200, {"version": version, "type": kind, "value": value, "key": key, "cell": dict(cell)}
