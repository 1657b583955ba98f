"""Fuzzing the read API from its own OpenAPI document, as a new user would: the
schemathesis command line run against the served ``/openapi.json`` with every check it
has (``--checks all``), valid and invalid data (``--mode all``) and all its phases:
examples, coverage (boundary values, missing and unexpected parameters, undeclared
methods), fuzzing, and stateful sequences along the document's links (begin, then
commit, rollback, the decision, the claim, the owner; commit, then destroy). Against
the real server (``topology serve`` in a child process, on a real PostgreSQL, with a
projector deciding claim requests from the real broker). Nothing is configured away:
the run passes only when the server answers as its document says. Before it, on the same
stack, every link of the document is followed once from a real begin (``walk_the_links``).

Bounded: ``TOPOLOGY_FUZZ_EXAMPLES`` examples per operation and phase (default 12; raise
it for a longer hunt), a fixed seed (``TOPOLOGY_FUZZ_SEED``) so that a run is repeatable.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import CLAIMS_AUTH, TEST_API_TOKENS
from tests.integration.processes import read_api, start, stop, wait_until
from topology_store.producer.publisher import EventPublisher
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import CellRegistered

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("TOPOLOGY_FUZZ_EXAMPLES", "12"))
SEED = int(os.environ.get("TOPOLOGY_FUZZ_SEED", "20261203"))
FUZZ_TOKEN = "test-fuzz-token-every-scope-0123456789"
ALL_SCOPES = ("snapshot:read", "claims:read", "claims:write", "audit:read", "audit:pii")


def token_for(scope: str) -> str:
    """A test token holding ``scope`` (tests/conftest.py), so the fuzzer gets past auth."""
    return next(token for token, scopes in json.loads(TEST_API_TOKENS).items() if scope in scopes)


async def _register(settings_: Settings, cell_id: str) -> None:
    async with EventPublisher(settings_) as publisher:
        await publisher.publish(CellRegistered(source="ops", cell_id=cell_id, address=f"https://{cell_id}.example.com",
                                               session_prefix=cell_id, region="eu"))


@pytest.fixture
def fuzz_stack(topics: Settings, tmp_path: Path) -> Iterator[str]:
    """The read API and a projector, seeded with a cell and a committed claim so that
    snapshots, cells and lookups have something to answer."""
    tokens = {**json.loads(TEST_API_TOKENS), FUZZ_TOKEN: list(ALL_SCOPES)}
    settings_ = topics.model_copy(update={
        "api_tokens": json.dumps(tokens),
        "decision_wait_s": 20.0,
        "api_max_wait_s": 0.2,  # long-polls the fuzzer asks for end at once
        "lease_tick_interval_s": 0.5,
    })
    api_log = tmp_path / "api.log"
    projector = start(["project"], settings_, tmp_path / "projector.log")
    try:
        # Started beside a projector: on a loaded machine their imports alone take half a minute.
        with read_api(settings_, api_log, ready_timeout_s=120) as url:
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


def pointer(document: Any, path: str) -> Any:
    """A JSON pointer (RFC 6901) into ``document``."""
    for part in path.removeprefix("/").split("/") if path else []:
        part = part.replace("~1", "/").replace("~0", "~")
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


def follow(link: dict[str, Any], request: dict[str, Any], response: httpx.Response) -> tuple[str, str, dict[str, Any]]:
    """The call a link describes: (method, path template, parameters and body), its runtime
    expressions evaluated against the request and response it starts from."""
    def value(expression: Any) -> Any:
        if isinstance(expression, dict):
            return {key: value(item) for key, item in expression.items()}
        source, _, path = str(expression).partition("#")
        if source == "$response.body":
            return pointer(response.json(), path)
        if source == "$request.body":
            return pointer(request["json"], path)
        if source.startswith("$request.path."):
            return request["path"][source.removeprefix("$request.path.")]
        raise AssertionError(f"unexpected runtime expression {expression!r}")

    target = link["operationRef"].removeprefix("#/paths/")
    template, _, method = target.rpartition("/")
    template = template.replace("~1", "/").replace("~0", "~")
    return method, template, {"parameters": value(link.get("parameters", {})),
                              "json": value(link["requestBody"]) if "requestBody" in link else None}


def call(url: str, document: dict[str, Any], method: str, template: str, parameters: dict[str, Any],
         body: Any) -> tuple[dict[str, Any], httpx.Response]:
    operation = document["paths"][template][method]
    where = {p["name"]: p["in"] for p in operation.get("parameters", [])}
    path = {name: str(v) for name, v in parameters.items() if where[name] == "path"}
    query = {name: str(v) for name, v in parameters.items() if where[name] == "query"}
    concrete = template
    for name, v in path.items():
        concrete = concrete.replace("{" + name + "}", quote(v, safe=""))
    response = httpx.request(method.upper(), f"{url}{concrete}", params=query, json=body, timeout=30,
                             headers={"Authorization": f"Bearer {FUZZ_TOKEN}"})
    return {"path": path, "json": body}, response


def walk_the_links(url: str) -> None:
    """Each link of the served document, followed as a client (or the fuzzer's stateful
    phase) would: from a begin to its decision, claim, owner and commit; from the commit to
    the committed claim and its destroy; from the destroy to the claim, gone. (The fuzzer's
    stateful phase follows them too, but its random values mostly conflict with the ones
    its earlier phases claimed, so it seldom gets past a begin.)"""
    document = httpx.get(f"{url}/openapi.json", timeout=10).json()
    begin_request, begun = call(url, document, "post", "/v1/claims", {}, {
        "cell_id": "cell-1", "owner_type": "USER", "owner_id": 77,
        "claims": [{"bucket": "USERNAME", "value": "Linked-Ada"}, {"bucket": "EMAIL", "value": "ada@example.com"}]})
    assert begun.status_code == 201, begun.text
    links = document["paths"]["/v1/claims"]["post"]["responses"]["201"]["links"]
    expected = {"TheDecision": 200, "TheLeasedClaim": 200, "TheOwner": 200, "CommitTheLease": 200}
    assert set(expected) | {"RollBackTheLease"} == set(links)
    answers = {}
    for name, status in expected.items():
        method, template, args = follow(links[name], begin_request, begun)
        _, answers[name] = call(url, document, method, template, args["parameters"], args["json"])
        assert answers[name].status_code == status, (name, answers[name].text)
    assert answers["TheLeasedClaim"].json()["status"] == "LEASED"
    assert answers["TheDecision"].json()["request_id"] == begun.json()["request_id"]
    commit_request = {"path": {"lease_id": begun.json()["decisions"][0]["lease_id"]}, "json": {"cell_id": "cell-1"}}
    committed = answers["CommitTheLease"]
    after_commit = document["paths"]["/v1/leases/{lease_id}/commit"]["post"]["responses"]["200"]["links"]
    method, template, args = follow(after_commit["TheCommittedClaim"], commit_request, committed)
    _, claim = call(url, document, method, template, args["parameters"], args["json"])
    assert claim.status_code == 200 and claim.json()["status"] == "COMMITTED", claim.text
    method, template, args = follow(after_commit["DestroyTheClaim"], commit_request, committed)
    destroy_request, destroyed = call(url, document, method, template, args["parameters"], args["json"])
    assert destroyed.status_code == 200 and destroyed.json()["outcome"] == "applied", destroyed.text
    after_destroy = document["paths"]["/v1/claims/{bucket}/{value}"]["delete"]["responses"]["200"]["links"]
    method, template, args = follow(after_destroy["TheDestroyedClaim"], destroy_request, destroyed)
    _, gone = call(url, document, method, template, args["parameters"], args["json"])
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "claim_not_found", gone.text


def test_the_fuzzer_with_every_check_finds_nothing(fuzz_stack: str, tmp_path: Path) -> None:
    walk_the_links(fuzz_stack)  # first, on the same stack: deterministic, and before the fuzzer claims values
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{fuzz_stack}/openapi.json",
        "--checks", "all", "--mode", "all", "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--generation-database", "none",
        "--header", f"Authorization: Bearer {FUZZ_TOKEN}", "--request-timeout", "30",
        "--continue-on-failure", "--no-color", "--output-truncate", "false",
        "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml"),
    ]
    # Effort, not checks: longer stateful scenarios, so that a begin's links are followed (the
    # default of 6 steps from a random start seldom gets past the first link).
    (tmp_path / "schemathesis.toml").write_text(
        f"[phases.stateful]\nmax-steps = 20\n\n[phases.stateful.generation]\nmax-examples = {3 * EXAMPLES}\n")
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    output = run.stdout + run.stderr
    (tmp_path / "schemathesis.txt").write_text(output)
    # Every operation of the document was tried, in every phase that applies to it.
    assert re.search(r"Tested: +(\d+)", output) and int(re.search(r"Tested: +(\d+)", output)[1]) >= 15, output[-3000:]
    assert re.search(r"API Links: +\d+ covered", output), output[-3000:]  # the stateful phase ran
    assert run.returncode == 0, output[output.find("FAILURES"):][:20000] or output[-5000:]
