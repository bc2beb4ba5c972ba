"""The baselines rank what they should on cases small enough to reason about by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamrec.instructions import HistoryItem
from streamrec.lab.baselines import Popularity
from streamrec.model.blend import Blend, ItemKNN, Markov, fit_blend_weights


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


def test_sequential_itemknn_counts_only_nearby_pairs_weighted_by_distance() -> None:
    # One user: a b c d e in order. Window 2: (a,b) (b,c) (c,d) (d,e) weigh 1, (a,c) (b,d) (c,e) 1/2,
    # and a and d, three positions apart, are not neighbours at all. Each item occurs once: cosine
    # norms are 1.
    knn = ItemKNN(recent=1, window=2).fit(_train({"u1": "a b c d e"}), ITEMS)
    scores = {s.item_id: s.score for s in knn.recommend(["a"], exclude={"a"}, k=4)}
    assert scores["b"] == pytest.approx(1.0, abs=1e-5)
    assert scores["c"] == pytest.approx(0.5, abs=1e-5)
    assert scores["d"] < 1e-5 and scores["e"] < 1e-5  # only the popularity tie-break
    # Window 0 is classic item-kNN: the whole history co-occurs.
    classic = ItemKNN(recent=1).fit(_train({"u1": "a b c d e"}), ITEMS)
    assert classic.recommend(["a"], exclude={"a"}, k=4)[-1].score == pytest.approx(1.0, abs=1e-5)


def test_decay_weights_the_newest_history_items_most() -> None:
    train = _train({"u1": "a b", "u2": "c d"})
    flat = ItemKNN(recent=2).fit(train, ITEMS)
    decayed = ItemKNN(recent=2, decay=1.0).fit(train, ITEMS)
    # History "a", then "c" (newest): b and d tie without decay; with it d (c's neighbour) wins, and
    # b's similarity is halved (a is second from the end).
    flat_scores = {s.item_id: s.score for s in flat.recommend(["a", "c"], exclude={"a", "c"}, k=2)}
    assert flat_scores["b"] == pytest.approx(flat_scores["d"], abs=1e-5)
    top = decayed.recommend(["a", "c"], exclude={"a", "c"}, k=2)
    assert [s.item_id for s in top] == ["d", "b"]
    assert top[1].score == pytest.approx(top[0].score / 2, abs=1e-5)


def test_a_refitted_blend_keeps_its_settings_and_weights_and_learns_the_new_sequences(tmp_path: Path) -> None:
    blend = Blend(ItemKNN(recent=3, window=2, decay=0.5).fit(TRAIN, ITEMS), Markov().fit(TRAIN, ITEMS), 0.6, 0.2)
    # "e" after "a" never happened at fit time; the stream now says it does, and "f" is a new item.
    fresh = blend.refit(_train({"u1": "a e", "u2": "a e f", "u3": "a e"}), [*ITEMS, "f"])
    assert (fresh.knn.recent, fresh.knn.window, fresh.knn.decay, fresh.w_knn, fresh.w_markov) == (3, 2, 0.5, 0.6, 0.2)
    assert blend.knn.recommend(["a"], exclude={"a"}, k=1)[0].item_id == "b"
    assert fresh.knn.recommend(["a"], exclude={"a"}, k=1)[0].item_id == "e"
    assert fresh.markov.recommend(["e"], exclude={"e"}, k=1)[0].item_id == "f"
    # Settings survive the file; a file written before windows existed loads as classic item-kNN.
    fresh.save(str(tmp_path / "blend.npz"))
    back = Blend.load(str(tmp_path / "blend.npz"))
    assert (back.knn.window, back.knn.decay) == (2, 0.5)
    with np.load(tmp_path / "blend.npz") as z:
        np.savez(tmp_path / "old.npz", **{k: z[k] for k in z.files if k not in ("window", "decay")})
    old = Blend.load(str(tmp_path / "old.npz"))
    assert (old.knn.window, old.knn.decay) == (0, 0.0)
    np.testing.assert_array_equal(old.knn.indices, back.knn.indices)


def _old_format(blend: Blend, path: Path) -> None:
    """`blend` written as files were before sparse rows: every item's neighbours as one dense row of
    the same width, padded with zero similarities, and the Markov chain as (from, to, count)."""
    knn, mk = blend.knn, blend.markov
    counts = np.diff(knn.indptr)
    width = max(int(counts.max()), 1)
    nbr_idx = np.zeros((len(knn.items), width), dtype=np.int64)
    nbr_sim = np.zeros((len(knn.items), width), dtype=np.float32)
    for row in range(len(knn.items)):
        idx, sim = knn.row(row)
        nbr_idx[row, : len(idx)], nbr_sim[row, : len(idx)] = idx, sim
    src = np.repeat(np.arange(len(knn.items)), np.diff(mk.indptr))
    np.savez_compressed(
        path,
        items=np.array(knn.items, dtype=str),
        pop=knn.pop,
        nbr_idx=nbr_idx,
        nbr_sim=nbr_sim,
        recent=np.array(knn.recent),
        window=np.array(knn.window),
        decay=np.array(knn.decay),
        markov_from=src,
        markov_to=mk.indices.astype(np.int64),
        markov_count=mk.counts,
        weights=np.array([blend.w_knn, blend.w_markov]),
    )


def test_a_blend_file_of_the_dense_format_loads_and_ranks_the_same(tmp_path: Path) -> None:
    train = _train({"u1": "a b c d", "u2": "a b", "u3": "e a c", "u4": "d e", "u5": "a b e c"})
    blend = Blend(ItemKNN(recent=3, window=2, decay=0.5).fit(train, ITEMS), Markov().fit(train, ITEMS), 0.4, 0.3)
    _old_format(blend, tmp_path / "old.npz")
    with np.load(tmp_path / "old.npz") as z:
        assert "knn_indptr" not in z.files and z["nbr_idx"].shape[1] > 1  # padded rows: a real old file
    old = Blend.load(str(tmp_path / "old.npz"))
    assert (old.knn.recent, old.knn.window, old.knn.decay, old.w_knn, old.w_markov) == (3, 2, 0.5, 0.4, 0.3)
    uniform = np.full(len(ITEMS), 0.2)
    for history in (["a"], ["a", "d"], ["e", "c", "b"], ["zz"]):
        for x, y in zip(blend.signals(history, ITEMS), old.signals(history, ITEMS), strict=True):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(blend.log_probs(uniform, history, ITEMS), old.log_probs(uniform, history, ITEMS))
        assert [s.item_id for s in old.knn.recommend(history, k=5)] == [
            s.item_id for s in blend.knn.recommend(history, k=5)
        ]


def test_the_signals_fit_and_score_a_million_item_catalog_from_its_pairs_alone() -> None:
    # A dense items x items co-occurrence would need 4 TB here; the pairs are a few thousand.
    n = 1_000_000
    items = [f"i{k}" for k in range(n)]
    seqs = {f"u{u}": [f"i{u * 4999 % n}", "i0", f"i{n - 1}", f"i{(u * 7919 + 1) % n}"] for u in range(1, 201)}
    train = {u: [HistoryItem(i) for i in s] for u, s in seqs.items()}
    knn = ItemKNN(recent=5, window=3).fit(train, items)
    mk = Markov().fit(train, items)
    assert isinstance(knn, ItemKNN) and isinstance(mk, Markov)
    assert len(knn.indptr) == n + 1 and knn.indices.size <= 2 * 200 * 6 and mk.indices.size <= 200 * 3
    blend = Blend(knn, mk, 0.5, 0.5)
    (k_cols, p_knn), (m_cols, p_markov) = blend.sparse_signals(["i0"], items)
    # Every user went from i0 to the catalog's last item: both signals say so, read from one row.
    assert items[int(m_cols[np.argmax(p_markov)])] == f"i{n - 1}" and p_markov.max() == pytest.approx(1.0)
    assert items[int(k_cols[np.argmax(p_knn)])] == f"i{n - 1}" and len(k_cols) <= 200 * 2 + 1
    dense_knn, dense_markov = blend.signals(["i0"], items)
    assert dense_knn.sum() == pytest.approx(1.0) and dense_markov[n - 1] == pytest.approx(1.0)
    assert [s.item_id for s in knn.recommend(["i0"], exclude={"i0"}, k=1)] == [f"i{n - 1}"]
