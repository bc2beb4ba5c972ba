"""The evaluation gate's decisions, at and around their boundaries."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from streamrec.feedback import FeedbackExample
from streamrec.gate import decide, holdout_metrics


def m(hr: float, ndcg: float) -> dict[str, float]:
    return {"HR@10": hr, "NDCG@10": ndcg}


def test_better_or_equal_candidate_is_accepted() -> None:
    d = decide(m(0.5, 0.3), m(0.4, 0.2), tolerance=0.0, min_examples=100, n_examples=100)
    assert d.accepted and "HR@10" in d.reason
    assert d.candidate == m(0.5, 0.3) and d.current == m(0.4, 0.2) and d.n_examples == 100
    assert decide(m(0.4, 0.2), m(0.4, 0.2), 0.0, 1, 1).accepted


@pytest.mark.parametrize(
    ("current", "candidate", "tolerance"),
    [(0.4, 0.3, 0.1), (0.7, 0.6, 0.1), (0.5, 0.45, 0.05), (0.3, 0.28, 0.02)],
)
def test_a_drop_of_exactly_the_tolerance_is_accepted(current: float, candidate: float, tolerance: float) -> None:
    # 0.4 - 0.3 is 0.10000000000000003 in floating point: still "exactly" the tolerance.
    assert decide(m(candidate, 0.5), m(current, 0.5), tolerance, 10, 10).accepted
    assert decide(m(0.5, candidate), m(0.5, current), tolerance, 10, 10).accepted


@pytest.mark.parametrize("metric", ["HR@10", "NDCG@10"])
def test_a_drop_beyond_the_tolerance_on_either_metric_is_refused(metric: str) -> None:
    current = m(0.40, 0.20)
    candidate = dict(current)
    candidate[metric] = current[metric] - 0.0201
    d = decide(candidate, current, tolerance=0.02, min_examples=10, n_examples=500)
    assert not d.accepted
    assert metric in d.reason and "worse" in d.reason
    # The other metric improving does not buy the drop back.
    other = "NDCG@10" if metric == "HR@10" else "HR@10"
    candidate[other] = 0.99
    assert not decide(candidate, current, 0.02, 10, 500).accepted


def test_tolerance_is_absolute_not_relative() -> None:
    # A relative 10% would refuse this (0.05 -> 0.03 is -40%); two points absolute is within 0.05.
    assert decide(m(0.03, 0.01), m(0.05, 0.02), 0.05, 1, 1).accepted
    assert not decide(m(0.30, 0.20), m(0.40, 0.20), 0.05, 1, 1).accepted


def test_too_few_examples_is_refused_whatever_the_metrics() -> None:
    d = decide(m(0.9, 0.9), m(0.1, 0.1), tolerance=0.0, min_examples=200, n_examples=199)
    assert not d.accepted and "too few" in d.reason and "199" in d.reason
    assert decide(m(0.9, 0.9), m(0.1, 0.1), 0.0, 200, 200).accepted


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_missing_or_non_finite_candidate_metrics_are_refused(bad: float | None) -> None:
    candidate: dict[str, float] = {"NDCG@10": 0.5} if bad is None else m(bad, 0.5)
    d = decide(candidate, m(0.1, 0.1), 0.1, 1, 10)
    assert not d.accepted and "HR@10" in d.reason


def test_non_finite_current_is_refused() -> None:
    assert not decide(m(0.5, 0.5), m(math.nan, 0.5), 0.1, 1, 10).accepted


def test_nothing_in_service_accepts_on_evidence_alone() -> None:
    assert decide(m(0.01, 0.01), {}, 0.0, 10, 10).accepted
    assert not decide(m(0.01, 0.01), {}, 0.0, 10, 9).accepted


def test_negative_tolerance_is_an_error() -> None:
    with pytest.raises(ValueError):
        decide(m(0.5, 0.5), m(0.5, 0.5), -0.01, 1, 1)


def test_decision_serialises() -> None:
    d = decide(m(0.5, 0.3), m(0.4, 0.2), 0.0, 1, 5)
    assert d.as_dict() == {
        "accepted": True,
        "reason": d.reason,
        "candidate": m(0.5, 0.3),
        "current": m(0.4, 0.2),
        "n_examples": 5,
    }


def test_holdout_metrics_score_each_example_by_its_target() -> None:
    ts = datetime(2024, 1, 1, tzinfo=UTC)
    holdout = [
        FeedbackExample(event_id=f"e{n}", user_id="u1", history=(), target=t, target_type="click", ts=ts)
        for n, t in enumerate(["a", "b"])
    ]
    # Same user twice: keyed by event, so both examples count.
    ranked = {"e0": ["a", "x"], "e1": ["x", "y"]}
    scores = holdout_metrics(ranked, holdout, n_items=10)
    assert scores["HR@10"] == 0.5 and scores["NDCG@10"] == 0.5
    assert decide(scores, scores, 0.0, 2, len(holdout)).accepted
