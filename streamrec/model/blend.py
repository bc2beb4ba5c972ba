"""The served blend: the cheap sequential signals (item-kNN over co-occurrence, first-order Markov)
that the T5's scores are mixed with, the mix itself, and how its weights are chosen. numpy only,
memory bounded by a neighbour cut-off so a large catalog stays small."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from streamrec.catalog import ScoredItem
from streamrec.instructions import HistoryItem, RecRequest
from streamrec.ranking import gain

if TYPE_CHECKING:
    from streamrec.model.recommender import Recommender

FloatArray = npt.NDArray[np.float32]

# Ties and empty signals fall back to popularity, scaled so it never outranks a real signal.
_POP_TIE = 1e-6


def top_k(scores: npt.NDArray[np.floating], banned: Sequence[int], k: int) -> npt.NDArray[np.intp]:
    """Positions of the `k` best scores, best first (ties in position order), never a `banned` one."""
    s = scores.astype(np.float64)  # a copy: the caller's scores stay as they were
    s[list(banned)] = -np.inf
    k = min(k, int(np.isfinite(s).sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.intp)
    top = np.argpartition(-s, k - 1)[:k]
    return top[np.argsort(-s[top], kind="stable")]


class Baseline:
    """Fit on training histories, then score every catalog item for a history."""

    name = "baseline"

    def __init__(self) -> None:
        self.items: list[str] = []
        self.index: dict[str, int] = {}
        self.pop: FloatArray = np.zeros(0, dtype=np.float32)

    def fit(self, train: Mapping[str, Sequence[HistoryItem]], items: Iterable[str]) -> Baseline:
        self.items = list(dict.fromkeys(items))
        self.index = {item: n for n, item in enumerate(self.items)}
        self.pop = np.zeros(len(self.items), dtype=np.float32)
        for seq in train.values():
            for h in seq:
                if h.item_id in self.index:
                    self.pop[self.index[h.item_id]] += 1.0
        self._fit([[self.index[h.item_id] for h in seq if h.item_id in self.index] for seq in train.values()])
        return self

    def _fit(self, seqs: list[list[int]]) -> None:
        pass

    def scores(self, history: Sequence[str]) -> FloatArray:
        """A score per catalog item (the order of `items`) for a history of item ids, oldest first."""
        return self._scores([self.index[i] for i in history if i in self.index]) + _POP_TIE * self._pop_norm()

    def _scores(self, history: list[int]) -> FloatArray:
        return np.zeros(len(self.items), dtype=np.float32)

    def _pop_norm(self) -> FloatArray:
        top = float(self.pop.max()) if len(self.pop) else 1.0
        return self.pop / max(top, 1.0)

    def recommend(self, history: Sequence[str], exclude: Iterable[str] = (), k: int = 10) -> list[ScoredItem]:
        s = self.scores(history).astype(np.float64)
        top = top_k(s, [self.index[i] for i in exclude if i in self.index], k)
        return [ScoredItem(self.items[n], float(s[n])) for n in top]


class ItemKNN(Baseline):
    """Cosine similarity of item co-occurrence across users; a history scores each item by the summed
    similarity to its `recent` latest items. Only the `neighbours` most similar items are kept.

    `window` 0 counts two items as co-occurring when one user has both (classic item-kNN). A
    `window` > 0 makes it sequential: only pairs at most `window` positions apart in a user's
    sequence count, weighted 1 / distance, so items chosen in the same sitting dominate; those
    neighbourhoods shift with what users are doing now, which is why they reward refitting on a
    stream. `decay` > 0 weights the history's items by 1 / (position from the end) ** decay."""

    name = "itemknn"

    def __init__(self, neighbours: int = 200, recent: int = 20, window: int = 0, decay: float = 0.0) -> None:
        super().__init__()
        self.neighbours = neighbours
        self.recent = recent
        self.window = window
        self.decay = decay
        self.nbr_idx = np.zeros((0, 0), dtype=np.int32)
        self.nbr_sim = np.zeros((0, 0), dtype=np.float32)

    def like(self) -> ItemKNN:
        """An unfitted item-kNN with the same settings."""
        return ItemKNN(self.neighbours, self.recent, self.window, self.decay)

    def _fit(self, seqs: list[list[int]]) -> None:
        n = len(self.items)
        co = self._sequential(seqs, n) if self.window > 0 else self._cooccurrence(seqs, n)
        count = np.diag(co).copy()
        np.fill_diagonal(co, 0.0)
        norm = np.sqrt(np.maximum(count, 1.0))
        co /= norm[:, None]
        co /= norm[None, :]
        kk = min(self.neighbours, max(n - 1, 1))
        self.nbr_idx = np.zeros((n, kk), dtype=np.int32)
        self.nbr_sim = np.zeros((n, kk), dtype=np.float32)
        # Row blocks: a whole-matrix argpartition would copy the n x n matrix once more.
        block = 1024
        for start in range(0, n if n > 1 else 0, block):
            rows = co[start : start + block]
            idx = np.argpartition(-rows, kk - 1, axis=1)[:, :kk]
            self.nbr_idx[start : start + block] = idx
            self.nbr_sim[start : start + block] = np.take_along_axis(rows, idx, axis=1)

    def _sequential(self, seqs: list[list[int]], n: int) -> FloatArray:
        """Pair weights 1 / distance within `window`, symmetric; the diagonal holds each item's count."""
        co = np.zeros((n, n), dtype=np.float32)
        for seq in seqs:
            a = np.asarray(seq, dtype=np.int64)
            for d in range(1, min(self.window, len(a) - 1) + 1):
                np.add.at(co, (a[:-d], a[d:]), 1.0 / d)
        co += co.T
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs] or [np.zeros(0, dtype=np.int64)])
        np.fill_diagonal(co, np.bincount(flat, minlength=n).astype(np.float32))
        return co

    @staticmethod
    def _cooccurrence(seqs: list[list[int]], n: int) -> FloatArray:
        """Users having both items; the diagonal holds each item's user count."""
        co = np.zeros((n, n), dtype=np.float32)
        # Users in blocks: a dense user-item block times its transpose adds that block's co-occurrences
        # without ever holding the full user-item matrix.
        block = 1024
        for start in range(0, len(seqs), block):
            x = np.zeros((min(block, len(seqs) - start), n), dtype=np.float32)
            for r, seq in enumerate(seqs[start : start + block]):
                x[r, seq] = 1.0
            co += x.T @ x
        return co

    def _scores(self, history: list[int]) -> FloatArray:
        s = np.zeros(len(self.items), dtype=np.float32)
        recent = history[-self.recent :] if self.recent > 0 else history
        if recent:
            sims = self.nbr_sim[recent]
            if self.decay > 0:
                age = np.arange(len(recent), 0, -1, dtype=np.float32)  # 1 for the newest item
                sims = sims * (age**-self.decay)[:, None]
            np.add.at(s, self.nbr_idx[recent].ravel(), sims.ravel())
        return s


