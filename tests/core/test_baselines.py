"""The baselines rank what they should on cases small enough to reason about by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamrec.baselines import Blend, ItemKNN, Markov, Popularity, fit_blend_weights
from streamrec.instructions import HistoryItem


def _train(rows: dict[str, str]) -> dict[str, list[HistoryItem]]:
    return {u: [HistoryItem(i) for i in items.split()] for u, items in rows.items()}


ITEMS = ["a", "b", "c", "d", "e"]
TRAIN = _train({"u1": "a b c", "u2": "a b", "u3": "a c", "u4": "d e", "u5": "a b"})


def test_popularity_ranks_by_count_and_respects_exclusions() -> None:
    pop = Popularity().fit(TRAIN, ITEMS)
    assert [s.item_id for s in pop.recommend([], k=3)] == ["a", "b", "c"]
    assert [s.item_id for s in pop.recommend([], exclude={"a"}, k=2)] == ["b", "c"]
    assert len(pop.recommend([], exclude=set(ITEMS), k=3)) == 0


def test_itemknn_uses_cosine_co_occurrence_of_recent_items() -> None:
    knn = ItemKNN(recent=1).fit(TRAIN, ITEMS)
    # e co-occurs only with d: cos(d, e) = 1 / sqrt(1 * 1) = 1
    top = knn.recommend(["a", "d"], exclude={"a", "d"}, k=1)
    assert top[0].item_id == "e" and top[0].score == pytest.approx(1.0, abs=1e-5)
    # from "a": b co-occurs 3 times (cos 3/sqrt(4*3)), c twice (2/sqrt(4*2))
    scores = {s.item_id: s.score for s in knn.recommend(["a"], exclude={"a"}, k=4)}
    assert scores["b"] == pytest.approx(3 / np.sqrt(12), abs=1e-5)
    assert scores["c"] == pytest.approx(2 / np.sqrt(8), abs=1e-5)
    assert scores["b"] > scores["c"] > scores["d"]


def test_markov_follows_the_last_item() -> None:
    mk = Markov().fit(_train({"u1": "a b c", "u2": "a b", "u3": "a c", "u4": "b d"}), ITEMS)
    assert [s.item_id for s in mk.recommend(["c", "a"], exclude={"a"}, k=2)] == ["b", "c"]
    assert mk.recommend(["b"], k=1)[0].item_id in {"c", "d"}
    # no transition out of "e": popularity breaks the tie instead of an arbitrary order
    assert mk.recommend(["e"], exclude={"e"}, k=1)[0].item_id == "a"


def test_blend_round_trips_and_mixes_distributions(tmp_path: Path) -> None:
    knn = ItemKNN(recent=2).fit(TRAIN, ITEMS)
    mk = Markov().fit(TRAIN, ITEMS)
    blend = Blend(knn, mk, 0.25, 0.5)
    path = tmp_path / "blend.npz"
    blend.save(str(path))
    back = Blend.load(str(path))
    order = ["e", "d", "c", "b", "a", "new"]
    for x, y in zip(blend.signals(["a", "b"], order), back.signals(["a", "b"], order), strict=True):
        assert np.allclose(x, y) and x[-1] == 0.0 and x.sum() == pytest.approx(1.0)
    assert (back.w_knn, back.w_markov) == (0.25, 0.5)
    uniform = np.full(6, 1 / 6, dtype=np.float32)
    mixed = back.mix(uniform, *back.signals(["a", "b"], order))
    assert mixed.sum() == pytest.approx(1.0, abs=1e-5)


def test_blend_weights_pick_the_signal_that_finds_the_target() -> None:
    p_model = np.array([[0.5, 0.3, 0.2]], dtype=np.float32)  # the model prefers column 0
    p_knn = np.array([[0.0, 0.0, 1.0]], dtype=np.float32)  # knn knows the target is column 2
    p_markov = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    w_knn, _, ndcg = fit_blend_weights(p_model, p_knn, p_markov, [2], [[]], grid=(0.0, 0.5))
    assert w_knn == 0.5 and ndcg == pytest.approx(1.0)
