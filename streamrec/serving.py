"""What a served recommendation list is, given the model's list and trending items. Pure.

Rules every list obeys whatever the model did: only available catalog items, never an item the user
bought, each item once, at most k. Cold start: a user with little history gets trending items,
blended toward the model's list as the history grows."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from streamrec.catalog import ScoredItem


@dataclass(frozen=True, slots=True)
class Served:
    item_id: str
    score: float
    reason: str  # "model", "trending" or "model+trending"


def model_weight(history_len: int, full_at: int) -> float:
    """How much the model's list counts: 0 with no history, 1 from `full_at` events on."""
    if full_at <= 0:
        return 1.0
    return min(1.0, history_len / full_at)


def _probabilities(scores: Mapping[str, float], log: bool) -> dict[str, float]:
    if not scores:
        return {}
    if log:
        top = max(scores.values())
        weights = {i: math.exp(s - top) for i, s in scores.items() if math.isfinite(s)}
    else:
        weights = {i: max(0.0, s) for i, s in scores.items()}
    total = sum(weights.values())
    return {i: w / total for i, w in weights.items()} if total > 0 else {}


def serve_list(
    model_items: Sequence[ScoredItem],
    trending: Mapping[str, float],
    *,
    history_len: int,
    full_at: int,
    k: int,
    available: Collection[str],
    exclude: Collection[str],
) -> list[Served]:
    """Blend the model's list (log-probability scores) with trending counts by `model_weight`, then
    apply the business rules. Scores are the blended probabilities, best first."""
    w = model_weight(history_len, full_at)
    p_model = _probabilities({s.item_id: s.score for s in model_items}, log=True) if w > 0 else {}
    p_trend = _probabilities(dict(trending), log=False) if w < 1 else {}
    scores: dict[str, float] = {}
    reasons: dict[str, set[str]] = {}
    for source, probs, weight in (("model", p_model, w), ("trending", p_trend, 1.0 - w)):
        for item, p in probs.items():
            if item in exclude or item not in available:
                continue
            scores[item] = scores.get(item, 0.0) + weight * p
            reasons.setdefault(item, set()).add(source)
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [Served(item, score, "+".join(sorted(reasons[item]))) for item, score in ranked]
