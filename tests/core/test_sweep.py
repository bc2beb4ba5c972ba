"""The e2e benchmark's rate sweep: doubling then bisection finds the highest rate under the bound."""

from __future__ import annotations

from collections.abc import Callable

from streamrec.lab.bench.e2e import Stage, sweep_rates


def stage_at(capacity: float) -> tuple[list[float], Callable[[float], Stage]]:
    tried: list[float] = []

    def measure(rate: float) -> Stage:
        tried.append(rate)
        # Freshness stays low below capacity and runs away above it, as a backlog does.
        p99 = 0.3 if rate <= capacity else 5.0
        return Stage(rate, {"freshness_s": {"p99": p99}})

    return tried, measure


def test_doubling_then_bisection_brackets_the_capacity() -> None:
    tried, measure = stage_at(1_300)
    best, stages = sweep_rates(measure, 250, bound_s=1.0, max_rate=16_000, steps=3)
    assert tried[:4] == [250, 500, 1_000, 2_000]
    assert best is not None and 1_000 <= best <= 1_300 and best >= 1_000 + (2_000 - 1_000) / 8 - 10
    assert len(stages) == len(tried) == 7


def test_a_first_rate_over_the_bound_halves_down_and_one_that_never_fails_stops_at_the_cap() -> None:
    tried, measure = stage_at(100)
    best, _ = sweep_rates(measure, 250, bound_s=1.0, max_rate=16_000, steps=3)
    assert tried[:3] == [250, 125, 62.5] and best is not None and 62.5 <= best <= 100
    _, measure = stage_at(10)
    assert sweep_rates(measure, 250, bound_s=1.0, max_rate=16_000, steps=3)[0] is None  # below min_rate
    tried, measure = stage_at(10**9)
    best, _ = sweep_rates(measure, 1_000, bound_s=1.0, max_rate=4_000, steps=3)
    assert best == 4_000 and tried == [1_000, 2_000, 4_000]


def test_a_stage_without_recommendations_fails_the_bound() -> None:
    assert Stage(500, {"freshness_s": {}}).p99 == float("inf")
