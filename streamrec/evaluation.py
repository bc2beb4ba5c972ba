"""The offline protocol: leave-one-out per user in time order (last interaction = test, second last =
validation, the rest = train) and ranking metrics (HR@k, NDCG@k, MRR, coverage@k). Pure values in,
numbers out: any recommender that produces ranked lists can be scored the same way."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from streamrec.datasets import LogEvent
from streamrec.instructions import HistoryItem

PROTOCOL = (
    "leave-one-out per user in time order (last = test, second last = validation, rest = train); "
    "full ranking over the catalog; items already in the user's history excluded; "
    "MRR over the top-10 list"
)
CUTOFFS = (5, 10)


def sequences(events: Iterable[LogEvent]) -> dict[str, list[HistoryItem]]:
    """Each user's history in time order; equal timestamps keep the file order."""
    by_user: dict[str, list[LogEvent]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    return {
        u: [HistoryItem(e.item_id, e.type) for e in sorted(evs, key=lambda e: (e.ts, e.order))]
        for u, evs in by_user.items()
    }


@dataclass(frozen=True)
class Split:
    """train: every user's history except the held-out items; valid/test: the held-out item of
    each user with at least three interactions (shorter users only train)."""

    train: dict[str, list[HistoryItem]]
    valid: dict[str, HistoryItem]
    test: dict[str, HistoryItem]

    def history(self, user: str, stage: str) -> list[HistoryItem]:
        """What the model sees before predicting `stage` ('valid' or 'test') for `user`."""
        if stage == "valid":
            return self.train[user]
        if stage == "test":
            return [*self.train[user], self.valid[user]]
        raise ValueError(f"stage must be 'valid' or 'test', not {stage!r}")

    def targets(self, stage: str) -> dict[str, str]:
        held = self.valid if stage == "valid" else self.test
        return {u: h.item_id for u, h in held.items()}


def leave_one_out(events: Iterable[LogEvent]) -> Split:
    train: dict[str, list[HistoryItem]] = {}
    valid: dict[str, HistoryItem] = {}
    test: dict[str, HistoryItem] = {}
    for user, seq in sequences(events).items():
        if len(seq) >= 3:
            train[user], valid[user], test[user] = seq[:-2], seq[-2], seq[-1]
        else:
            train[user] = seq
    return Split(train=train, valid=valid, test=test)


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
