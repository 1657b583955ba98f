"""The pure parts of the benchmark harnesses (bench/): percentiles, the open-loop pacing
schedule, ratios, joins of timestamps, the cost-growth plan. No servers, no timing:
the harnesses report figures, they never fail on a time."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest

from bench.cost_growth import fill_plan, log_allowance, per_event_us
from bench.producer_throughput import alternating, rate
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
        smooth = [due(1000, t / 1000, 10**6) for t in range(0, 301)]
        assert due(1000, 0.300, 10**6) == smooth[-1]
        assert due(1000, 0.300, 10**6) - due(1000, 0.200, 10**6) == 100
        assert all(later >= earlier for earlier, later in zip(smooth, smooth[1:], strict=False))

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
