"""The pure parts of the benchmark harnesses (bench/): percentiles, the open-loop pacing
schedule, ratios, joins of timestamps, the cost-growth plan, the broker choice and the
both-broker table, the claim harness's HTTP/1.1 client (against a stub on loopback). No
real servers, no timing: the harnesses report figures, they never fail on a time."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest

from bench import best_per_broker, broker_ratio, broker_table, brokers_for, interleaved
from bench.claims_latency import IDLE_LIMIT_S, Head, Pool, cpu_share, pair_requests, parse_head, request_bytes
from bench.claims_latency import offer as offer_claims
from bench.cost_growth import fill_plan, log_allowance, per_event_us
from bench.producer_throughput import alternating, rate
from bench.projector_throughput import steady_rate
from bench.steady_latency import (
    Offered,
    Summary,
    commit_times,
    due,
    expand_ranges,
    format_ratio,
    latencies_ms,
    offer,
    percentile,
    scheduled_at,
    stream_events,
    summarize,
)
from topology_store.producer.publisher import Published
from topology_store.schemas.models import CellUpdated, ClaimCreated, Event


class TestPercentile:
    def test_nearest_rank_of_one_to_a_hundred(self) -> None:
        values = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
        assert percentile(values, 50) == 50.0
        assert percentile(values, 99) == 99.0
        assert percentile(values, 100) == 100.0
        assert percentile(values, 0) == 1.0

    def test_is_always_a_value_that_occurred(self) -> None:
        values = [1.0, 2.0, 10.0, 1000.0]
        assert percentile(values, 50) == 2.0  # no interpolation towards 10
        assert percentile(values, 99) == 1000.0
        assert percentile(values, 75) == 10.0

    def test_small_samples_have_their_maximum_as_p99(self) -> None:
        assert percentile([3.0], 99) == 3.0
        assert percentile([5.0, 1.0], 50) == 1.0
        assert percentile(list(map(float, range(1, 51))), 99) == 50.0

    def test_refuses_nothing_and_bad_quantiles(self) -> None:
        with pytest.raises(ValueError):
            percentile([], 50)
        with pytest.raises(ValueError):
            percentile([1.0], 101)
        with pytest.raises(ValueError):
            percentile([1.0], -1)

    def test_summary(self) -> None:
        assert summarize([]) is None
        assert summarize([4.0, 1.0, 2.0, 3.0]) == Summary(n=4, p50=2.0, p99=4.0, max=4.0)


class TestRatio:
    @pytest.mark.parametrize(
        ("value", "baseline", "text"),
        [(2.0, 1.0, "2.00x"), (0.42, 1.0, "0.42x"), (1.0, 1.0, "1.00x"), (15.0, 1.0, "15.0x"),
         (1500.0, 1.0, "1,500x"), (24_824.0, 59_600.0, "0.42x")],
    )
    def test_formats_the_multiple(self, value: float, baseline: float, text: str) -> None:
        assert format_ratio(value, baseline) == text

    @pytest.mark.parametrize(("value", "baseline"), [(1.0, 0.0), (1.0, -2.0), (math.inf, 1.0), (1.0, math.nan)])
    def test_no_ratio_without_a_usable_baseline(self, value: float, baseline: float) -> None:
        assert format_ratio(value, baseline) == "n/a"


class TestPacing:
    def test_event_k_is_due_at_k_over_rate(self) -> None:
        for rate_per_s in (1000, 5000, 3):
            for k in range(2000):
                at = scheduled_at(k, rate_per_s)
                assert due(rate_per_s, at, 10**9) == k + 1  # released exactly at its time, not a tick later

    def test_a_second_releases_the_rate(self) -> None:
        assert due(1000, 0.0, 10**6) == 1
        assert due(1000, 0.9999, 10**6) == 1000
        assert due(5000, 1.0, 10**6) == 5001  # events 0..5000: the one due at t=1 s included

    def test_a_stalled_pacer_catches_up_at_once(self) -> None:
        # Open loop: what is released depends on the clock only. A pacer that woke
        # 100 ms late releases the 100 events that fell due meanwhile, in one go.
        smooth = [due(1000, t / 1000, 10**6) for t in range(301)]
        assert due(1000, 0.300, 10**6) == smooth[-1]
        assert due(1000, 0.300, 10**6) - due(1000, 0.200, 10**6) == 100
        assert all(later >= earlier for earlier, later in itertools.pairwise(smooth))

    def test_bounds(self) -> None:
        assert due(1000, -0.5, 100) == 0
        assert due(1000, 10.0, 100) == 100

    async def test_offer_never_waits_for_acknowledgements(self) -> None:
        """A closed-loop pacer would wait for the first acknowledgement before releasing
        more; here no acknowledgement comes until the last event has been released, so
        only an open-loop pacer finishes."""
        released_all = asyncio.Event()
        publisher = _GatedPublisher(released_all)
        events: list[Event] = stream_events("t", 60)
        offered = Offered()

        async def last_released() -> None:
            released_all.set()

        await asyncio.wait_for(offer(publisher, events, 3000.0, offered,  # type: ignore[arg-type]
                                     marks={len(events) - 1: last_released}), timeout=10)
        assert offered.sent == 60
        assert sorted(ack.index for ack in offered.acks.values()) == list(range(60))
        assert len(offered.released) == 60
        assert offered.failed == 0


class _GatedPublisher:
    """Acknowledges nothing until ``gate`` is set."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate

    async def publish_many(self, events: Sequence[Event]) -> AsyncIterator[Published]:
        await self.gate.wait()
        for n, event in enumerate(events):
            yield Published(event.event_id, event.EVENT_TYPE, "t", 0, n)


