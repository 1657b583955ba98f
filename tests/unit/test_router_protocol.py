"""The pure parts of the router sync protocol (adr/0009): negotiation, versions in
entity tags, wait values, the namespace digest, and the versioned namespace table."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from topology_store.query_api.auth import Authorizer, TokenConfigError, parse_tokens
from topology_store.query_api.snapshot import NamespaceTable
from topology_store.schemas.router_sync import (
    JSON,
    MSGPACK,
    apply_delta,
    choose_encoding,
    choose_format,
    classify_in,
    digest_after,
    etag_versions,
    namespace_digest,
    parse_wait,
    representation_etag,
)


@pytest.mark.parametrize(("value", "seconds"), [("30s", 30), ("500ms", 0.5), ("2m", 120), ("15", 15), (" 1.5s ", 1.5)])
def test_wait_values(value: str, seconds: float) -> None:
    assert parse_wait(value) == seconds


@pytest.mark.parametrize("value", ["", "soon", "-1s", "1h", "1 s s"])
def test_bad_wait_values(value: str) -> None:
    with pytest.raises(ValueError):
        parse_wait(value)


@pytest.mark.parametrize(
    ("header", "expected"),
    [('"7"', (False, 7)), ('W/"7"', (False, 7)), ('"3", "9", W/"5"', (False, 9)), ("*", (True, None)),
     ('"abc"', (False, None)), ("", (False, None)), ('"7-json"', (False, 7)), ('W/"8-msgpack+zstd"', (False, 8)),
     ('"9-since-4-json", "7-json"', (False, 9)), ('"7json"', (False, None)), ('"-7-json"', (False, None))],
)
def test_entity_tags_are_versions(header: str, expected: tuple[bool, int | None]) -> None:
    assert etag_versions(header) == expected


def test_each_representation_has_its_own_tag_strong_uncompressed_weak_compressed() -> None:
    tags = {(fmt, coding, since): representation_etag(7, fmt, coding, since)
            for fmt in (JSON, MSGPACK) for coding in ("identity", "gzip", "zstd") for since in (None, 5)}
    assert len(set(tags.values())) == len(tags)  # one tag per representation
    assert tags[(JSON, "identity", None)] == '"7-json"' and tags[(MSGPACK, "zstd", None)] == 'W/"7-msgpack+zstd"'
    assert tags[(JSON, "gzip", 5)] == 'W/"7-since-5-json+gzip"'
    for (_, coding, _), tag in tags.items():
        assert tag.startswith("W/") == (coding != "identity")
        assert etag_versions(tag) == (False, 7)  # a router sending back what it got says "I hold 7"


@pytest.mark.parametrize(
    ("accept_encoding", "expected"),
    [("", "identity"), ("gzip", "gzip"), ("gzip, deflate, br, zstd", "zstd"), ("zstd;q=0.1, gzip", "gzip"),
     ("zstd;q=0, gzip;q=0", "identity"), ("*", "zstd"), ("identity", "identity"), ("br", "identity")],
)
def test_content_coding_negotiation(accept_encoding: str, expected: str) -> None:
    assert choose_encoding(accept_encoding) == expected


@pytest.mark.parametrize(
    ("accept", "expected"),
    [("", JSON), ("*/*", JSON), ("application/json", JSON), ("application/msgpack", MSGPACK),
     ("application/msgpack, application/json;q=0.9", MSGPACK), ("application/x-msgpack;q=0.5, */*", JSON),
     ("text/html", None)],
)
def test_format_negotiation(accept: str, expected: str | None) -> None:
    assert choose_format(accept) == expected


tables = st.dictionaries(st.text(min_size=1, max_size=8), st.sampled_from(["cell-1", "cell-2", "cell-3"]), max_size=30)


@given(tables, tables, st.lists(st.text(min_size=1, max_size=8), max_size=10))
def test_the_digest_follows_changes_without_recomputing(
    before: dict[str, str], upserts: dict[str, str], deletions: list[str]
) -> None:
    deletions = [d for d in deletions if d not in upserts]  # a delta names each key once
    after = dict(before)
    for path in deletions:
        after.pop(path, None)
    after.update(upserts)
    assert digest_after(before, namespace_digest(before), len(before), upserts, deletions) == (
        namespace_digest(after), len(after))
    # The versioned table of the API reaches the same state through its overlay.
    table = NamespaceTable.full(dict(before)).apply(upserts, deletions)
    assert table.materialize() == after and (table.digest, table.count) == (namespace_digest(after), len(after))
    assert all(table.get(path) == cell for path, cell in after.items())
    assert all(table.get(path) is None for path in deletions if path not in after)
    # And so does a plain client applying the delta document.
    cells: dict[str, dict[str, object]] = {}
    plain = dict(before)
    apply_delta(cells, plain, {"namespaces": upserts, "deleted_namespaces": deletions})
    assert plain == after


@given(tables, st.lists(st.tuples(tables, st.lists(st.text(min_size=1, max_size=8), max_size=6)), max_size=4))
def test_the_table_comes_out_in_code_point_order_however_it_was_built(
    before: dict[str, str], deltas: list[tuple[dict[str, str], list[str]]]
) -> None:
    # A full load hands the rows in the database's order; deltas add, move and delete paths.
    table = NamespaceTable.full(dict(reversed(before.items())))
    expected = dict(before)
    for upserts, deletions in deltas:
        deletions = [d for d in deletions if d not in upserts]
        table = table.apply(upserts, deletions)
        for path in deletions:
            expected.pop(path, None)
        expected.update(upserts)
    ordered = sorted(expected)
    sorted_part = list(table.base)[:table.sorted_keys]
    assert sorted_part == sorted(sorted_part)  # what the table says is sorted is
    assert table.columns() == (ordered, [expected[p] for p in ordered])
    merged, in_order = table.merged()
    assert merged == expected and (not in_order or list(merged) == ordered)
    assert list(NamespaceTable.full(expected).base) == ordered  # a full load at the same version


def test_the_overlay_is_folded_into_a_new_base_and_old_versions_stay_intact() -> None:
    v1 = NamespaceTable.full({f"ns-{n}": "cell-1" for n in range(10)})
    table = v1
    for batch in range(60):
        upserts = {f"new-{batch}-{n}": "cell-2" for n in range(1000)}
        table = table.apply(upserts, [f"ns-{batch}"] if batch < 10 else [])
    assert len(table.base) >= 50_000 and len(table.overlay) <= 10_010  # folded into a new base on the way
    merged = table.materialize()
    assert len(merged) == table.count == 60_000 and table.digest == namespace_digest(merged)
    assert table.columns()[0] == sorted(merged)  # folded: still comes out in order
    sorted_part = list(table.base)[:table.sorted_keys]
    assert sorted_part == sorted(sorted_part) and len(table.base) - table.sorted_keys <= len(table.base) // 4
    assert v1.get("ns-3") == "cell-1" and v1.count == 10 and len(v1.base) == 10  # the old version is intact


def test_classification() -> None:
    cells = {"cell-1": {"cell_id": "cell-1", "session_prefix": "c1-", "address": "https://c1", "state": "ACTIVE"},
             "cell-10": {"cell_id": "cell-10", "session_prefix": "c1-0", "address": "https://c10", "state": "DRAINING"}}
    namespaces = {"gitlab-org": "cell-1", "orphan": "cell-9"}
    assert classify_in(3, namespaces, cells, "ROUTE", "/GitLab-Org/gitlab/-/issues")[1]["cell"]["address"] == "https://c1"
    assert classify_in(3, namespaces, cells, "session_prefix", "c1-0abc")[1]["cell"]["cell_id"] == "cell-10"
    assert classify_in(3, namespaces, cells, "ROUTE", "nobody")[0] == 404
    assert classify_in(3, namespaces, cells, "ROUTE", "orphan")[1]["error"]["code"] == "cell_not_found"
    assert classify_in(3, namespaces, cells, "PLANET", "x")[0] == 400


def test_tokens_are_checked_by_digest_and_never_shown() -> None:
    authorizer = Authorizer.from_tokens(parse_tokens('{"router-token-1": ["snapshot:read"], "other-token": []}', "t"))
    assert authorizer.check(b"Bearer router-token-1", "snapshot:read") is None
    assert authorizer.check(b"bearer router-token-1", "snapshot:read") is None
    assert authorizer.check(None, "snapshot:read")[:2] == (401, "unauthenticated")  # type: ignore[index]
    assert authorizer.check(b"Bearer router-token-2", "snapshot:read")[:2] == (401, "invalid_token")  # type: ignore[index]
    assert authorizer.check(b"Bearer other-token", "snapshot:read")[:2] == (403, "insufficient_scope")  # type: ignore[index]
    assert "router-token" not in repr(authorizer)
    for bad in ('["x"]', '{"zq1": []}', '{"zq-long-enough": "snapshot:read"}', '{"zq-token-x": [1]}', "{nope"):
        with pytest.raises(TokenConfigError) as error:
            parse_tokens(bad, "TOPOLOGY_API_TOKENS")
        assert "zq" not in str(error.value)


def test_a_fold_keeps_a_copy_not_a_sort_and_every_version_still_serializes_as_a_full_load() -> None:
    from datetime import UTC, datetime

    from topology_store.query_api.encodings import Compression
    from topology_store.query_api.snapshot import Snapshot

    rng = random.Random(7)
    table = NamespaceTable.full({f"g{n:06d}": f"cell-{n % 5}" for n in range(240_000)})
    expected = dict(table.base)
    for batch in range(3):
        upserts = {f"g{rng.randrange(10**6):06d}x{batch}": "cell-9" for _ in range(20_000)}
        upserts.update({f"g{n:06d}": "cell-7" for n in range(batch, 240_000, 997)})  # moved
        deletions = [f"g{n:06d}" for n in range(batch * 7, 240_000, 1009) if f"g{n:06d}" not in upserts]
        table = table.apply(upserts, deletions)
        for path in deletions:
            expected.pop(path, None)
        expected.update(upserts)
    assert not table.overlay and table.sorted_keys < len(table.base)  # folded by a copy: a tail out of order
    table = table.apply({"a-first": "cell-1", "zz-last": "cell-2"}, ["g000500"])
    expected.pop("g000500", None)
    expected.update({"a-first": "cell-1", "zz-last": "cell-2"})
    assert table.columns() == (sorted(expected), [expected[p] for p in sorted(expected)])
    at = datetime(2026, 1, 1, tzinfo=UTC)
    derived = Snapshot(9, at, [], table, 0.0, Compression())
    loaded = Snapshot(9, at, [], NamespaceTable.full(dict(reversed(expected.items()))), 0.0, Compression())
    for fmt in (JSON, MSGPACK):
        assert derived.representations.raw(fmt) == loaded.representations.raw(fmt)