class Markov(Baseline):
    """First-order Markov chain: how often each item followed the user's last item in training."""

    name = "markov"

    def __init__(self) -> None:
        super().__init__()
        self.next_idx: list[npt.NDArray[np.int64]] = []
        self.next_cnt: list[FloatArray] = []

    def _fit(self, seqs: list[list[int]]) -> None:
        n = len(self.items)
        pairs: dict[int, dict[int, float]] = {}
        for seq in seqs:
            for a, b in pairwise(seq):
                row = pairs.setdefault(a, {})
                row[b] = row.get(b, 0.0) + 1.0
        self.next_idx = [np.array(list(pairs.get(i, {})), dtype=np.int64) for i in range(n)]
        self.next_cnt = [np.array(list(pairs.get(i, {}).values()), dtype=np.float32) for i in range(n)]

    def _scores(self, history: list[int]) -> FloatArray:
        s = np.zeros(len(self.items), dtype=np.float32)
        if history:
            last = history[-1]
            s[self.next_idx[last]] = self.next_cnt[last]
        return s


class Blend:
    """The cheap signal the served recommender mixes into the model's distribution: a mixture
    `(1 - a - b) * P_model + a * P_knn + b * P_markov`, where the item-kNN and Markov scores are
    normalised into distributions. Weights are chosen on validation data; `save`/`load` keep the
    fitted signals beside the model (npz, no pickle)."""

    def __init__(self, knn: ItemKNN, markov: Markov, w_knn: float = 0.0, w_markov: float = 0.0) -> None:
        self.knn = knn
        self.markov = markov
        self.w_knn = w_knn
        self.w_markov = w_markov
        self._cols_for: Sequence[str] | None = None
        self._cols = np.zeros(0, dtype=np.int64)

    @staticmethod
    def _dist(s: FloatArray) -> FloatArray:
        total = float(s.sum())
        return s / total if total > 0 else s

    def signals(self, history: Sequence[str], items: Sequence[str]) -> tuple[FloatArray, FloatArray]:
        """(P_knn, P_markov) over `items` (any order; unknown items get 0)."""
        hist = [self.knn.index[i] for i in history if i in self.knn.index]
        if self._cols_for is not items:  # one lookup per catalog, not per request
            self._cols = np.array([self.knn.index.get(i, -1) for i in items], dtype=np.int64)
            self._cols_for = items
        cols = self._cols
        known = cols >= 0
        out = []
        for s in (self.knn._scores(hist), self.markov._scores(hist)):
            row = np.zeros(len(items), dtype=np.float32)
            row[known] = s[cols[known]]
            out.append(self._dist(row))
        return out[0], out[1]

    def refit(
        self,
        sequences: Mapping[str, Sequence[HistoryItem]],
        items: Iterable[str],
        weights: tuple[float, float] | None = None,
    ) -> Blend:
        """The same signals fitted again on `sequences` (per user, oldest first), with the same weights
        or new `weights` (w_knn, w_markov): what an online increment ships with its adapter, so the
        served neighbourhoods follow the stream."""
        knn = self.knn.like().fit(sequences, items)
        markov = Markov().fit(sequences, items)
        assert isinstance(knn, ItemKNN) and isinstance(markov, Markov)
        w_knn, w_markov = weights if weights is not None else (self.w_knn, self.w_markov)
        return Blend(knn, markov, w_knn, w_markov)

    def log_probs(
        self, p_model: npt.NDArray[np.floating], history: Sequence[str], items: Sequence[str]
    ) -> npt.NDArray[np.float64]:
        """The served score of each of `items`: the log of the mixture for a user with `history`."""
        p_knn, p_markov = self.signals(history, items)
        return np.log(self.mix(p_model, p_knn, p_markov).astype(np.float64) + 1e-30)

    def mix(self, p_model: FloatArray, p_knn: FloatArray, p_markov: FloatArray) -> FloatArray:
        w = 1.0 - self.w_knn - self.w_markov
        mixed: FloatArray = w * p_model + self.w_knn * p_knn + self.w_markov * p_markov
        return mixed

    def save(self, path: str) -> None:
        m = self.markov
        empty_i = np.zeros(0, dtype=np.int64)
        a = np.concatenate([np.full(len(idx), n, dtype=np.int64) for n, idx in enumerate(m.next_idx)] or [empty_i])
        b = np.concatenate(m.next_idx or [empty_i])
        c = np.concatenate(m.next_cnt or [np.zeros(0, dtype=np.float32)])
        np.savez_compressed(
            path,
            items=np.array(self.knn.items, dtype=str),
            pop=self.knn.pop,
            nbr_idx=self.knn.nbr_idx,
            nbr_sim=self.knn.nbr_sim,
            recent=np.array(self.knn.recent),
            window=np.array(self.knn.window),
            decay=np.array(self.knn.decay),
            markov_from=a.astype(np.int64),
            markov_to=b.astype(np.int64),
            markov_count=c.astype(np.float32),
            weights=np.array([self.w_knn, self.w_markov], dtype=np.float64),
        )

    @classmethod
    def load(cls, path: str) -> Blend:
        with np.load(path, allow_pickle=False) as z:
            items = [str(i) for i in z["items"]]
            # Files written before sequential neighbourhoods existed hold classic item-kNN.
            window = int(z["window"]) if "window" in z.files else 0
            decay = float(z["decay"]) if "decay" in z.files else 0.0
            knn = ItemKNN(neighbours=int(z["nbr_idx"].shape[1]), recent=int(z["recent"]), window=window, decay=decay)
            markov = Markov()
            for model in (knn, markov):
                model.items = items
                model.index = {item: n for n, item in enumerate(items)}
                model.pop = z["pop"].astype(np.float32)
            knn.nbr_idx, knn.nbr_sim = z["nbr_idx"], z["nbr_sim"]
            a, b, c = z["markov_from"], z["markov_to"], z["markov_count"]
            order = np.argsort(a, kind="stable")
            bounds = np.searchsorted(a[order], np.arange(len(items) + 1))
            markov.next_idx = [b[order][bounds[n] : bounds[n + 1]] for n in range(len(items))]
            markov.next_cnt = [c[order][bounds[n] : bounds[n + 1]].astype(np.float32) for n in range(len(items))]
            w_knn, w_markov = (float(x) for x in z["weights"])
        return cls(knn, markov, w_knn, w_markov)