def test_stream_has_a_few_cell_events_among_distinct_namespaces() -> None:
    events = stream_events("x", 1000)
    claims = [e for e in events if isinstance(e, ClaimCreated)]
    cells = [e for e in events if isinstance(e, CellUpdated)]
    assert len(cells) == 10 and len(claims) == 990
    assert len({c.value for c in claims}) == 990
    # Consecutive updates of one cell differ, so each one changes the routing table.
    by_cell: dict[str, list[int | None]] = {}
    for c in cells:
        by_cell.setdefault(c.cell_id, []).append(c.weight)
    assert all(len(set(w)) == len(w) for w in by_cell.values())


class TestJoins:
    def test_fetched_ranges_become_per_record_arrivals(self) -> None:
        received = expand_ranges([("c", 1, 10, 12, 5.0), ("c", 2, 0, 0, 6.0), ("c", 1, 12, 13, 7.0)])
        assert received == {("c", 1, 10): 5.0, ("c", 1, 11): 5.0, ("c", 1, 12): 5.0, ("c", 2, 0): 6.0,
                            ("c", 1, 13): 7.0}  # offset 12 fetched twice: its first arrival counts

    def test_commit_time_is_the_arrival_of_the_versions_notification(self) -> None:
        a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        assert commit_times({a: 3, b: 3, c: 4}, {3: 100.5, 5: 101.0}) == {a: 100.5, b: 100.5}

    def test_latencies_are_signed_milliseconds_over_common_keys(self) -> None:
        got = latencies_ms({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.25, "b": 1.999})
        assert got == pytest.approx([250.0, -1.0])


class TestCostGrowth:
    def test_log_allowance(self) -> None:
        assert log_allowance(1_000_000, 10_000) == pytest.approx(1.5)
        assert log_allowance(100_000, 10_000) == pytest.approx(1.25)
        assert log_allowance(10_000, 10_000) == 1.0

    def test_fill_plan_counts_the_extra_events_toward_the_next_size(self) -> None:
        assert fill_plan([1_000_000, 10_000, 100_000], 20_000) == [
            (10_000, 10_000), (70_000, 100_000), (880_000, 1_000_000)]

    def test_fill_plan_refuses_a_size_the_previous_one_overshoots(self) -> None:
        with pytest.raises(ValueError):
            fill_plan([10_000, 20_000], 20_000)

    def test_per_event_cost(self) -> None:
        assert per_event_us(0.5, 2_500) == pytest.approx(200.0)


def test_producer_rounds_alternate_starting_with_the_baseline() -> None:
    assert alternating(2) == ["bare", "library", "bare", "library"]
    assert alternating(0) == []
    assert rate(100, 0.5) == 200.0


class TestBrokerChoice:
    def test_both_by_default_when_apache_kafka_can_start(self) -> None:
        assert brokers_for(None, apache_available=True) == ["tansu", "apache"]
        assert brokers_for(None, apache_available=False) == ["tansu"]

    def test_an_explicit_choice(self) -> None:
        assert brokers_for("tansu", apache_available=True) == ["tansu"]
        assert brokers_for("apache", apache_available=True) == ["apache"]
        assert brokers_for("both", apache_available=True) == ["tansu", "apache"]
        assert brokers_for("tansu", apache_available=False) == ["tansu"]

    @pytest.mark.parametrize("choice", ["apache", "both"])
    def test_apache_kafka_asked_for_but_missing_is_an_error_not_a_fallback(self, choice: str) -> None:
        with pytest.raises(ValueError, match="needs Apache Kafka"):
            brokers_for(choice, apache_available=False)

    def test_refuses_an_unknown_broker(self) -> None:
        with pytest.raises(ValueError):
            brokers_for("redpanda", apache_available=True)


