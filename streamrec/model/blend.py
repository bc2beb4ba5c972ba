"""The served blend: the cheap sequential signals (item-kNN over co-occurrence, first-order Markov)
that the T5's scores are mixed with, the mix itself, and how its weights are chosen. numpy only:
both signals are fitted from item pairs (sorted pair codes, never an items x items matrix) and kept as
sparse rows (CSR), so a request reads only its history's rows, whatever the catalog's size."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from streamrec.catalog import ScoredItem
from streamrec.instructions import HistoryItem, RecRequest
from streamrec.ranking import gain

if TYPE_CHECKING:
    from streamrec.model.recommender import Recommender

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
# A signal for one history: item positions (distinct) and their scores.
Sparse = tuple[IntArray, FloatArray]

# Ties and empty signals fall back to popularity, scaled so it never outranks a real signal.
_POP_TIE = 1e-6
# Pair codes reduced (summed per pair) once this many have piled up: bounds the fit's memory.
_PAIR_CHUNK = 1 << 24


def top_k(scores: npt.NDArray[np.floating], banned: Sequence[int], k: int) -> npt.NDArray[np.intp]:
    """Positions of the `k` best scores, best first (ties in position order), never a `banned` one."""
    s = scores.astype(np.float64)  # a copy: the caller's scores stay as they were
    s[list(banned)] = -np.inf
    k = min(k, int(np.isfinite(s).sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.intp)
    top = np.argpartition(-s, k - 1)[:k]
    return top[np.argsort(-s[top], kind="stable")]


def _empty() -> Sparse:
    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)


def _reduce(keys: IntArray, weights: npt.NDArray[np.float64]) -> tuple[IntArray, npt.NDArray[np.float64]]:
    """Distinct `keys`, ascending, with their summed weights."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse.ravel(), weights=weights, minlength=len(uniq))
    return uniq, sums.astype(np.float64, copy=False)


def pair_weights(
    codes: IntArray, lengths: IntArray, n: int, window: int, by_distance: bool, *, self_pairs: bool = False
) -> tuple[IntArray, IntArray, npt.NDArray[np.float64]]:
    """Unordered pairs of distinct items (and of an item with itself, with `self_pairs`) at most
    `window` positions apart within one user's sequence (`codes`: every user's items one after the
    other, `lengths` of each), with their summed weights (1 / distance when `by_distance`, else 1):
    (lower item, higher item, weight), ascending. One numpy pass per distance over the positions
    whose user still has an item that far on, so the work is the number of pairs, never items x items."""
    owner_end = np.repeat(np.cumsum(lengths), lengths)  # one past each position's user's last item
    alive = np.arange(len(codes), dtype=np.int64)
    keys: list[IntArray] = []
    weights: list[npt.NDArray[np.float64]] = []
    held = 0
    acc_keys, acc_w = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    for d in range(1, window + 1):
        alive = alive[alive + d < owner_end[alive]]
        if len(alive) == 0:
            break
        a, b = codes[alive], codes[alive + d]
        if not self_pairs:
            ok = a != b
            a, b = a[ok], b[ok]
        keys.append(np.minimum(a, b) * n + np.maximum(a, b))
        weights.append(np.full(len(a), 1.0 / d if by_distance else 1.0))
        held += len(a)
        if held >= _PAIR_CHUNK:
            acc_keys, acc_w = _reduce(np.concatenate([acc_keys, *keys]), np.concatenate([acc_w, *weights]))
            keys, weights, held = [], [], 0
    acc_keys, acc_w = _reduce(np.concatenate([acc_keys, *keys]), np.concatenate([acc_w, *weights]))
    return acc_keys // n, acc_keys % n, acc_w


