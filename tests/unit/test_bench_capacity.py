"""The benchmarks' pure helpers: the capacity search's next step, the growing-backlog test,
the percentile."""

from __future__ import annotations

import pytest

from bench.common import CapacitySearch, backlog_growing, percentile


def run(search: CapacitySearch, capacity: float) -> list[float]:
    """Drive the search against a system that sustains anything up to ``capacity``."""
    tried = []
    while (rate := search.next_rate()) is not None:
        tried.append(rate)
        search.record(rate, rate <= capacity)
    return tried


def test_search_steps_up_by_the_factor_then_refines_between_pass_and_fail() -> None:
    search = CapacitySearch(start=1000, factor=2.0, refine=1)
    tried = run(search, capacity=5000)
    # 1000, 2000, 4000 pass; 8000 fails; one midpoint (geometric) between 4000 and 8000.
    assert tried[:4] == [1000, 2000, 4000, 8000]
    assert tried[4] == pytest.approx((4000 * 8000) ** 0.5)
    assert len(tried) == 5
    assert search.best == 4000


def test_search_without_refinement_reports_the_last_sustained_step() -> None:
    search = CapacitySearch(start=1000, factor=1.25, refine=0)
    tried = run(search, capacity=2000)
    assert tried == pytest.approx([1000, 1250, 1562.5, 1953.125, 2441.40625])
    assert search.best == pytest.approx(1953.125)


def test_search_steps_down_when_the_start_fails() -> None:
    search = CapacitySearch(start=8000, factor=2.0, refine=0)
    tried = run(search, capacity=3000)
    assert tried[:3] == [8000, 4000, 2000]
    assert search.best == 2000


def test_search_ends_at_once_when_stopped_and_within_its_step_budget() -> None:
    stopped = CapacitySearch(start=1000)
    stopped.record(1000, True)
    stopped.stop()
    assert stopped.next_rate() is None
    bounded = CapacitySearch(start=1, factor=2.0, max_steps=5)
    assert len(run(bounded, capacity=1e12)) == 5


def test_search_does_not_refine_below_the_noise() -> None:
    search = CapacitySearch(start=1000, factor=1.03, refine=3)
    search.record(1000, True)
    search.record(1030, False)
    assert search.next_rate() is None


def test_search_rejects_a_factor_that_does_not_increase() -> None:
    with pytest.raises(ValueError, match="factor"):
        CapacitySearch(start=1000, factor=1.0)


def test_a_steady_backlog_is_not_growing_but_a_rising_one_is() -> None:
    rate = 1000.0
    steady = [(t / 2, 300 + (50 if t % 2 else -50)) for t in range(20)]
    rising = [(t / 2, int(t / 2 * 0.2 * rate)) for t in range(20)]  # 20 % over capacity
    assert not backlog_growing(steady, rate)
    assert backlog_growing(rising, rate)
    assert not backlog_growing(rising[:3], rate)  # too few samples to say


def test_percentile_picks_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 51.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 50) is None
