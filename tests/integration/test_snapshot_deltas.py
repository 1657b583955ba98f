"""The router sync protocol on the real stack: a real PostgreSQL, events projected
through the real store, the read API as a uvicorn child process, real HTTP.

Deltas, 410, long-poll wake-ups, compression once per version, tokens,
classification, and two API processes of which one lags (adr/0009)."""

from __future__ import annotations

import asyncio
import copy
import gzip
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import psycopg
import pytest
import zstandard
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.conftest import AUTH, TEST_TOKEN, TEST_TOKEN_NO_SCOPE
from tests.integration.processes import read_api, scalar, wait_until
from tests.integration.routing import Projection, cell, claim, get, metric, release
from topology_store.projector.changelog import Retention, configure_retention
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import CellState, CellStateChanged, CellUpdated, Event
from topology_store.schemas.router_sync import (
    JSON,
    MSGPACK,
    apply_delta,
    choose_encoding,
    decode_msgpack_snapshot,
    namespace_digest,
    representation_etag,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def projection(settings: Settings) -> Iterator[Projection]:
    projection = Projection(settings)
    yield projection
    projection.close()


@pytest.fixture
def api(settings: Settings, projection: Projection, tmp_path: Path) -> Iterator[str]:
    projection.commit([cell(1), cell(2), claim("gitlab-org"), claim("gitlab-com", "cell-2", 7)])
    # A slow poll: every wake-up in these tests must come from NOTIFY.
    with read_api(settings.model_copy(update={"snapshot_poll_interval_s": 30.0, "api_max_wait_s": 3.0}),
                  tmp_path / "api.log") as url:
        yield url


def full_snapshot(api: str, at_least: int) -> dict[str, Any]:
    """The full snapshot once the API serves version ``at_least`` or newer."""
    response = get(f"{api}/v1/snapshot", min_version=at_least, wait="3s")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def tables(document: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    return {c["cell_id"]: c for c in document["cells"]}, dict(document["namespaces"])


# --- deltas ------------------------------------------------------------------------------------------

CELLS = ["cell-1", "cell-2", "cell-3"]
PATHS = [f"ns-{n}" for n in range(8)]
event_strategy = st.one_of(
    st.builds(lambda p, c: claim(p, c, CELLS.index(c)), st.sampled_from(PATHS), st.sampled_from(CELLS)),
    st.builds(lambda p, c: release(p, c, CELLS.index(c)), st.sampled_from(PATHS), st.sampled_from(CELLS)),
    st.builds(lambda n, w: CellUpdated(source="ops", cell_id=f"cell-{n}", weight=w),
              st.integers(1, 3), st.integers(0, 5)),
    st.builds(lambda n, s: CellStateChanged(source="ops", cell_id=f"cell-{n}", state=s, reason="test"),
              st.integers(1, 3), st.sampled_from([CellState.ACTIVE, CellState.DRAINING, CellState.READ_ONLY])),
    st.builds(cell, st.integers(3, 3)),
)


def test_deltas_from_any_version_rebuild_exactly_the_full_snapshot(api: str, projection: Projection) -> None:
    # Every full snapshot seen, by version; version 0 is the empty table.
    history: dict[int, dict[str, Any]] = {
        0: {"version": 0, "cells": [], "namespaces": {}},
        1: full_snapshot(api, 1),
    }

    @hypothesis_settings(max_examples=12, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.lists(st.lists(event_strategy, min_size=1, max_size=6), min_size=1, max_size=4), st.booleans())
    def check(batches: list[list[Event]], binary: bool) -> None:
        for batch in batches:
            version = projection.commit(batch)
            if version not in history:
                history[version] = full_snapshot(api, version)
        current = max(history)
        expected = history[current]
        assert expected["version"] == current
        for since, start in history.items():
            headers = {"Accept": "application/msgpack"} if binary else {}
            response = get(f"{api}/v1/snapshot", headers=headers, since=since)
            if since == current:
                assert response.status_code == 304
                continue
            assert response.status_code == 200, response.text
            delta = msgpack.unpackb(response.content) if binary else response.json()
            assert (delta["since"], delta["version"]) == (since, current)
            # The delta's own tag, never the full snapshot's (another representation of version V).
            coding = choose_encoding(response.request.headers.get("Accept-Encoding", ""))
            assert response.headers["ETag"] == representation_etag(current, MSGPACK if binary else JSON, coding, since)
            assert response.headers["ETag"] != representation_etag(current, MSGPACK if binary else JSON, coding)
            cells, namespaces = tables(copy.deepcopy(start))
            apply_delta(cells, namespaces, delta)
            assert (cells, namespaces) == tables(expected), f"delta {since} -> {current}"
            assert (len(namespaces), namespace_digest(namespaces)) == (
                delta["namespace_count"], delta["namespace_digest"])

    check()
    assert len(history) > 5  # the examples did move the version


def representations(api: str, version: int) -> dict[tuple[str, str], httpx.Response]:
    """Every (format, coding) of the full snapshot at ``version``."""
    answers = {}
    for fmt in ("application/json", "application/msgpack"):
        for coding in ("identity", "gzip", "zstd"):
            response = get(f"{api}/v1/snapshot", headers={"Accept": fmt, "Accept-Encoding": coding},
                           min_version=version, wait="3s")
            assert response.status_code == 200 and response.headers["X-Topology-Version"] == str(version)
            answers[(fmt, coding)] = response
    return answers


def test_a_snapshot_built_from_deltas_serializes_byte_identically_to_a_full_load(
    api: str, projection: Projection, settings: Settings, tmp_path: Path
) -> None:
    # Paths whose database collation order differs from code point order ('-' and '_' are
    # ignored at the first level of most collations), moved, released and re-claimed
    # between versions, and cells changed: the running API derives each version from the
    # previous one by the change log; a process started afterwards loads it whole.
    paths = ["a-b", "ab", "a_c", "ac", "a-a", "b10", "b9", "z", "0", "a"]
    projection.commit([claim(p, "cell-2" if n % 2 else "cell-1", n) for n, p in enumerate(paths[:5])])
    projection.commit([claim(p, "cell-1", 9) for p in paths[5:]] + [release("a_c", "cell-1", 2)])
    projection.commit([cell(3), CellUpdated(source="ops", cell_id="cell-1", weight=3),
                       CellStateChanged(source="ops", cell_id="cell-2", state=CellState.DRAINING, reason="test")])
    version = projection.commit([release("ab", "cell-2", 1), claim("ab", "cell-3", 1), claim("a_c", "cell-3", 2),
                                 release("gitlab-org", "cell-1", 42)])
    derived = representations(api, version)
    log = (tmp_path / "api.log").read_text()
    assert f"snapshot version {version} (delta of" in log, log[-2000:]  # derived from deltas, not a full load

    with read_api(settings, tmp_path / "fresh.log") as fresh:
        loaded = representations(fresh, version)
    assert f"snapshot version {version} (full load" in (tmp_path / "fresh.log").read_text()

    for key, response in derived.items():
        other = loaded[key]
        assert response.headers.get("Content-Encoding") == other.headers.get("Content-Encoding")
        assert response.content == other.content, key  # decoded bytes: the serialization itself
        assert response.headers["ETag"] == other.headers["ETag"]
    # Sorted: namespaces in code point order, cells by id, each cell's fields by name.
    document = derived[("application/json", "identity")].json()
    assert list(document["namespaces"]) == sorted(document["namespaces"])
    assert [list(c) for c in document["cells"]] == [sorted(c) for c in document["cells"]]
    columns = decode_msgpack_snapshot(msgpack.unpackb(derived[("application/msgpack", "identity")].content))
    assert columns["namespaces"] == document["namespaces"] and columns["version"] == version


def test_each_representation_has_its_own_entity_tag_and_any_of_them_revalidates(
    api: str, projection: Projection
) -> None:
    version = projection.commit([claim(f"group-{n}") for n in range(40)])  # a body worth compressing
    answers = representations(api, version)
    tags = {key: response.headers["ETag"] for key, response in answers.items()}
    assert tags[("application/json", "identity")] == f'"{version}-json"'
    assert tags[("application/msgpack", "identity")] == f'"{version}-msgpack"'
    assert tags[("application/json", "gzip")] == f'W/"{version}-json+gzip"'  # weak: compressor-dependent bytes
    assert tags[("application/msgpack", "zstd")] == f'W/"{version}-msgpack+zstd"'
    assert len(set(tags.values())) == len(tags)
    for (fmt, coding), response in answers.items():
        assert response.headers["Vary"] == "Accept, Accept-Encoding"
        assert response.headers.get("Content-Encoding", "identity") == coding
        # A router sending back what it got: 304, with the tag of what it negotiated now.
        for sent in (tags[(fmt, coding)], f'"{version}"'):  # and the bare version older servers sent
            again = get(f"{api}/v1/snapshot", headers={"If-None-Match": sent, "Accept": fmt,
                                                     "Accept-Encoding": coding})
            assert again.status_code == 304 and again.content == b""
            assert again.headers["ETag"] == tags[(fmt, coding)] and again.headers["Vary"] == "Accept, Accept-Encoding"
    delta = get(f"{api}/v1/snapshot", since=version - 1, headers={"Accept-Encoding": "gzip"})
    assert delta.status_code == 200 and delta.headers["ETag"] == f'W/"{version}-since-{version - 1}-json+gzip"'
    assert delta.headers["ETag"] not in tags.values()
    assert get(f"{api}/v1/snapshot", headers={"If-None-Match": delta.headers["ETag"]}).status_code == 304
    # An older representation's tag gets the newer version.
    assert get(f"{api}/v1/snapshot", headers={"If-None-Match": f'"{version - 1}-json"'}).status_code == 200


def test_a_since_older_than_the_change_log_answers_410_with_a_clear_body(
    api: str, projection: Projection, settings: Settings
) -> None:
    configure_retention(Retention(keep_versions=2, keep_seconds=0))
    try:
        versions = [projection.commit([claim(f"group-{n}")]) for n in range(4)]  # versions 2..5
    finally:
        configure_retention(None)
    assert versions == [2, 3, 4, 5]
    # Versions 4 and 5 kept: deltas start at 3 or later. Older changes are gone from the table.
    assert scalar(settings, "SELECT min(version) FROM routing_changes") == 4
    assert scalar(settings, "SELECT count(*) FROM routing_versions") == 2
    full_snapshot(api, 5)

    gone = get(f"{api}/v1/snapshot", since=2)
    assert gone.status_code == 410 and gone.headers["X-Topology-Version"] == "5"
    error = gone.json()["error"]
    assert error["code"] == "delta_unavailable" and error["oldest_since"] == 3 and error["version"] == 5
    assert "full snapshot" in error["message"]

    delta = get(f"{api}/v1/snapshot", since=3)
    assert delta.status_code == 200
    assert delta.json()["namespaces"] == {"group-2": "cell-1", "group-3": "cell-1"}
    full = get(f"{api}/v1/snapshot")  # the fallback
    assert full.status_code == 200 and full.json()["version"] == 5 and len(full.json()["namespaces"]) == 6


def test_deltas_need_every_version_in_the_change_log_not_just_some_rows(
    api: str, projection: Projection, settings: Settings
) -> None:
    assert projection.commit([CellUpdated(source="ops", cell_id="cell-1", weight=3)]) == 2  # cells only
    assert projection.commit([claim("late")]) == 3
    full_snapshot(api, 3)
    delta = get(f"{api}/v1/snapshot", since=1).json()
    assert [c["weight"] for c in delta["cells"]] == [3] and delta["namespaces"] == {"late": "cell-1"}
    # A version the log does not cover (say, committed before the log existed) breaks the chain:
    # deltas across it are refused, deltas after it still work.
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
        conn.execute("DELETE FROM routing_versions WHERE version = 2")
    assert projection.commit([claim("later")]) == 4
    full_snapshot(api, 4)
    assert get(f"{api}/v1/snapshot", since=1).status_code == 410
    assert get(f"{api}/v1/snapshot", since=2).json()["namespaces"] == {"late": "cell-1", "later": "cell-1"}


# --- long-poll ---------------------------------------------------------------------------------------

def test_one_commit_wakes_every_long_poll_at_once(api: str, projection: Projection) -> None:
    waiters = 20

    async def poll_all() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as client:

            async def one() -> tuple[httpx.Response, float]:
                response = await client.get(f"{api}/v1/snapshot", params={"since": 1, "wait": "20s"})
                return response, time.monotonic()

            return await asyncio.gather(*(one() for _ in range(waiters)))

    results: list[tuple[httpx.Response, float]] = []
    runner = threading.Thread(target=lambda: results.extend(asyncio.run(poll_all())))
    runner.start()
    wait_until(lambda: metric(api, "topology_api_long_polls_waiting") == waiters, timeout_s=10,
               what="every request waiting")
    time.sleep(0.3)
    assert not results  # still held
    committed = time.monotonic()
    assert projection.commit([claim("woken")]) == 2
    runner.join(15)
    assert len(results) == waiters
    for response, answered in results:
        assert response.status_code == 200
        assert response.json()["namespaces"] == {"woken": "cell-1"} and response.json()["version"] == 2
        assert answered - committed < 2.0  # NOTIFY, not the 30 s poll
    # One refresh served them all: the delta it derived, serialized once.
    assert metric(api, 'topology_api_deltas_total{result="cached"}') == waiters
    assert metric(api, 'topology_api_deltas_total{result="computed"}') == 0
    assert metric(api, 'topology_api_encodings_built_total{encoding="identity",format="json",kind="delta"}') == 1


def test_a_long_poll_with_nothing_new_answers_304_at_the_server_maximum(api: str) -> None:
    started = time.monotonic()
    response = get(f"{api}/v1/snapshot", since=1, wait="1s")
    assert response.status_code == 304 and 0.9 < time.monotonic() - started < 2.5
    started = time.monotonic()
    capped = get(f"{api}/v1/snapshot", headers={"If-None-Match": '"1"'}, wait="10m")  # max is 3 s here
    assert capped.status_code == 304 and 2.5 < time.monotonic() - started < 5
    assert capped.headers["X-Topology-Version"] == "1"


def test_bad_parameters_and_formats_are_explained(api: str) -> None:
    for params in ({"since": "-1"}, {"since": "x"}, {"wait": "soon"}, {"min_version": "-3"}):
        response = get(f"{api}/v1/snapshot", **params)
        assert response.status_code == 400 and response.json()["error"]["code"] == "bad_parameter"
    refused = get(f"{api}/v1/snapshot", headers={"Accept": "text/html"})
    assert refused.status_code == 406 and refused.json()["error"]["code"] == "not_acceptable"


# --- encodings ---------------------------------------------------------------------------------------

def wire_bytes(url: str, headers: dict[str, str]) -> tuple[httpx.Headers, bytes]:
    """The body as sent (httpx would decode gzip and zstd)."""
    with httpx.stream("GET", url, headers={**AUTH, **headers}) as response:
        assert response.status_code == 200
        return response.headers, b"".join(response.iter_raw())


def test_compressed_and_binary_bodies_are_built_once_per_version(api: str, projection: Projection) -> None:
    projection.commit([claim(f"bulk-group-{n}", "cell-2", 7) for n in range(200)])  # enough to compress
    plain = full_snapshot(api, 2)
    assert len(plain["namespaces"]) == 202
    url = f"{api}/v1/snapshot"
    for _ in range(3):
        _, identity = wire_bytes(url, {"Accept-Encoding": "identity"})
        headers, body = wire_bytes(url, {"Accept-Encoding": "gzip;q=0.5, zstd"})
        assert headers["Content-Encoding"] == "zstd" and len(body) < len(identity) / 3
        assert zstandard.ZstdDecompressor().decompress(body) == identity
        headers, body = wire_bytes(url, {"Accept-Encoding": "gzip, deflate"})
        assert headers["Content-Encoding"] == "gzip" and gzip.decompress(body) == identity
        headers, packed = wire_bytes(url, {"Accept": "application/msgpack", "Accept-Encoding": "identity"})
        assert headers["Content-Type"] == "application/msgpack"
        assert decode_msgpack_snapshot(msgpack.unpackb(packed)) == plain
        assert len(packed) < len(identity)  # the binary encoding is smaller
        assert get(url, headers={"Accept-Encoding": "zstd"}).json() == plain  # what clients decode
    for fmt, encoding in (("json", "identity"), ("json", "zstd"), ("json", "gzip"), ("msgpack", "identity")):
        built = metric(api, f'topology_api_encodings_built_total{{encoding="{encoding}",format="{fmt}",'
                            f'kind="snapshot"}}')
        assert built == 1, (fmt, encoding, built)  # once for the version, not per request


# --- access control ----------------------------------------------------------------------------------

def test_routing_data_needs_a_token_with_the_snapshot_scope(api: str, tmp_path: Path) -> None:
    paths = ["/v1/snapshot", "/v1/snapshot?since=0", "/v1/classify?type=ROUTE&value=gitlab-org",
             "/v1/cells", "/v1/cells/cell-1"]
    for path in paths:
        missing = httpx.get(f"{api}{path}")
        assert missing.status_code == 401, path
        assert missing.json()["error"]["code"] == "unauthenticated"
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = httpx.get(f"{api}{path}", headers={"Authorization": "Bearer not-a-configured-token"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_token", path
        basic = httpx.get(f"{api}{path}", headers={"Authorization": f"Basic {TEST_TOKEN}"})
        assert basic.status_code == 401, path
        scopeless = httpx.get(f"{api}{path}", headers={"Authorization": f"Bearer {TEST_TOKEN_NO_SCOPE}"})
        assert scopeless.status_code == 403 and scopeless.json()["error"]["code"] == "insufficient_scope", path
        assert httpx.get(f"{api}{path}", headers=AUTH).status_code == 200, path
    for public in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(f"{api}{public}").status_code == 200
    openapi = httpx.get(f"{api}/openapi.json").json()
    assert openapi["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert openapi["paths"]["/v1/snapshot"]["get"]["security"] == [{"bearerAuth": ["snapshot:read"]}]
    assert {"304", "401", "403", "410"} <= set(openapi["paths"]["/v1/snapshot"]["get"]["responses"])
    assert metric(api, 'topology_api_auth_failures_total{code="invalid_token"}') >= len(paths)
    log = (tmp_path / "api.log").read_text()
    assert TEST_TOKEN not in log and TEST_TOKEN_NO_SCOPE not in log and "not-a-configured-token" not in log


# --- classification ----------------------------------------------------------------------------------

def test_classify_answers_the_owning_cell_with_address_and_state(api: str, projection: Projection) -> None:
    projection.commit([CellStateChanged(source="ops", cell_id="cell-2", state=CellState.ACTIVE, reason="go")])
    full_snapshot(api, 2)
    route = get(f"{api}/v1/classify", type="ROUTE", value="GitLab-Com/gitlab/-/issues/1")
    assert route.status_code == 200 and route.headers["X-Topology-Version"] == "2"
    body = route.json()
    assert body["key"] == "gitlab-com" and body["version"] == 2
    assert body["cell"]["cell_id"] == "cell-2" and body["cell"]["address"] == "https://c2.example.com"
    assert body["cell"]["state"] == "ACTIVE"
    session = get(f"{api}/v1/classify", type="SESSION_PREFIX", value="c1-0123abcd").json()
    assert session["cell"]["cell_id"] == "cell-1"
    assert get(f"{api}/v1/classify", type="CELL_ID", value="cell-2").json()["cell"]["state"] == "ACTIVE"
    unknown = get(f"{api}/v1/classify", type="ROUTE", value="nobody/project")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    bad = get(f"{api}/v1/classify", type="PLANET", value="earth")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_type"


# --- scale-out ---------------------------------------------------------------------------------------

def test_an_api_process_behind_the_client_never_hands_out_an_older_version(
    settings: Settings, new_database: Any, tmp_path: Path
) -> None:
    """Two API processes behind one balancer; the second reads a database that lags
    (a replica, here a second database fed the same batches later)."""
    replica_settings = settings.model_copy(update={"database_url": new_database(), "snapshot_poll_interval_s": 30.0})
    primary, replica = Projection(settings), Projection(replica_settings)
    try:
        first = [cell(1), claim("gitlab-org")]
        assert primary.commit(first) == replica.commit(first) == 1
        assert primary.commit([claim("ahead")]) == 2  # the replica has not seen version 2 yet
        with read_api(settings, tmp_path / "a.log") as a, read_api(replica_settings, tmp_path / "b.log") as b:
            held = full_snapshot(a, 2)
            assert held["version"] == 2
            # The lagging process: no full snapshot of version 1 for a client at 2, no delta back.
            for params, headers in (({"since": 2}, {}), ({}, {"If-None-Match": '"2"'}), ({"min_version": 2}, {})):
                behind = get(f"{b}/v1/snapshot", headers=headers, **params)
                assert behind.status_code == 304 and behind.content == b""
                assert behind.headers["X-Topology-Version"] == "1" and "ETag" not in behind.headers
            # A long-poll there waits until the replica has caught up past the client.
            answers: list[httpx.Response] = []
            poll = threading.Thread(target=lambda: answers.append(get(f"{b}/v1/snapshot", since=2, wait="3s")))
            poll.start()
            time.sleep(0.3)
            assert replica.commit([claim("ahead")]) == 2  # caught up to the client: still nothing newer
            time.sleep(0.3)
            assert not answers
            assert replica.commit([claim("newer")]) == 3
            poll.join(10)
            assert answers[0].status_code == 200
            assert answers[0].json()["since"] == 2 and answers[0].json()["namespaces"] == {"newer": "cell-1"}
    finally:
        primary.close()
        replica.close()