def csr_rows(indptr: IntArray, rows: npt.NDArray[np.integer]) -> tuple[IntArray, IntArray]:
    """The positions in a CSR matrix's `indices` / `data` of `rows`' entries, row after row, and
    each row's entry count."""
    starts, counts = indptr[rows], indptr[rows + 1] - indptr[rows]
    total = int(counts.sum())
    offsets = np.repeat(starts - np.cumsum(counts) + counts, counts)
    return offsets + np.arange(total, dtype=np.int64), counts


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
        get = self.index.get
        seqs = list(train.values())
        raw = np.fromiter((get(h.item_id, -1) for seq in seqs for h in seq), dtype=np.int64)
        owner = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
        known = raw >= 0  # items outside the catalog drop out: their neighbours become adjacent
        codes = raw[known]
        lengths = np.bincount(owner[known], minlength=len(seqs)).astype(np.int64)
        self.pop = np.bincount(codes, minlength=len(self.items)).astype(np.float32)
        self._fit(codes, lengths)
        return self

    def _fit(self, codes: IntArray, lengths: IntArray) -> None:
        """Fit on every user's item positions one after the other (`codes`), `lengths` per user."""

    def scores(self, history: Sequence[str]) -> FloatArray:
        """A score per catalog item (the order of `items`) for a history of item ids, oldest first."""
        return self._scores([self.index[i] for i in history if i in self.index]) + _POP_TIE * self._pop_norm()

    def _scores(self, history: list[int]) -> FloatArray:
        s = np.zeros(len(self.items), dtype=np.float32)
        idx, vals = self.sparse(history)
        s[idx] = vals
        return s

    def sparse(self, history: list[int]) -> Sparse:
        """The items this signal scores for a history of item positions, with their scores: only
        the rows of the history's items are read."""
        return _empty()

    def _pop_norm(self) -> FloatArray:
        top = float(self.pop.max()) if len(self.pop) else 1.0
        return self.pop / max(top, 1.0)

    def recommend(self, history: Sequence[str], exclude: Iterable[str] = (), k: int = 10) -> list[ScoredItem]:
        s = self.scores(history).astype(np.float64)
        top = top_k(s, [self.index[i] for i in exclude if i in self.index], k)
        return [ScoredItem(self.items[n], float(s[n])) for n in top]


class ItemKNN(Baseline):
    """Cosine similarity of item co-occurrence across users; a history scores each item by the summed
    similarity to its `recent` latest items. Only the `neighbours` most similar items are kept, as
    sparse rows: `indptr`, `indices` (neighbours, best first) and `weights` (their similarity).

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
        self.indptr = np.zeros(1, dtype=np.int64)
        self.indices = np.zeros(0, dtype=np.int32)
        self.weights = np.zeros(0, dtype=np.float32)

    def like(self) -> ItemKNN:
        """An unfitted item-kNN with the same settings."""
        return ItemKNN(self.neighbours, self.recent, self.window, self.decay)

    def _fit(self, codes: IntArray, lengths: IntArray) -> None:
        n = len(self.items)
        if self.window > 0:
            lo, hi, co = pair_weights(codes, lengths, n, self.window, by_distance=True)
            count = np.bincount(codes, minlength=n)  # occurrences
        else:
            # Classic: each user's distinct items, every pair of them once (users having both).
            owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
            distinct = np.unique(owner * n + codes)
            items, users = distinct % n, distinct // n
            per_user = np.bincount(users, minlength=len(lengths)).astype(np.int64)
            longest = int(per_user.max()) if len(per_user) else 0
            lo, hi, co = pair_weights(items, per_user, n, max(longest - 1, 0), by_distance=False)
            count = np.bincount(items, minlength=n)  # users having the item
        norm = np.sqrt(np.maximum(count, 1.0)).astype(np.float32)
        rows = np.concatenate([lo, hi])
        cols = np.concatenate([hi, lo])
        co32 = co.astype(np.float32)
        sim = np.concatenate([co32, co32]) / norm[rows] / norm[cols]
        self._keep_top(rows, cols, sim, n)

    def _keep_top(self, rows: IntArray, cols: IntArray, sim: FloatArray, n: int) -> None:
        """Keep each row's `neighbours` largest similarities (ties: the lower item first) as CSR."""
        order = np.lexsort((cols, -sim, rows))
        rows, cols, sim = rows[order], cols[order], sim[order]
        starts = np.searchsorted(rows, np.arange(n + 1))
        rank = np.arange(len(rows)) - starts[rows]
        keep = rank < self.neighbours
        rows, cols, sim = rows[keep], cols[keep], sim[keep]
        self.indptr = np.searchsorted(rows, np.arange(n + 1)).astype(np.int64)
        self.indices = cols.astype(np.int32)
        self.weights = sim.astype(np.float32)

    def sparse(self, history: list[int]) -> Sparse:
        recent = history[-self.recent :] if self.recent > 0 else history
        if not recent:
            return _empty()
        at, counts = csr_rows(self.indptr, np.asarray(recent, dtype=np.int64))
        idx = self.indices[at].astype(np.int64)
        sims = self.weights[at]
        if self.decay > 0:
            age = np.arange(len(recent), 0, -1, dtype=np.float32)  # 1 for the newest item
            sims = sims * np.repeat(age**-self.decay, counts)
        uniq, inverse = np.unique(idx, return_inverse=True)
        vals = np.zeros(len(uniq), dtype=np.float32)
        # In history order, as a dense np.add.at would: the same float32 sums, so the same lists.
        np.add.at(vals, inverse.ravel(), sims)
        return uniq, vals

    def row(self, item: int) -> Sparse:
        """One item's kept neighbours and similarities."""
        a, b = int(self.indptr[item]), int(self.indptr[item + 1])
        return self.indices[a:b].astype(np.int64), self.weights[a:b]


