"""The evaluation gate: whether a candidate adapter may replace the one in service, judged on the same
held-out recent feedback. Pure: metrics in, a decision out; the trainer logs and counts refusals."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamrec.feedback import FeedbackExample
from streamrec.ranking import rank_metrics

GATED_METRICS = ("HR@10", "NDCG@10")
# Metrics are means over a few hundred examples, so 0.4 - 0.3 must not read as a drop beyond 0.1.
_EPS = 1e-9


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reason: str
    candidate: dict[str, float] = field(default_factory=dict)
    current: dict[str, float] = field(default_factory=dict)
    n_examples: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record for logs and the registry."""
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "candidate": dict(self.candidate),
            "current": dict(self.current),
            "n_examples": self.n_examples,
        }


def decide(
    candidate: Mapping[str, float],
    current: Mapping[str, float],
    tolerance: float,
    min_examples: int,
    n_examples: int,
    metrics: Sequence[str] = GATED_METRICS,
) -> GateDecision:
    """Accept the candidate unless one of these holds (checked in this order):
    - fewer than `min_examples` held-out examples: too little evidence either way;
    - a gated metric of the candidate is missing or not a finite number;
    - for some gated metric, candidate < current - tolerance: an ABSOLUTE drop of more than
      `tolerance` (0.02 = two points of HR@10). Absolute, because a relative rule lets nothing drop
      when the current value is near 0 and its noise on a small hold-out is absolute anyway.
      A drop of exactly `tolerance` is accepted.
    A metric that `current` lacks has no baseline and is not compared: with nothing in service,
    pass the base model's metrics, or {} to accept on evidence size alone."""
    if tolerance < 0:
        raise ValueError("tolerance must not be negative")
    cand, curr = dict(candidate), dict(current)

    def refuse(reason: str) -> GateDecision:
        return GateDecision(False, reason, cand, curr, n_examples)

    if n_examples < min_examples:
        return refuse(f"too few held-out examples: {n_examples} < {min_examples}")
    for name in metrics:
        value = cand.get(name)
        if value is None or not math.isfinite(value):
            return refuse(f"candidate {name} is missing or not finite: {value!r}")
    drops: list[str] = []
    for name in metrics:
        base = curr.get(name)
        if base is None:
            continue
        if not math.isfinite(base):
            return refuse(f"current {name} is not finite: {base!r}")
        if cand[name] < base - tolerance - _EPS:
            drops.append(f"{name} {cand[name]:.4f} < {base:.4f} - {tolerance:g}")
    if drops:
        return refuse("worse than the adapter in service: " + "; ".join(drops))
    summary = ", ".join(f"{n} {cand[n]:.4f}" + (f" (current {curr[n]:.4f})" if n in curr else "") for n in metrics)
    reason = f"within tolerance {tolerance:g} on {n_examples} examples: {summary}"
    return GateDecision(True, reason, cand, curr, n_examples)


def holdout_metrics(
    ranked: Mapping[str, Sequence[str]], holdout: Sequence[FeedbackExample], n_items: int
) -> dict[str, float]:
    """HR/NDCG@5/10, MRR@10 and coverage of one model on the held-out examples. `ranked` maps each
    example's event_id to the model's list for that example's history; the target is the item the
    user chose next. Score the candidate and the adapter in service on the same `holdout`."""
    return rank_metrics(ranked, {e.event_id: e.target for e in holdout}, n_items)