def fit_blend_weights(
    p_model: FloatArray,
    p_knn: FloatArray,
    p_markov: FloatArray,
    targets: Sequence[int],
    banned: Sequence[Sequence[int]],
    # Fine at the top: the model's softmax is peaked, so its share of the mixture is best kept small.
    grid: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98),
) -> tuple[float, float, float]:
    """The (w_knn, w_markov) on `grid` with the best NDCG@10 on validation rows; returns
    (w_knn, w_markov, ndcg10). Rows are users, columns items; `targets` the column of each
    user's held-out item, `banned` the columns never to rank (the user's history)."""
    best = (0.0, 0.0, -1.0)
    for a in grid:
        for b in grid:
            if a + b > 0.99:
                continue
            mixed = (1 - a - b) * p_model + a * p_knn + b * p_markov
            total = 0.0
            for r, t in enumerate(targets):
                row = mixed[r].copy()
                row[list(banned[r])] = -1.0
                total += gain(int((row > row[t]).sum()) + 1, 10)  # ties go the target's way
            ndcg = total / max(len(targets), 1)
            if ndcg > best[2] + 1e-9:
                best = (a, b, ndcg)
    return best


def blend_weights(
    rec: Recommender, blend: Blend, requests: Sequence[RecRequest], targets: Sequence[str]
) -> tuple[float, float, float]:
    """(w_knn, w_markov, NDCG@10) of `blend`'s signals mixed with `rec`'s model (as it is now, without
    a blend) on `requests`, whose next items are `targets`: see `fit_blend_weights`."""
    return weights_on(rec.item_probs(requests, blend), blend, rec.trie_items, requests, targets)


