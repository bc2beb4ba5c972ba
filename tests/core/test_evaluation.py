"""The offline protocol: the leave-one-out split in time order and metrics computed by hand."""

from __future__ import annotations

import math

import pytest

from streamrec.datasets import LogEvent, leave_one_out, sequences
from streamrec.ranking import hit_and_ndcg, rank_metrics


def test_split_holds_out_the_last_two_items_in_time_order() -> None:
    events = [
        LogEvent("u", "c", 30.0, order=0),
        LogEvent("u", "a", 10.0, order=1),
        LogEvent("u", "d", 40.0, order=2),
        LogEvent("u", "b", 20.0, order=3),
        LogEvent("v", "x", 1.0, order=4),  # too short to evaluate: trains only
        LogEvent("v", "y", 2.0, order=5),
    ]
    split = leave_one_out(events)
    assert [h.item_id for h in split.train["u"]] == ["a", "b"]
    assert split.valid["u"].item_id == "c" and split.test["u"].item_id == "d"
    assert [h.item_id for h in split.history("u", "test")] == ["a", "b", "c"]
    assert "v" not in split.test and [h.item_id for h in split.train["v"]] == ["x", "y"]


def test_equal_timestamps_keep_file_order() -> None:
    events = [LogEvent("u", "first", 5.0, order=0), LogEvent("u", "second", 5.0, order=1)]
    assert [h.item_id for h in sequences(events)["u"]] == ["first", "second"]


def test_metrics_by_hand() -> None:
    ranked = {
        "u1": ["t1", "x", "y"],  # rank 1
        "u2": ["x", "y", "t2"],  # rank 3
        "u3": ["x"] * 0 + [f"z{i}" for i in range(5)] + ["t3"],  # rank 6
        "u4": ["x", "y"],  # miss
    }
    targets = {"u1": "t1", "u2": "t2", "u3": "t3", "u4": "t4"}
    m = rank_metrics(ranked, targets, n_items=20)
    assert m["HR@5"] == pytest.approx(2 / 4)
    assert m["HR@10"] == pytest.approx(3 / 4)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(7)) / 4)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 6) / 4)
    # distinct items shown: t1 x y t2 z0..z4 t3 = 10 of 20
    assert m["coverage@10"] == pytest.approx(10 / 20)


def test_a_user_without_a_list_is_a_miss() -> None:
    m = rank_metrics({}, {"u": "a"}, n_items=5)
    assert m["HR@10"] == 0.0 and m["coverage@10"] == 0.0


def test_mrr_is_over_the_top_k_list() -> None:
    # MRR@10 (reported as "MRR"): a target ranked 12th in a longer list counts as a miss.
    ranked = {"u1": [f"z{i}" for i in range(11)] + ["t1"], "u2": ["t2"]}
    m = rank_metrics(ranked, {"u1": "t1", "u2": "t2"}, n_items=20)
    assert m["MRR"] == pytest.approx(1 / 2)
    assert rank_metrics(ranked, {"u1": "t1"}, n_items=20, cutoffs=(5, 12))["MRR"] == pytest.approx(1 / 12)


def test_the_replay_scores_a_list_as_the_offline_evaluation_does() -> None:
    ranked = {"u1": ["a", "b", "c"], "u2": ["x", "y"], "u3": [f"z{i}" for i in range(9)] + ["t"]}
    targets = {"u1": "c", "u2": "q", "u3": "t"}
    m = rank_metrics(ranked, targets, n_items=20)
    per_list = [hit_and_ndcg(ranked[u], targets[u]) for u in targets]
    assert m["HR@10"] == pytest.approx(sum(h for h, _ in per_list) / 3)
    assert m["NDCG@10"] == pytest.approx(sum(g for _, g in per_list) / 3)
