"""Our cells in GitLab's shape (adr/0021): a numeric id per cell, and ``CellInfo``.

GitLab names a cell by an int64 (``CellInfo.id``, the ``cell.id`` of Rails' config); our
cells have a name (``cell-1``). A cell's number is, in this order:

1. **recorded**: the ``number`` of its ``CellRegistered`` or ``CellUpdated`` event, in the
   snapshot's cell document (data, decided in the log: unique across cells, never changed);
2. **configured**: ``TOPOLOGY_GRPC_CELL_IDS`` (a name -> number map), for a cell with none
   recorded. A configured number that disagrees with a recorded one is ignored (and logged):
   the event wins;
3. **derived**: the digits its name ends with (``cell-7`` -> 7, ``12`` -> 12), for a cell
   with neither.

For each number, the claimants of the highest of these tiers decide: one gets it (a recorded
number beats a configured or derived one, a configured one beats a derived one); two of the
same tier get neither: the number is *ambiguous*, and asking for it says so, with what
resolves it. A cell with no number is left out of ``GetCells``.

Our cells' addresses are URLs (``https://cell-1.example.com``); GitLab's are
``host:port`` (its mail router refuses an address with a ``/``): :func:`gitlab_address`.
A cell's ``CellInfo.sequence_ranges`` are the ranges granted to it (our ``[start, end)``,
GitLab's inclusive ``minval``/``maxval``): :func:`sequence_ranges`.

Pure functions over the snapshot's plain cell rows; the servicers call them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from topology_store.runtime.settings import INT64_MAX
from topology_store.schemas.generated.proto import cell_info_pb2

_TRAILING_NUMBER = re.compile(r"(?:^|-)([1-9][0-9]{0,18})$")


def derived_number(cell_id: str) -> int | None:
    """The number a cell's name ends with (after a dash, or the whole name), if any."""
    match = _TRAILING_NUMBER.search(cell_id)
    if match is None:
        return None
    number = int(match.group(1))
    return number if number <= INT64_MAX else None


@dataclass(frozen=True, slots=True)
class CellNumbers:
    """Both directions of the name <-> number map, and the numbers two cells claim."""

    by_number: Mapping[int, str]
    by_name: Mapping[str, int]
    ambiguous: Mapping[int, tuple[str, ...]]


# The tiers of a cell's number, strongest first (the module docstring).
RECORDED, CONFIGURED, DERIVED = 0, 1, 2


def recorded_numbers(cells_by_id: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """The numbers the cell events recorded, by cell name (a document from before the
    field has none)."""
    return {name: cell["number"] for name, cell in cells_by_id.items() if cell.get("number") is not None}


def number_cells(cell_ids: Iterable[str], configured: Mapping[str, int],
                 recorded: Mapping[str, int] | None = None) -> CellNumbers:
    """Each cell's number: the recorded one, else the configured one, else the derived one;
    for each number the strongest tier's single claimant, or no one (ambiguous)."""
    recorded = recorded or {}
    names = sorted(cell_ids)
    claimants: dict[int, list[tuple[int, str]]] = {}
    for name in names:
        if name in recorded:
            tier, number = RECORDED, recorded[name]
        elif name in configured:
            tier, number = CONFIGURED, configured[name]
        else:
            tier, number = DERIVED, derived_number(name)
        if number is not None:
            claimants.setdefault(number, []).append((tier, name))
    for name, number in configured.items():
        if name not in recorded and (CONFIGURED, name) not in claimants.get(number, ()):
            claimants.setdefault(number, []).append((CONFIGURED, name))  # reserved even for a cell not (yet) known
    by_number: dict[int, str] = {}
    ambiguous: dict[int, tuple[str, ...]] = {}
    for number, holders in claimants.items():
        strongest = min(tier for tier, _ in holders)
        chosen = sorted(name for tier, name in holders if tier == strongest)
        if len(chosen) == 1:
            by_number[number] = chosen[0]
        else:
            ambiguous[number] = tuple(chosen)
    known = set(names)
    by_number = {number: name for number, name in by_number.items() if name in known}
    return CellNumbers(by_number, {name: number for number, name in by_number.items()}, ambiguous)


_DEFAULT_PORTS = {"https": 443, "http": 80}


def gitlab_address(url: str) -> str:
    """A cell's URL as GitLab's ``host:port``: the port the URL names, else its scheme's
    (``https://cell-1.example.com`` -> ``cell-1.example.com:443``); a path is dropped."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    return f"{host}:{port}" if port else host


def sequence_ranges(cell: Mapping[str, Any]) -> list[cell_info_pb2.SequenceRange]:
    """The ranges granted to a snapshot cell, by sequence name and start, as GitLab's
    ``SequenceRange``: our ``[start, end)`` is its inclusive ``minval``..``maxval``."""
    return [cell_info_pb2.SequenceRange(minval=r["start"], maxval=r["end"] - 1)
            for r in cell.get("sequence_ranges", ())]


def cell_info(cell: Mapping[str, Any], number: int) -> cell_info_pb2.CellInfo:
    """A snapshot cell row as GitLab's ``CellInfo``. ``sequence_ranges``: every range granted
    to the cell; the older single ``sequence_range``: the cell's range when it has exactly one
    (given one of several, an older client could not tell that it misses the others)."""
    ranges = sequence_ranges(cell)
    return cell_info_pb2.CellInfo(id=number, address=gitlab_address(cell["address"]),
                                  session_prefix=cell["session_prefix"], sequence_ranges=ranges,
                                  sequence_range=ranges[0] if len(ranges) == 1 else None)


def all_cell_infos(cells_by_id: Mapping[str, Mapping[str, Any]], numbers: CellNumbers) -> list[cell_info_pb2.CellInfo]:
    """Every cell that has a number, by number."""
    return [cell_info(cells_by_id[name], number) for number, name in sorted(numbers.by_number.items())]


def first_cell(cells_by_id: Mapping[str, Mapping[str, Any]], numbers: CellNumbers) -> str | None:
    """GitLab's FIRST_CELL, the default cell: the cell with the lowest number that is not
    decommissioned (the legacy cell, cell 1, in GitLab's deployments)."""
    for _, name in sorted(numbers.by_number.items()):
        if cells_by_id[name]["state"] != "DECOMMISSIONED":
            return name
    return None
