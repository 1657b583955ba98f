"""Our cells in GitLab's shape (service/gitlab_cells.py, adr/0021): numeric ids (recorded, configured,
derived), addresses, sequence ranges, the first cell; and the name <-> number helper of the doors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from topology_store.schemas.generated.proto.cell_info_pb2 import CellInfo, SequenceRange
from topology_store.service.gitlab_cells import (
    cell_info,
    derived_number,
    first_cell,
    gitlab_address,
    number_cells,
    recorded_numbers,
)
from topology_store.service.gitlab_classify import Refusal, Tables


@pytest.mark.parametrize(("name", "number"), [
    ("cell-1", 1), ("cell-42", 42), ("7", 7), ("us-east-1-cell-12", 12), ("cell", None), ("cell-0", None),
    ("cell-01", None), ("legacy", None), ("cell-9223372036854775807", 2**63 - 1), ("cell-9223372036854775808", None),
])
def test_a_number_is_the_digits_a_name_ends_with(name: str, number: int | None) -> None:
    assert derived_number(name) == number


def test_configured_numbers_win_and_collisions_give_no_one_the_number() -> None:
    numbers = number_cells(["legacy", "cell-2", "cell-3", "blue-3", "cell-4", "other"], {"legacy": 1, "other": 4})
    assert dict(numbers.by_number) == {1: "legacy", 2: "cell-2", 4: "other"}
    assert numbers.by_name["cell-2"] == 2
    assert dict(numbers.ambiguous) == {3: ("blue-3", "cell-3")}
    assert "cell-4" not in numbers.by_name  # 4 is configured for "other": never derived away from it


def test_a_configured_number_stays_reserved_for_a_cell_not_registered_yet() -> None:
    numbers = number_cells(["cell-1"], {"future": 1})
    assert dict(numbers.by_number) == {} and dict(numbers.ambiguous) == {}


@pytest.mark.parametrize(("url", "address"), [
    ("https://cell-1.example.com", "cell-1.example.com:443"),
    ("https://cell-1.example.com:8443/", "cell-1.example.com:8443"),
    ("http://cell-1.example.com/some/path", "cell-1.example.com:80"),
    ("https://[2001:db8::1]:9443", "[2001:db8::1]:9443"),
])
def test_an_address_is_host_and_port(url: str, address: str) -> None:
    assert gitlab_address(url) == address


def test_the_first_cell_is_the_lowest_number_not_decommissioned() -> None:
    cells = {"a-1": {"state": "DECOMMISSIONED"}, "b-2": {"state": "DRAINING"}, "c-3": {"state": "ACTIVE"}}
    assert first_cell(cells, number_cells(cells, {})) == "b-2"
    assert first_cell({"x": {"state": "ACTIVE"}}, number_cells(["x"], {})) is None


def test_a_recorded_number_wins_over_a_configured_and_a_derived_one() -> None:
    # cell-2 recorded 9: its configured 5 and its digits 2 are not its number, and not reserved.
    # cell-5 derives 5, free again; "blue-9" derives 9, which cell-2 recorded: cell-2 keeps it.
    numbers = number_cells(["cell-2", "cell-5", "blue-9", "cell-7"], {"cell-2": 5, "cell-7": 70},
                           recorded={"cell-2": 9})
    assert dict(numbers.by_number) == {9: "cell-2", 5: "cell-5", 70: "cell-7"}
    assert dict(numbers.ambiguous) == {}
    assert "blue-9" not in numbers.by_name


def test_a_recorded_number_beats_a_configured_one_of_another_cell() -> None:
    numbers = number_cells(["legacy", "cell-1"], {"legacy": 1}, recorded={"cell-1": 1})
    assert dict(numbers.by_number) == {1: "cell-1"} and "legacy" not in numbers.by_name


def test_two_cells_of_one_tier_get_neither_and_a_stronger_tier_resolves_it() -> None:
    assert dict(number_cells(["a-3", "b-3"], {}).ambiguous) == {3: ("a-3", "b-3")}
    resolved = number_cells(["a-3", "b-3"], {}, recorded={"b-3": 3})
    assert dict(resolved.by_number) == {3: "b-3"} and dict(resolved.ambiguous) == {}
    assert dict(number_cells(["x", "y"], {"x": 4, "y": 4}).ambiguous) == {4: ("x", "y")}


def test_recorded_numbers_are_read_from_documents_old_and_new() -> None:
    cells = {"a": {"number": 3}, "b": {"number": None}, "c": {}}  # c: a document from before the field
    assert recorded_numbers(cells) == {"a": 3}


def test_cell_info_carries_the_granted_ranges_inclusive() -> None:
    cell = {"address": "https://c.example.com", "session_prefix": "c-",
            "sequence_ranges": [{"sequence_name": "ids", "start": 1000, "end": 2000},
                                {"sequence_name": "ids", "start": 5000, "end": 5001}]}
    info = cell_info(cell, 4)
    assert list(info.sequence_ranges) == [SequenceRange(minval=1000, maxval=1999), SequenceRange(minval=5000,
                                                                                                 maxval=5000)]
    assert not info.HasField("sequence_range")  # one of several would mislead an older client


def test_cell_info_sets_the_older_single_range_when_there_is_one() -> None:
    one = {"address": "https://c.example.com", "session_prefix": "c-",
           "sequence_ranges": [{"sequence_name": "ids", "start": 1, "end": 1_000_001}]}
    assert cell_info(one, 4).sequence_range == SequenceRange(minval=1, maxval=1_000_000)
    old = {"address": "https://c.example.com", "session_prefix": "c-"}  # a document from before the ranges
    assert cell_info(old, 4) == CellInfo(id=4, address="c.example.com:443", session_prefix="c-")


@dataclass
class _Snapshot:
    cells_by_id: dict[str, dict[str, Any]]
    version: int = 1
    namespaces: Any = None


@dataclass
class _Source:
    current: _Snapshot | None


def _code(call: Any, *args: Any) -> grpc.StatusCode:
    with pytest.raises(Refusal) as refused:
        call(*args)
    return refused.value.code


def test_the_doors_map_a_gitlab_cell_id_to_a_name_and_back() -> None:
    source = _Source(_Snapshot({"legacy": {"number": 1}, "cell-2": {"number": None}, "cell-3": {}, "a-7": {},
                                "b-7": {}}))
    tables = Tables(source, {"cell-3": 30})
    assert [tables.cell_name(n) for n in (1, 2, 30)] == ["legacy", "cell-2", "cell-3"]
    assert [tables.cell_number(n) for n in ("legacy", "cell-2", "cell-3")] == [1, 2, 30]
    assert _code(tables.cell_name, 3) == grpc.StatusCode.NOT_FOUND  # cell-3's digits: its configured 30 wins
    assert _code(tables.cell_name, 7) == grpc.StatusCode.FAILED_PRECONDITION  # a-7 and b-7
    assert _code(tables.cell_name, 0) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(tables.cell_number, "a-7") == grpc.StatusCode.NOT_FOUND  # no number: ambiguous
    assert _code(tables.cell_number, "nope") == grpc.StatusCode.NOT_FOUND
    source.current = _Snapshot({"legacy": {"number": 1}, "a-7": {"number": 7}, "b-7": {}})  # a number recorded
    assert tables.cell_name(7) == "a-7" and tables.cell_number("a-7") == 7
    source.current = None
    assert _code(tables.cell_name, 1) == grpc.StatusCode.UNAVAILABLE
