"""What a served recommendation list is, given the model's list and trending items; which task asks
the model; and why each item is there. Pure.

Rules every list obeys whatever the model did: only available catalog items, never an item the user
bought, each item once, at most k. Cold start: a user with little history is asked with the
cold-start instruction (items as text), blended with trending items, and the model's list counts
more as the history grows."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streamrec.catalog import ScoredItem
from streamrec.events import Event, EventType, HistoryUpdate
from streamrec.instructions import HistoryItem

if TYPE_CHECKING:
    from streamrec.model.blend import Support

COLD_START = "cold_start"
TRENDING_NOW = "trending now"


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


class TrendingProbs(dict[str, float]):
    """Trending counts prepared once for a whole batch: their probabilities and the items ranked by
    them (ties by id). Still the Mapping of counts, so it passes wherever counts do; `serve_list`
    then reads the prepared form instead of redoing it for each user (hundreds of items each)."""

    def __init__(self, counts: Mapping[str, float]) -> None:
        super().__init__(counts)
        self.probs = _probabilities(self, log=False)
        self.ranked = sorted(self.probs, key=lambda i: (-self.probs[i], i))


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
    apply the business rules. Scores are the blended probabilities, best first. `trending` may be
    a TrendingProbs (prepared once per batch)."""
    w = model_weight(history_len, full_at)
    p_model = _probabilities({s.item_id: s.score for s in model_items}, log=True) if w > 0 else {}
    scores: dict[str, float] = {}
    reasons: dict[str, str] = {}
    for item, p in p_model.items():
        if item in exclude or item not in available:
            continue
        scores[item], reasons[item] = w * p, "model"
    if w < 1:
        prepared = trending if isinstance(trending, TrendingProbs) else TrendingProbs(trending)
        for item in list(scores):  # the trending share of the model's items (all scores holds yet)
            if item in prepared.probs:
                scores[item], reasons[item] = scores[item] + (1.0 - w) * prepared.probs[item], "model+trending"
        # Items trending alone scores are (1 - w) * p, ranked as trending ranks them: the first k
        # that qualify are all that can make the list.
        taken = 0
        for item in prepared.ranked:
            if taken == k:
                break
            if item in scores or item in exclude or item not in available:
                continue
            scores[item], reasons[item] = (1.0 - w) * prepared.probs[item], "trending"
            taken += 1
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [Served(item, score, reasons[item]) for item, score in ranked]


def trigger_type(update: HistoryUpdate) -> EventType | None:
    """The type of the event that triggered `update`: the newest event when the trigger is no longer
    in the history (a history keeps the newest events by event time, and a late one may be cut)."""
    found: Event | None = next((e for e in update.events if e.event_id == update.trigger_event_id), None)
    if found is None and update.events:
        found = max(update.events, key=lambda e: e.ts)
    return found.type if found is not None else None


def serving_task(
    history_len: int,
    trigger: EventType | None,
    *,
    full_at: int,
    cold_start: bool,
    purchase_task: str,
    default: str,
) -> str:
    """The instruction task one user is asked with: cold start while the trending blend still counts
    (fewer than `full_at` events, when `cold_start` is on), `purchase_task` after a purchase, else
    `default`."""
    if cold_start and model_weight(history_len, full_at) < 1.0:
        return COLD_START
    return purchase_task if trigger == EventType.PURCHASE else default


@dataclass(frozen=True, slots=True)
class Explanation:
    text: str
    by: str  # "knn", "markov" or "recent" (see Support), or "trending"
    item_id: str | None  # the history item named; None for trending items


def explain(
    served: Served, support: Support | None, history: Sequence[HistoryItem], titles: Mapping[str, str]
) -> Explanation | None:
    """Why `served` is in the list, for a person: the history item that supports it ("because you
    bought ..." when the user bought it, else "because you clicked ..."), "trending now" for an item
    only trending placed, None when there is nothing to say (no history, no support)."""
    if served.reason == "trending":
        return Explanation(TRENDING_NOW, "trending", None)
    if support is None:
        return None
    bought = any(h.item_id == support.item_id and h.type == EventType.PURCHASE.value for h in history)
    verb = "bought" if bought else "clicked"
    title = titles.get(support.item_id, support.item_id)
    return Explanation(f'because you {verb} "{title}"', support.by, support.item_id)
