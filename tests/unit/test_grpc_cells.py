"""Our cells in GitLab's shape (grpc_api/cells.py, adr/0021): numeric ids, addresses, the first cell."""

from __future__ import annotations

import pytest

from topology_store.service.gitlab_cells import derived_number, first_cell, gitlab_address, number_cells


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
