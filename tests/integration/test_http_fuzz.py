"""Property-based fuzzing of the read API from its own OpenAPI document (schemathesis):
schema-valid and schema-invalid requests against the real server (``topology serve``
in a child process, on a real PostgreSQL, with a projector deciding claim requests
from the real broker). Every answer must be no 5xx, a status, content type and body
the document declares, and invalid input must be refused with a 4xx.

Bounded: ``TOPOLOGY_FUZZ_EXAMPLES`` examples per operation and generation mode
(default 50); raise it for a longer hunt. Under CI Hypothesis derandomizes (its
``ci`` profile), so a run is repeatable there.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import CLAIMS_AUTH, TEST_API_TOKENS
from tests.integration.processes import read_api, start, stop, wait_until
from topology_store.producer.publisher import EventPublisher
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import CellRegistered

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("TOPOLOGY_FUZZ_EXAMPLES", "50"))

CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]

def token_for(scope: str) -> str:
    """A test token holding ``scope`` (tests/conftest.py), so the fuzzer gets past auth."""
    return next(token for token, scopes in json.loads(TEST_API_TOKENS).items() if scope in scopes)


def token_headers(case: Any) -> dict[str, str]:
    """The bearer token for the scope the operation's ``security`` names; none for public ones."""
    for requirement in case.operation.definition.raw.get("security", []):
        for scopes in requirement.values():
            for scope in scopes:
                return {"Authorization": f"Bearer {token_for(scope)}"}
    return {}


async def _register(settings_: Settings, cell_id: str) -> None:
    async with EventPublisher(settings_) as publisher:
        await publisher.publish(CellRegistered(source="ops", cell_id=cell_id, address=f"https://{cell_id}.example.com",
                                               session_prefix=cell_id, region="eu"))


@pytest.fixture
def fuzz_stack(topics: Settings, tmp_path: Path) -> Iterator[str]:
    """The read API and a projector, seeded with a cell and a committed claim so that
    snapshots, cells and lookups have something to answer."""
    settings_ = topics.model_copy(update={
        "decision_wait_s": 20.0,
        "api_max_wait_s": 0.2,  # long-polls the fuzzer asks for end at once
        "lease_tick_interval_s": 0.5,
    })
    api_log = tmp_path / "api.log"
    projector = start(["project"], settings_, tmp_path / "projector.log")
    try:
        with read_api(settings_, api_log) as url:
            asyncio.run(_register(settings_, "cell-1"))
            granted = httpx.post(f"{url}/v1/claims", headers=CLAIMS_AUTH, timeout=30, json={
                "cell_id": "cell-1", "owner_type": "GROUP", "owner_id": 1,
                "claims": [{"bucket": "NAMESPACE", "value": "fuzz-org"}]})
            assert granted.status_code == 201, granted.text
            lease_id = granted.json()["decisions"][0]["lease_id"]
            committed = httpx.post(f"{url}/v1/leases/{lease_id}/commit", headers=CLAIMS_AUTH, timeout=30,
                                   json={"cell_id": "cell-1"})
            assert committed.status_code == 200, committed.text
            wait_until(lambda: httpx.get(f"{url}/v1/classify", params={"type": "ROUTE", "value": "fuzz-org"},
                                         headers={"Authorization": f"Bearer {token_for('snapshot:read')}"}
                                         ).status_code == 200, timeout_s=30, what="the seed in the snapshot")
            yield url
    finally:
        assert stop(projector) == 0, (tmp_path / "projector.log").read_text()[-3000:]
    # A 5xx that the checks might not see (a response they accepted) still leaves a trace here.
    log = api_log.read_text(errors="replace")
    assert not re.search(r"Traceback|unhandled |Exception in ASGI", log), log[-5000:]


def fuzz_operation(operation: Any, mode: GenerationMode, session: requests.Session) -> None:
    """``EXAMPLES`` generated requests to one operation; raises the first failing check (shrunk)."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def requests_to_the_operation(case: Any) -> None:
        headers = token_headers(case)
        response = case.call(session=session, headers=headers, timeout=30)
        case.validate_response(response, checks=CHECKS, headers=headers)

    requests_to_the_operation()


def test_every_operation_answers_fuzzed_input_with_a_declared_non_5xx_response(fuzz_stack: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_stack}/openapi.json", timeout=10)
    schema.config.update(base_url=fuzz_stack)
    # The tests' own tokens go in every request (ignored_auth checks that they matter). Unknown
    # query parameters are ignored on purpose: a newer router may send one to an older API.
    schema.config.generation.update(with_security_parameters=False, allow_extra_parameters=False)
    failures: list[str] = []
    tested: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()  # raises if the document itself is invalid
            raw = operation.definition.raw
            # An operation without parameters or body has no invalid request to make.
            modes = list(GenerationMode) if raw.get("parameters") or raw.get("requestBody") else [GenerationMode.POSITIVE]
            for mode in modes:
                try:
                    fuzz_operation(operation, mode, session)
                except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - all operations' failures together
                    failures.append(f"{operation.label} ({mode.value}): {exc}")
            tested.append(operation.label)
    assert len(tested) >= 15, tested  # every route of the API, not a document that lost some
    assert not failures, "\n\n".join(failures)