class TestRounds:
    def test_brokers_alternate_round_by_round(self) -> None:
        assert interleaved(["tansu", "apache"], 3) == ["tansu", "apache"] * 3
        assert interleaved(["tansu"], 2) == ["tansu", "tansu"]
        with pytest.raises(ValueError):
            interleaved(["tansu"], 0)

    def test_each_brokers_best_round_in_the_brokers_order(self) -> None:
        runs = [("tansu", 5.0), ("apache", 3.0), ("tansu", 7.0), ("apache", 2.0), ("tansu", 7.0)]
        best = best_per_broker(runs, lambda r: r[0], lambda r: r[1])
        assert best == [("tansu", 7.0), ("apache", 3.0)]
        assert best[0] is runs[2]  # the first of equals


class TestBrokerTable:
    def test_columns_per_broker_and_the_ratio_apache_to_tansu(self) -> None:
        lines = broker_table([("rate", {"tansu": 100.0, "apache": 50.0}), ("only one", {"tansu": 3.0})],
                             ["tansu", "apache"], "{:.0f}".format)
        assert lines == ["|  | Tansu | Apache Kafka | Apache/Tansu |", "|---|---|---|---|",
                         "| rate | 100 | 50 | 0.50x |", "| only one | 3 |  |  |"]

    def test_one_broker_has_no_ratio_column(self) -> None:
        assert broker_table([("rate", {"tansu": 1.0})], ["tansu"], "{:.1f}".format) == [
            "|  | Tansu |", "|---|---|", "| rate | 1.0 |"]

    def test_a_row_may_bring_its_own_format_and_go_without_a_ratio(self) -> None:
        lines = broker_table([("load", {"tansu": 1.5, "apache": 3.0}, "{:.2f}".format)], ["tansu", "apache"],
                             "{:.0f}".format, ratio_rows=[])
        assert lines[-1] == "| load | 1.50 | 3.00 |  |"

    @pytest.mark.parametrize(("apache", "tansu", "text"),
                             [(2.0, 1.0, "2.00x"), (25.0, 1.0, "25.0x"), (1.0, 0.0, ""), (None, 1.0, ""),
                              (1.0, math.nan, "")])
    def test_ratio(self, apache: float | None, tansu: float, text: str) -> None:
        assert broker_ratio(apache, tansu) == text


