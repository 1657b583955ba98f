"""Our cells in GitLab's shape (adr/0021): a numeric id per cell, and ``CellInfo``.

GitLab names a cell by an int64 (``CellInfo.id``, the ``cell.id`` of Rails' config); our
cells have a name (``cell-1``). Until a cell event carries the number, it comes from
``TOPOLOGY_GRPC_CELL_IDS`` (a name -> number map) or, for a cell not named there, from
the digits its name ends with (``cell-7`` -> 7, ``12`` -> 12). Two cells that would get
the same number get neither: the number is *ambiguous*, and asking for it says so, with
the setting that resolves it. A cell with no number is left out of ``GetCells``.

Our cells' addresses are URLs (``https://cell-1.example.com``); GitLab's are
``host:port`` (its mail router refuses an address with a ``/``): :func:`gitlab_address`.

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


def number_cells(cell_ids: Iterable[str], configured: Mapping[str, int]) -> CellNumbers:
    """Each cell's number: the configured one, else the derived one unless another cell
    has (or derives) the same number."""
    names = sorted(cell_ids)
    claimants: dict[int, list[str]] = {}
    for name in names:
        number = configured[name] if name in configured else derived_number(name)
        if number is not None:
            claimants.setdefault(number, []).append(name)
    for name, number in configured.items():
        if name not in claimants.get(number, ()):
            claimants.setdefault(number, []).append(name)  # reserved even for a cell not (yet) known
    by_number: dict[int, str] = {}
    ambiguous: dict[int, tuple[str, ...]] = {}
    for number, holders in claimants.items():
        chosen = [name for name in holders if configured.get(name) == number]
        if len(holders) == 1 or len(chosen) == 1:
            by_number[number] = (chosen or holders)[0]  # a configured number beats derived ones
        else:
            ambiguous[number] = tuple(sorted(holders))
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


def cell_info(cell: Mapping[str, Any], number: int) -> cell_info_pb2.CellInfo:
    """A snapshot cell row as GitLab's ``CellInfo``. Sequence ranges are not part of the
    snapshot, so none are sent (adr/0021)."""
    return cell_info_pb2.CellInfo(id=number, address=gitlab_address(cell["address"]),
                                  session_prefix=cell["session_prefix"])


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
