"""One offline evaluation run: baselines and the model on the same leave-one-out split, the served
blend's weights fitted on validation, and the comparison chart. The shell around the pure split
(streamrec.datasets) and metrics (streamrec.ranking); `streamrec eval` calls it."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.catalog import Catalog, ScoredItem
from streamrec.datasets import Split
from streamrec.instructions import RecRequest
from streamrec.lab.baselines import Popularity
from streamrec.model.blend import Baseline, Blend, ItemKNN, Markov, blend_weights
from streamrec.model.recommender import Recommender
from streamrec.ranking import rank_metrics

KNN_RECENT = (1, 2, 3, 5, 10, 20)
BLEND_USERS = 2000


def requests_for(split: Split, stage: str, users: Sequence[str]) -> list[RecRequest]:
    """The protocol's requests: the history before the held-out item, all of it excluded."""
    out = []
    for u in users:
        hist = split.history(u, stage)
        out.append(RecRequest(tuple(hist), frozenset(h.item_id for h in hist)))
    return out


def _score(
    lists: Sequence[Sequence[ScoredItem]], users: Sequence[str], targets: dict[str, str], n: int
) -> dict[str, float]:
    ranked = {u: [s.item_id for s in lst] for u, lst in zip(users, lists, strict=True)}
    return {k: round(v, 5) for k, v in rank_metrics(ranked, targets, n).items()}


def _baseline_lists(model: Baseline, requests: Sequence[RecRequest]) -> list[list[ScoredItem]]:
    return [model.recommend([h.item_id for h in r.history], r.exclude, 10) for r in requests]


def tuned_itemknn(split: Split, items: Sequence[str], log: Callable[[str], None]) -> ItemKNN:
    """Item-kNN with the number of recent items it scores from chosen on validation NDCG@10, so the
    model is compared with the strongest version of the baseline, not a strawman."""
    users = sorted(split.valid)
    val = requests_for(split, "valid", users)
    targets = split.targets("valid")
    best: tuple[float, ItemKNN] | None = None
    base = ItemKNN().fit(split.train, items)
    assert isinstance(base, ItemKNN)
    for recent in KNN_RECENT:
        base.recent = recent
        ndcg = _score(_baseline_lists(base, val), users, targets, len(items))["NDCG@10"]
        if best is None or ndcg > best[0]:
            best = (ndcg, ItemKNN(base.neighbours, recent))
    assert best is not None
    knn = best[1]
    knn.items, knn.index, knn.pop = base.items, base.index, base.pop
    knn.indptr, knn.indices, knn.weights = base.indptr, base.indices, base.weights
    log(f"item-kNN: scoring from the {knn.recent} most recent items (validation NDCG@10 {best[0]:.4f})")
    return knn


def compare(
    rec: Recommender,
    split: Split,
    catalog: Catalog,
    *,
    blend: bool = True,
    save_blend: str | Path | None = None,
    blend_window: int = 0,
    blend_decay: float = 0.0,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Test metrics of every model on the same split. `streamrec` is what is served (T5 blended with
    the item-kNN / Markov signal when `blend`), `streamrec-t5` the T5 model alone. The blend's
    item-kNN is the tuned baseline, made sequential when `blend_window` > 0 (see ItemKNN)."""
    items = catalog.ids
    users = sorted(split.test)
    test = requests_for(split, "test", users)
    targets = split.targets("test")
    n = len(items)

    knn = tuned_itemknn(split, items, log)
    markov = Markov().fit(split.train, items)
    assert isinstance(markov, Markov)
    results: dict[str, dict[str, Any]] = {}
    for name, model in (("popularity", Popularity().fit(split.train, items)), ("itemknn", knn), ("markov", markov)):
        results[name] = _score(_baseline_lists(model, test), users, targets, n)
        log(f"{name}: {results[name]}")

    t5 = _score(rec.recommend(test, k=10, blend=False), users, targets, n)
    log(f"streamrec-t5: {t5}")
    if blend:
        blend_knn = knn
        if blend_window > 0 or blend_decay > 0:
            blend_knn = ItemKNN(knn.neighbours, knn.recent, blend_window, blend_decay)
            blend_knn.fit(split.train, items)
        b = Blend(blend_knn, markov)
        val_users = sorted(split.valid)
        if len(val_users) > BLEND_USERS:
            val_users = sorted(random.Random(0).sample(val_users, BLEND_USERS))
        val = requests_for(split, "valid", val_users)
        b.w_knn, b.w_markov, ndcg = blend_weights(rec, b, val, [split.valid[u].item_id for u in val_users])
        log(f"blend weights on validation: item-kNN {b.w_knn}, Markov {b.w_markov} (NDCG@10 {ndcg:.4f})")
        rec.set_blend(b)
        if save_blend is not None:
            rec.save_blend(save_blend)
        served: dict[str, Any] = _score(rec.recommend(test, k=10), users, targets, n)
        served["blend"] = {
            "itemknn": b.w_knn,
            "markov": b.w_markov,
            "t5": round(1 - b.w_knn - b.w_markov, 3),
            "itemknn_window": blend_knn.window,
            "itemknn_decay": blend_knn.decay,
        }
        results = {"streamrec": served, "streamrec-t5": t5, **results}
    else:
        results = {"streamrec": t5, **results}
    log(f"streamrec: {results['streamrec']}")
    return results


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """A grouped bar chart of HR@5/10, NDCG@5/10 and MRR@10 (labelled MRR, as in the report) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    names = list(models)
    metrics = ["HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(names)
    for n, name in enumerate(names):
        vals = [float(models[name].get(m, 0.0)) for m in metrics]
        bars = ax.bar(np.arange(len(metrics)) + n * width, vals, width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(names) - 1) / 2, metrics)
    ax.set_ylabel("score (higher is better)")
    ax.set_title(f"{report['dataset']}: {report['users']} users, {report['items']} items, leave-one-out, full ranking")
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