class TestResponseHead:
    def test_status_and_length(self) -> None:
        head = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 345\r\n\r\n"
        assert parse_head(head) == Head(201, 345, keep_alive=True)

    def test_header_names_in_any_case_and_spacing(self) -> None:
        assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length:12\r\n\r\n") == Head(200, 12, True)
        assert parse_head(b"HTTP/1.1 409 Conflict\r\nCONTENT-LENGTH:  7 \r\n\r\n") == Head(409, 7, True)

    def test_connection_close_and_http_1_0(self) -> None:
        assert parse_head(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                          ).keep_alive is False
        assert parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n").keep_alive is False
        assert parse_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\n").keep_alive

    def test_no_body_without_length_only_where_http_says_so(self) -> None:
        assert parse_head(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n") == Head(304, 0, True)
        assert parse_head(b"HTTP/1.1 204 No Content\r\n\r\n") == Head(204, 0, True)
        with pytest.raises(ValueError, match="without Content-Length"):
            parse_head(b"HTTP/1.1 200 OK\r\n\r\n")

    def test_refuses_chunked_and_garbage(self) -> None:
        with pytest.raises(ValueError, match="chunked"):
            parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        with pytest.raises(ValueError):
            parse_head(b"SSH-2.0-OpenSSH\r\n\r\n")


class TestRequests:
    def test_a_post_carries_its_length_and_token(self) -> None:
        request = request_bytes("POST", "/v1/claims", b'{"a": 1}', token="t0k")
        head, _, body = request.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /v1/claims HTTP/1.1"
        assert b"Authorization: Bearer t0k" in lines and b"Content-Length: 8" in lines
        assert body == b'{"a": 1}'

    def test_a_get_has_no_body_headers(self) -> None:
        assert request_bytes("GET", "/healthz") == (
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: identity\r\n\r\n")

    def test_pairs_commit_the_lease_their_begin_names(self) -> None:
        import json

        pairs = pair_requests(50, "x", commit=True, token="t")
        values, leases = set(), set()
        for begin, commit in pairs:
            body = json.loads(begin.partition(b"\r\n\r\n")[2])
            assert commit is not None and commit.startswith(f"POST /v1/leases/{body['lease_id']}/commit ".encode())
            values.add(body["claims"][0]["value"])
            leases.add(body["lease_id"])
        assert len(values) == len(leases) == 50  # a fresh namespace and lease each
        assert all(commit is None for _, commit in pair_requests(3, "y", commit=False))


class TestClaimClient:
    async def test_offer_releases_on_schedule_without_waiting_for_answers(self) -> None:
        """Open loop against a server that answers nothing until every request has arrived:
        a client that waited for answers (or queued on a bounded pool) would never finish."""
        total = 40
        arrived = 0
        everyone = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal arrived
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next(int(line[15:]) for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:"))
                    await reader.readexactly(length)
                    arrived += 1
                    if arrived == total:
                        everyone.set()
                    await everyone.wait()
                    status = b"201 Created" if head.startswith(b"POST /v1/claims ") else b"200 OK"
                    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\n{}")
            except asyncio.IncompleteReadError:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            step = await asyncio.wait_for(
                offer_claims(port, "t", 400.0, pair_requests(total, "t", commit=False), connections=2, timeout_s=20),
                timeout=20)
        finally:
            server.close()
        assert step.statuses == {"begin 201": total}
        assert len(step.begin) == total and step.failed == 0
        assert step.opened >= total  # every request had a connection of its own: nothing queued
        # Timed from when each was due: the first waited for the last one's release.
        assert max(step.begin) >= (total - 1) / 400.0

    async def test_pairs_commit_on_the_begins_connection_after_its_201(self) -> None:
        seen: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next(int(line[15:]) for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:"))
                    await reader.readexactly(length)
                    seen.append(head.split(b" ", 2)[1])
                    status = b"201 Created" if head.startswith(b"POST /v1/claims ") else b"200 OK"
                    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
            except asyncio.IncompleteReadError:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            step = await offer_claims(port, "p", 200.0, pair_requests(10, "p", commit=True), connections=1,
                                      timeout_s=10)
        finally:
            server.close()
        assert step.statuses == {"begin 201": 10, "commit 200": 10}
        assert len(step.pair) == len(step.commit) == 10
        assert max(step.pair) >= max(step.begin)  # each pair ends after its own begin
        assert seen.count(b"/v1/claims") == 10 and len(seen) == 20


    async def test_the_pool_reuses_fresh_connections_and_drops_stale_or_closed_ones(self) -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        pool = Pool(server.sockets[0].getsockname()[1])
        try:
            first = await pool.get()
            pool.put(first)
            assert await pool.get() is first and pool.opened == 1
            pool.idle.append((first, time.perf_counter() - IDLE_LIMIT_S - 1))  # idle past the server's keep-alive
            second = await pool.get()
            assert second is not first and pool.opened == 2
            second[0].feed_eof()  # the server closed it
            pool.put(second)
            assert await pool.get() is not second and pool.opened == 3
        finally:
            pool.close()
            server.close()


def test_cpu_share_is_percent_of_one_core() -> None:
    assert cpu_share(0.5, 2.0) == 25.0
    assert cpu_share(3.0, 1.5) == 200.0
    assert math.isnan(cpu_share(1.0, 0.0))


def test_steady_projector_rate_leaves_the_start_out() -> None:
    assert steady_rate(100_000, 12.0, 2.0, 10_000) == pytest.approx(9_000.0)
    assert steady_rate(100_000, 5.0, 5.0, 100_000) is None  # caught up at the first look
    assert steady_rate(100_000, 5.0, 4.8, 95_000) is None  # too little left to measure


def test_the_knee_is_the_highest_rate_within_the_target() -> None:
    from bench.claims_latency import Step, knee, within_target

    def step(pairs_per_s: float, latency_s: float, shed: int = 0, failed: int = 0) -> Step:
        s = Step(f"{pairs_per_s}", pairs_per_s, 10, begin=[latency_s] * 10, commit=[latency_s] * 10)
        s.statuses.update({"begin 201": 10, "commit 200": 10, "begin 429": shed, "commit 409": failed})
        s.shed = [0.001] * shed
        return s

    fast, slow, shedding, failing = step(25, 0.05), step(150, 0.5), step(75, 0.05, shed=1), step(100, 0.05, failed=1)
    assert within_target(fast) and not within_target(slow)
    assert not within_target(shedding) and not within_target(failing)  # a 429 or a 409 is not "no failure"
    assert knee([fast, shedding, failing, slow]) == 50.0  # requests/s: two per pair
    assert knee([slow]) is None
