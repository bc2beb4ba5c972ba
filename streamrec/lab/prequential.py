"""The prequential (test-then-train) protocol, pure: how a log is cut into a bootstrap part and
replay windows, and how the recommendations in force are scored against what users did next. The
replay itself (broker, workers, pacing) lives in replay.py."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from streamrec.datasets import LogEvent
from streamrec.ranking import hit_and_ndcg

PROTOCOL = (
    "prequential: the log in time order; the first part bootstraps the model, the rest is replayed as "
    "events through the broker and the workers, one step in flight per user (a step: the user's "
    "events at the same instant); each replayed event is scored against the recommendation in force "
    "for its user when it was sent (the one triggered by the user's previous step); events of users "
    "with no recommendation yet are counted, not scored"
)
K = 10


@dataclass(frozen=True)
class Plan:
    bootstrap: list[LogEvent]
    windows: list[list[LogEvent]]  # the replayed events, in time order, in equal-sized windows

    @property
    def replayed(self) -> list[LogEvent]:
        return [e for w in self.windows for e in w]


def plan(events: Sequence[LogEvent], bootstrap_share: float, windows: int) -> Plan:
    """Sort by (time, file order), keep the first `bootstrap_share` for the bootstrap and split the
    rest into `windows` consecutive windows of (nearly) equal size."""
    if not 0.0 < bootstrap_share < 1.0:
        raise ValueError("bootstrap_share must be between 0 and 1")
    if windows < 1:
        raise ValueError("windows must be at least 1")
    ordered = sorted(events, key=lambda e: (e.ts, e.order))
    cut = int(len(ordered) * bootstrap_share)
    rest = ordered[cut:]
    bounds = [round(len(rest) * w / windows) for w in range(windows + 1)]
    return Plan(ordered[:cut], [rest[bounds[w] : bounds[w + 1]] for w in range(windows)])


def user_steps(window: Sequence[LogEvent]) -> dict[str, list[list[int]]]:
    """Per user, the window's events (as positions in `window`) in steps: a step is a run of the
    user's consecutive events with the same time and type. Events at the same instant cannot have
    seen each other's recommendations, so a step is sent at once and all of it is scored against
    the list in force before it; one type per step keeps it on one topic, so its last event is
    certainly the trigger of the user's next recommendation."""
    steps: dict[str, list[list[int]]] = {}
    for n, e in enumerate(window):
        user = steps.setdefault(e.user_id, [])
        if user:
            prev = window[user[-1][-1]]
            if prev.ts == e.ts and prev.type == e.type:
                user[-1].append(n)
                continue
        user.append([n])
    return steps


@dataclass(frozen=True)
class Outcome:
    """One replayed event: the list in force when it was sent (None: no recommendation yet)."""

    index: int  # position in the replayed stream
    window: int
    target: str
    recommended: tuple[str, ...] | None
    adapter: str | None = None


def summarize(outcomes: Sequence[Outcome], k: int = K) -> dict[str, Any]:
    """HR@k and NDCG@k over the scored events, with how many were scored and how many had no list."""
    scored = [o for o in outcomes if o.recommended is not None]
    hits = [hit_and_ndcg(o.recommended or (), o.target, k) for o in scored]
    n = len(scored)
    return {
        f"HR@{k}": sum(h for h, _ in hits) / n if n else 0.0,
        f"NDCG@{k}": sum(g for _, g in hits) / n if n else 0.0,
        "scored": n,
        "no_recommendation": len(outcomes) - n,
    }


def by_item_age(outcomes: Sequence[Outcome], old: Collection[str], k: int = K) -> dict[str, Any]:
    """HR@k apart for events on items the bootstrap never saw (`new_items`) and on the others: how
    soon the stack learns to name what the catalog gains while it runs."""
    out: dict[str, Any] = {}
    for part, on_old in (("new_items", False), ("old_items", True)):
        mine = [o for o in outcomes if (o.target in old) is on_old]
        s = summarize(mine, k)
        out[part] = {"events": len(mine), f"HR@{k}": s[f"HR@{k}"], "scored": s["scored"]}
    return out


def report(outcomes: Sequence[Outcome], windows: int, old_items: Collection[str] | None = None) -> dict[str, Any]:
    """The run's figures: first and second half of the replayed stream, each window, and all. With
    `old_items` (the items of the bootstrap part), the second half also says how events on new items
    fared against the rest."""
    ordered = sorted(outcomes, key=lambda o: o.index)
    half = len(ordered) // 2
    second = summarize(ordered[half:])
    if old_items is not None:
        second |= by_item_age(ordered[half:], old_items)
    adapters: dict[str, int] = {}
    for o in ordered:
        if o.recommended is not None:
            name = o.adapter or "base"
            adapters[name] = adapters.get(name, 0) + 1
    return {
        "all": summarize(ordered),
        "first_half": summarize(ordered[:half]),
        "second_half": second,
        "windows": [{"window": w, **summarize([o for o in ordered if o.window == w])} for w in range(windows)],
        "served_by": adapters,
    }
