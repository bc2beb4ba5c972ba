"""Ranking metrics (HR@k, NDCG@k, MRR over the list, coverage@k), the one copy the offline
evaluation, the training loop's validation, the gate and the prequential replay all use. Pure values
in, numbers out: any recommender that produces ranked lists can be scored the same way."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

PROTOCOL = (
    "leave-one-out per user in time order (last = test, second last = validation, rest = train); "
    "full ranking over the catalog; items already in the user's history excluded; "
    "MRR over the top-10 list"
)
CUTOFFS = (5, 10)


def rank_metrics(
    ranked: Mapping[str, Sequence[str]],
    targets: Mapping[str, str],
    n_items: int,
    cutoffs: Sequence[int] = CUTOFFS,
) -> dict[str, float]:
    """HR@k and NDCG@k (one relevant item: 1/log2(rank + 1) when it is within k), MRR (1/rank
    within the list given, 0 when absent), and coverage@max(k): the share of the `n_items`
    catalog that appears in at least one user's top list. A user without a list counts as a miss."""
    users = list(targets)
    top = max(cutoffs)
    out: dict[str, float] = {f"HR@{k}": 0.0 for k in cutoffs} | {f"NDCG@{k}": 0.0 for k in cutoffs}
    out["MRR"] = 0.0
    shown: set[str] = set()
    for u in users:
        lst = list(ranked.get(u, ()))
        shown.update(lst[:top])
        if targets[u] in lst:
            rank = lst.index(targets[u]) + 1
            out["MRR"] += 1.0 / rank
            for k in cutoffs:
                if rank <= k:
                    out[f"HR@{k}"] += 1.0
                    out[f"NDCG@{k}"] += 1.0 / math.log2(rank + 1)
    n = max(len(users), 1)
    result = {name: value / n for name, value in out.items()}
    result[f"coverage@{top}"] = len(shown) / max(n_items, 1)
    return result