def weights_on(
    p_model: np.ndarray, blend: Blend, items: Sequence[str], requests: Sequence[RecRequest], targets: Sequence[str]
) -> tuple[float, float, float]:
    """`blend_weights` with the model's distributions over `items` already computed (a row per request)."""
    cols = {item: c for c, item in enumerate(items)}
    sig = [blend.signals([h.item_id for h in r.history], items) for r in requests]
    p_knn = np.stack([s[0] for s in sig])
    p_markov = np.stack([s[1] for s in sig])
    tcols = [cols.get(t, 0) for t in targets]
    banned = [[cols[i] for i in r.exclude if i in cols] for r in requests]
    return fit_blend_weights(p_model, p_knn, p_markov, tcols, banned)


# Per-item attribution (explanations), kept apart from the scoring above.
from dataclasses import dataclass  # noqa: E402


@dataclass(frozen=True, slots=True)
class Support:
    """The history item that supports a recommended item most, and the signal that says so: "knn"
    (an item-kNN neighbour of it), "markov" (the last item, whose transition scored it) or "recent"
    (the most recent item, when no signal links the two)."""

    item_id: str
    by: str


def supports(blend: Blend | None, history: Sequence[str], items: Sequence[str]) -> dict[str, Support]:
    """For each of `items` (recommended for a user with `history`, item ids oldest first), the history
    item that supports it most, from the blend's signals. Of the two classic parts of the mixture the
    larger decides: item-kNN names the history item with the largest similarity contribution (after
    the history decay), Markov the last item. When neither part scores the item (the model alone
    ranked it), the history item most similar to it names it, else the most recent one (another
    item than itself when there is one). Empty for an empty history."""
    if not history:
        return {}
    out = {i: Support(next((h for h in reversed(history) if h != i), history[-1]), "recent") for i in items}
    if blend is None:
        return out
    knn, markov = blend.knn, blend.markov
    hist = [h for h in history if h in knn.index]  # as Blend.signals reads the history
    cand = [i for i in items if i in knn.index]
    if not hist or not cand or knn.nbr_idx.size == 0:
        return out
    rows = np.array([knn.index[h] for h in hist], dtype=np.int64)
    cols = np.array([knn.index[i] for i in cand], dtype=np.int64)
    # sim[r, c]: the similarity of history item r to candidate c (0 outside r's kept neighbours).
    hits = knn.nbr_idx[rows][:, :, None] == cols[None, None, :]
    sim = (knn.nbr_sim[rows][:, :, None] * hits).sum(axis=1).astype(np.float64)
    # The kNN part as ItemKNN._scores computes it: the latest `recent` items, weighted by age.
    window = len(rows) if knn.recent <= 0 else min(knn.recent, len(rows))
    weight = np.zeros(len(rows), dtype=np.float64)
    weight[len(rows) - window :] = np.arange(window, 0, -1, dtype=np.float64) ** -knn.decay
    contrib = sim * weight[:, None]
    knn_total = float((knn.nbr_sim[rows].sum(axis=1) * weight).sum())
    last = int(rows[-1])
    if last < len(markov.next_idx):
        nxt = dict(zip(markov.next_idx[last].tolist(), markov.next_cnt[last].tolist(), strict=True))
    else:
        nxt = {}
    markov_total = float(sum(nxt.values()))
    for c, (item, col) in enumerate(zip(cand, cols.tolist(), strict=True)):
        # Summed per distinct history item: an item seen twice supports with both occurrences.
        per_item: dict[str, float] = {}
        for r, h in enumerate(hist):
            per_item[h] = per_item.get(h, 0.0) + float(contrib[r, c])
        best = max(reversed(list(per_item)), key=per_item.__getitem__)  # ties: the most recent
        p_knn = blend.w_knn * float(contrib[:, c].sum()) / knn_total if knn_total > 0 else 0.0
        p_markov = blend.w_markov * nxt.get(col, 0.0) / markov_total if markov_total > 0 else 0.0
        if p_knn > 0 and p_knn >= p_markov and per_item[best] > 0:
            out[item] = Support(best, "knn")
        elif p_markov > 0:
            out[item] = Support(hist[-1], "markov")
        else:
            nearest = len(hist) - 1 - int(np.argmax(sim[::-1, c]))  # the most similar, most recent on ties
            if sim[nearest, c] > 0:
                out[item] = Support(hist[nearest], "knn")
    return out
