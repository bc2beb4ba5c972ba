"""Ranking metrics (HR@k, NDCG@k, MRR@k, coverage@k), the one copy the offline evaluation, the
training loop's validation, the gate and the prequential replay all use. Pure values in, numbers
out: any recommender that produces ranked lists can be scored the same way."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

PROTOCOL = (
    "leave-one-out per user in time order (last = test, second last = validation, rest = train); "
    "full ranking over the catalog; items already in the user's history excluded; "
    "MRR over the top-10 list"
)
CUTOFFS = (5, 10)


def rank_within(ranked: Sequence[str], target: str, k: int) -> int | None:
    """The target's rank (1 = first) within the top `k` of `ranked`; None when it is not there."""
    top = list(ranked[:k])
    return top.index(target) + 1 if target in top else None


def gain(rank: int | None, k: int) -> float:
    """NDCG@k of one list with one relevant item at `rank`: 1/log2(rank + 1) within k, else 0 (the
    ideal list has it first, so there is nothing to divide by)."""
    return 1.0 / math.log2(rank + 1) if rank is not None and rank <= k else 0.0


def hit_and_ndcg(ranked: Sequence[str], target: str, k: int = 10) -> tuple[float, float]:
    """HR@k and NDCG@k of one list against the one item the user chose."""
    rank = rank_within(ranked, target, k)
    return (0.0, 0.0) if rank is None else (1.0, gain(rank, k))


def rank_metrics(
    ranked: Mapping[str, Sequence[str]],
    targets: Mapping[str, str],
    n_items: int,
    cutoffs: Sequence[int] = CUTOFFS,
) -> dict[str, float]:
    """Means over the users of `targets`: HR@k and NDCG@k for each cutoff, MRR@max(k) under the key
    `MRR` (1/rank within the top max(k), 0 when absent), and coverage@max(k): the share of the
    `n_items` catalog that appears in at least one user's top list. A user without a list counts
    as a miss."""
    users = list(targets)
    top = max(cutoffs)
    out: dict[str, float] = {f"HR@{k}": 0.0 for k in cutoffs} | {f"NDCG@{k}": 0.0 for k in cutoffs}
    # MRR@max(k) keeps the key "MRR" that every report and figure has used; PROTOCOL names the list.
    out["MRR"] = 0.0
    shown: set[str] = set()
    for u in users:
        lst = list(ranked.get(u, ()))
        shown.update(lst[:top])
        rank = rank_within(lst, targets[u], top)
        if rank is None:
            continue
        out["MRR"] += 1.0 / rank
        for k in cutoffs:
            if rank <= k:
                out[f"HR@{k}"] += 1.0
                out[f"NDCG@{k}"] += gain(rank, k)
    n = max(len(users), 1)
    result = {name: value / n for name, value in out.items()}
    result[f"coverage@{top}"] = len(shown) / max(n_items, 1)
    return result
