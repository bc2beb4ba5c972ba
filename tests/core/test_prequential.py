"""The prequential protocol's pure parts: the cut, the steps, the scoring."""

from __future__ import annotations

import math

import pytest

from streamrec.datasets import LogEvent
from streamrec.lab.prequential import Outcome, plan, report, summarize, user_steps
from streamrec.ranking import hit_and_ndcg


def ev(user: str, item: str, ts: float, order: int, kind: str = "click") -> LogEvent:
    return LogEvent(user, item, ts, kind, order)


def test_plan_sorts_by_time_then_file_order_and_cuts_equal_windows() -> None:
    events = [ev("u", f"i{n}", ts=float(10 - n // 2), order=n) for n in range(10)]
    p = plan(events, 0.4, 3)
    ordered = sorted(events, key=lambda e: (e.ts, e.order))
    assert p.bootstrap == ordered[:4]
    assert [len(w) for w in p.windows] == [2, 2, 2]
    assert p.replayed == ordered[4:]
    # Equal timestamps keep the log's order.
    assert [e.order for e in p.bootstrap] == [8, 9, 6, 7]


@pytest.mark.parametrize(("share", "windows"), [(0.0, 2), (1.0, 2), (0.5, 0)])
def test_plan_rejects_bad_arguments(share: float, windows: int) -> None:
    with pytest.raises(ValueError):
        plan([ev("u", "i", 1.0, 0)], share, windows)


def test_steps_group_a_users_same_instant_same_type_runs() -> None:
    window = [
        ev("a", "1", 5.0, 0),
        ev("b", "2", 5.0, 1),
        ev("a", "3", 5.0, 2),  # same instant and type as a's previous: same step
        ev("a", "4", 5.0, 3, "purchase"),  # same instant, other type (other topic): new step
        ev("a", "5", 6.0, 4, "purchase"),  # later: new step
        ev("b", "6", 5.0, 5),  # b's events around a's do not matter
    ]
    assert user_steps(window) == {"a": [[0, 2], [3], [4]], "b": [[1, 5]]}


def test_hit_and_ndcg_by_hand() -> None:
    assert hit_and_ndcg(["x", "y", "z"], "x") == (1.0, 1.0)
    hit, gain = hit_and_ndcg(["x", "y", "z"], "z")
    assert hit == 1.0 and gain == pytest.approx(1 / math.log2(4))
    assert hit_and_ndcg(["x", "y"], "q") == (0.0, 0.0)
    assert hit_and_ndcg([str(n) for n in range(20)], "12") == (0.0, 0.0)  # beyond the cutoff


def test_summary_scores_only_events_with_a_list_and_counts_the_rest() -> None:
    outcomes = [
        Outcome(0, 0, "a", ("a", "b")),
        Outcome(1, 0, "c", ("a", "b")),
        Outcome(2, 1, "b", ("a", "b"), adapter="v0001"),
        Outcome(3, 1, "d", None),
    ]
    s = summarize(outcomes)
    assert s["scored"] == 3 and s["no_recommendation"] == 1
    assert s["HR@10"] == pytest.approx(2 / 3)
    assert s["NDCG@10"] == pytest.approx((1.0 + 1 / math.log2(3)) / 3)
    r = report(outcomes, 2)
    assert r["first_half"]["HR@10"] == pytest.approx(0.5)
    assert r["second_half"]["HR@10"] == pytest.approx(1.0) and r["second_half"]["no_recommendation"] == 1
    assert [w["scored"] for w in r["windows"]] == [2, 1]
    assert r["served_by"] == {"base": 2, "v0001": 1}


def test_second_half_splits_events_on_items_new_since_the_bootstrap_from_the_rest() -> None:
    first = [Outcome(n, 0, "n", ("n",)) for n in range(4)]  # the first half does not count
    outcomes = [
        *first,
        Outcome(4, 1, "n", ("n", "a")),  # a new item, hit
        Outcome(5, 1, "m", ("n", "a")),  # a new item, missed
        Outcome(6, 1, "a", ("n",)),  # an old item, missed
        Outcome(7, 1, "m", None),  # a new item, no list yet: counted, not scored
    ]
    second = report(outcomes, 2, old_items={"a", "b"})["second_half"]
    assert second["new_items"] == {"events": 3, "HR@10": pytest.approx(0.5), "scored": 2}
    assert second["old_items"] == {"events": 1, "HR@10": 0.0, "scored": 1}
    assert "new_items" not in report(outcomes, 2)["second_half"]
