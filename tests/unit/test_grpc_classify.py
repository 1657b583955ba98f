"""GitLab's Classify over plain routing tables (grpc_api/classify.py, adr/0021): each classify
type, the claims path, and every refusal's status."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from topology_store.schemas.generated.proto import classify_service_pb2 as pb
from topology_store.schemas.generated.proto.types.v1.claim_pb2 import Claim
from topology_store.service.gitlab_cells import number_cells
from topology_store.service.gitlab_classify import Refusal, classify


def cell(name: str, prefix: str, state: str = "ACTIVE") -> dict[str, Any]:
    return {"cell_id": name, "address": f"https://{name}.example.com", "session_prefix": prefix, "state": state}


@dataclass
class Tables:
    version: int = 7
    cells_by_id: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "cell-1": cell("cell-1", "c1-", "DECOMMISSIONED"), "cell-2": cell("cell-2", "c2-"),
        "cell-20": cell("cell-20", "c2-x"), "eu": cell("eu", "eu-"),
    })
    namespaces: dict[str, str] = field(default_factory=lambda: {"gitlab-org": "cell-2", "ghost": "gone"})


TABLES = Tables()
NUMBERS = number_cells(TABLES.cells_by_id, {})


def answer(request: pb.ClassifyRequest) -> tuple[str, str]:
    result = classify(request, TABLES, NUMBERS).response()
    assert result.action == pb.PROXY
    return result.proxy.address, result.matched_claim.WhichOneof("claim") or ""


def refusal(request: pb.ClassifyRequest) -> grpc.StatusCode:
    with pytest.raises(Refusal) as refused:
        classify(request, TABLES, NUMBERS)
    return refused.value.code


def test_first_cell_skips_a_decommissioned_cell_one() -> None:
    assert answer(pb.ClassifyRequest(type=pb.FIRST_CELL, value="ignored")) == ("cell-2.example.com:443", "")


def test_session_prefix_takes_the_longest_matching_prefix() -> None:
    assert answer(pb.ClassifyRequest(type=pb.SESSION_PREFIX, value="c2-xyz")) == ("cell-20.example.com:443", "")
    assert answer(pb.ClassifyRequest(type=pb.SESSION_PREFIX, value="c2-abc")) == ("cell-2.example.com:443", "")


def test_cell_id_is_the_number() -> None:
    assert answer(pb.ClassifyRequest(type=pb.CELL_ID, value=" 20 ")) == ("cell-20.example.com:443", "")
    assert refusal(pb.ClassifyRequest(type=pb.CELL_ID, value="5")) == grpc.StatusCode.NOT_FOUND
    assert refusal(pb.ClassifyRequest(type=pb.CELL_ID, value="٣")) == grpc.StatusCode.INVALID_ARGUMENT  # not ASCII


def test_route_claims_answer_with_the_top_level_namespace_they_matched() -> None:
    result = classify(pb.ClassifyRequest(claims=[Claim(route="gitlab-org/gitlab")]), TABLES, NUMBERS).response()
    assert result.matched_claim == Claim(route="gitlab-org")
    # A namespace whose cell is not known is no match (NOT_FOUND), never an error.
    assert refusal(pb.ClassifyRequest(claims=[Claim(route="ghost/x")])) == grpc.StatusCode.NOT_FOUND


def test_claim_kinds_outside_the_routing_table_are_unimplemented_not_invalid() -> None:
    assert refusal(pb.ClassifyRequest(claims=[Claim(route="gitlab-org"), Claim(username="ada")])) == \
        grpc.StatusCode.UNIMPLEMENTED


def test_ambiguous_numbers_are_a_failed_precondition() -> None:
    tables = Tables(cells_by_id={"a-3": cell("a-3", "a-"), "b-3": cell("b-3", "b-")})
    with pytest.raises(Refusal) as refused:
        classify(pb.ClassifyRequest(type=pb.CELL_ID, value="3"), tables, number_cells(tables.cells_by_id, {}))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "a-3, b-3" in refused.value.message