class Markov(Baseline):
    """First-order Markov chain: how often each item followed the user's last item in training, as
    sparse rows (`indptr`, `indices`: the next items, `counts`)."""

    name = "markov"

    def __init__(self) -> None:
        super().__init__()
        self.indptr = np.zeros(1, dtype=np.int64)
        self.indices = np.zeros(0, dtype=np.int32)
        self.counts = np.zeros(0, dtype=np.float32)

    def _fit(self, codes: IntArray, lengths: IntArray) -> None:
        n = len(self.items)
        ends = np.cumsum(lengths)
        first = np.ones(len(codes), dtype=bool)
        first[ends[lengths > 0] - lengths[lengths > 0]] = False  # a user's first item follows nothing
        to = np.flatnonzero(first)
        keys, counts = np.unique(codes[to - 1] * n + codes[to], return_counts=True)
        self.set_rows(keys // n, keys % n, counts.astype(np.float32), n)

    def set_rows(self, src: IntArray, dst: IntArray, counts: FloatArray, n: int) -> None:
        """The chain from (from, to, count) triples, in any order."""
        order = np.argsort(src, kind="stable")
        self.indptr = np.searchsorted(src[order], np.arange(n + 1)).astype(np.int64)
        self.indices = dst[order].astype(np.int32)
        self.counts = counts[order].astype(np.float32)

    def sparse(self, history: list[int]) -> Sparse:
        if not history:
            return _empty()
        return self.row(history[-1])

    def row(self, item: int) -> Sparse:
        """The items that followed `item`, with how often."""
        a, b = int(self.indptr[item]), int(self.indptr[item + 1])
        return self.indices[a:b].astype(np.int64), self.counts[a:b]


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
        self._pos = np.zeros(0, dtype=np.int64)

    def _columns(self, items: Sequence[str]) -> IntArray:
        """Each blend item's column in `items` (-1: not there), built once per list of items."""
        if self._cols_for is not items:
            get = self.knn.index.get
            at = np.fromiter((get(i, -1) for i in items), dtype=np.int64, count=len(items))
            pos = np.full(len(self.knn.items), -1, dtype=np.int64)
            ok = at >= 0
            pos[at[ok]] = np.flatnonzero(ok)
            self._pos, self._cols_for = pos, items
        return self._pos

    def sparse_signals(self, history: Sequence[str], items: Sequence[str]) -> tuple[Sparse, Sparse]:
        """(P_knn, P_markov) over `items` as (columns of `items`, probabilities): only the columns
        a signal scores. The same values `signals` spreads over every column."""
        index = self.knn.index
        hist = [index[i] for i in history if i in index]
        pos = self._columns(items)
        out = []
        for idx, vals in (self.knn.sparse(hist), self.markov.sparse(hist)):
            cols = pos[idx]
            keep = cols >= 0
            cols, vals = cols[keep], vals[keep]
            total = float(vals.sum())
            out.append((cols, vals / total if total > 0 else vals))
        return out[0], out[1]

    def signals(self, history: Sequence[str], items: Sequence[str]) -> tuple[FloatArray, FloatArray]:
        """(P_knn, P_markov) over `items` (any order; unknown items get 0)."""
        out = []
        for cols, p in self.sparse_signals(history, items):
            row = np.zeros(len(items), dtype=np.float32)
            row[cols] = p
            out.append(row)
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
        """The served score of each of `items`: the log of the mixture for a user with `history`.
        Only the signals' own columns are added to the model's share: no dense signal rows."""
        (k_cols, p_knn), (m_cols, p_markov) = self.sparse_signals(history, items)
        mixed = (1.0 - self.w_knn - self.w_markov) * p_model
        # Separate adds, knn first: the same sums, in the same order, as `mix` over dense rows.
        mixed[k_cols] += self.w_knn * p_knn
        mixed[m_cols] += self.w_markov * p_markov
        return np.log(mixed.astype(np.float64) + 1e-30)

    def log_probs_at(
        self, p_model: npt.NDArray[np.floating], at: IntArray, signals: tuple[Sparse, Sparse]
    ) -> npt.NDArray[np.float64]:
        """`log_probs` at the columns `at` only (sorted, holding every column `signals` scores, as
        `sparse_signals` gives them), `p_model` the model's probability there: the same values."""
        (k_cols, p_knn), (m_cols, p_markov) = signals
        mixed = (1.0 - self.w_knn - self.w_markov) * p_model
        mixed[np.searchsorted(at, k_cols)] += self.w_knn * p_knn
        mixed[np.searchsorted(at, m_cols)] += self.w_markov * p_markov
        return np.log(mixed.astype(np.float64) + 1e-30)

    def mix(self, p_model: FloatArray, p_knn: FloatArray, p_markov: FloatArray) -> FloatArray:
        w = 1.0 - self.w_knn - self.w_markov
        mixed: FloatArray = w * p_model + self.w_knn * p_knn + self.w_markov * p_markov
        return mixed

    def save(self, path: str) -> None:
        knn, m = self.knn, self.markov
        src = np.repeat(np.arange(len(m.indptr) - 1, dtype=np.int64), np.diff(m.indptr))
        np.savez_compressed(
            path,
            items=np.array(knn.items, dtype=str),
            pop=knn.pop,
            knn_indptr=knn.indptr,
            knn_indices=knn.indices,
            knn_weights=knn.weights,
            neighbours=np.array(knn.neighbours),
            recent=np.array(knn.recent),
            window=np.array(knn.window),
            decay=np.array(knn.decay),
            markov_from=src,
            markov_to=m.indices.astype(np.int64),
            markov_count=m.counts,
            weights=np.array([self.w_knn, self.w_markov], dtype=np.float64),
        )

    @classmethod
    def load(cls, path: str) -> Blend:
        with np.load(path, allow_pickle=False) as z:
            items = [str(i) for i in z["items"]]
            n = len(items)
            # Files written before sequential neighbourhoods existed hold classic item-kNN.
            window = int(z["window"]) if "window" in z.files else 0
            decay = float(z["decay"]) if "decay" in z.files else 0.0
            neighbours = int(z["neighbours"]) if "knn_indptr" in z.files else int(z["nbr_idx"].shape[1])
            knn = ItemKNN(neighbours=neighbours, recent=int(z["recent"]), window=window, decay=decay)
            markov = Markov()
            index = {item: n for n, item in enumerate(items)}
            for model in (knn, markov):
                model.items, model.index = items, index
                model.pop = z["pop"].astype(np.float32)
            if "knn_indptr" in z.files:
                knn.indptr = z["knn_indptr"].astype(np.int64)
                knn.indices = z["knn_indices"].astype(np.int32)
                knn.weights = z["knn_weights"].astype(np.float32)
            else:
                # The older format: dense (items x neighbours) rows, padded with zero similarities,
                # which score nothing and are dropped.
                idx, sim = z["nbr_idx"], z["nbr_sim"].astype(np.float32)
                rows = np.repeat(np.arange(n, dtype=np.int64), idx.shape[1] if idx.ndim == 2 else 0)
                flat_idx, flat_sim = idx.ravel().astype(np.int64), sim.ravel()
                keep = flat_sim > 0
                knn._keep_top(rows[keep], flat_idx[keep], flat_sim[keep], n)
            markov.set_rows(
                z["markov_from"].astype(np.int64),
                z["markov_to"].astype(np.int64),
                z["markov_count"].astype(np.float32),
                n,
            )
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
    if not hist or not cand or knn.indices.size == 0:
        return out
    rows = np.array([knn.index[h] for h in hist], dtype=np.int64)
    cols = np.array([knn.index[i] for i in cand], dtype=np.int64)
    # sim[r, c]: the similarity of history item r to candidate c (0 outside r's kept neighbours),
    # read from the history's rows only.
    sim = np.zeros((len(rows), len(cols)), dtype=np.float64)
    row_total = np.zeros(len(rows), dtype=np.float64)
    for r, item in enumerate(rows.tolist()):
        nbr, w = knn.row(item)
        row_total[r] = float(w.sum())
        sim[r] = (w[:, None] * (nbr[:, None] == cols[None, :])).sum(axis=0)
    # The kNN part as ItemKNN.sparse computes it: the latest `recent` items, weighted by age.
    window = len(rows) if knn.recent <= 0 else min(knn.recent, len(rows))
    weight = np.zeros(len(rows), dtype=np.float64)
    weight[len(rows) - window :] = np.arange(window, 0, -1, dtype=np.float64) ** -knn.decay
    contrib = sim * weight[:, None]
    knn_total = float((row_total * weight).sum())
    last = int(rows[-1])
    if last < len(markov.indptr) - 1:
        to, counts = markov.row(last)
        nxt = dict(zip(to.tolist(), counts.tolist(), strict=True))
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
