"""Business rules and the cold-start blend, the task each user is asked with, and decayed trending counts."""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from streamrec.catalog import ScoredItem
from streamrec.events import Event, EventType, HistoryUpdate, TrendingSnapshot
from streamrec.serving import Served, TrendingProbs, model_weight, serve_list, serving_task, trigger_type
from streamrec.trending import Trending, TrendingReader, merge_snapshots

AVAILABLE = {f"i{n}" for n in range(10)}


def test_new_user_gets_trending_only() -> None:
    out = serve_list(
        [ScoredItem("i1", -0.1)],
        {"i5": 10.0, "i6": 5.0},
        history_len=0,
        full_at=5,
        k=3,
        available=AVAILABLE,
        exclude=set(),
    )
    assert [s.item_id for s in out] == ["i5", "i6"]
    assert {s.reason for s in out} == {"trending"}
    assert out[0].score == pytest.approx(10 / 15)


def test_established_user_gets_the_model_list() -> None:
    model = [ScoredItem("i1", math.log(0.5)), ScoredItem("i2", math.log(0.25))]
    out = serve_list(model, {"i5": 10.0}, history_len=9, full_at=5, k=3, available=AVAILABLE, exclude=set())
    assert [s.item_id for s in out] == ["i1", "i2"]
    assert out[0].score == pytest.approx(2 / 3)  # renormalised over the list


def test_blend_in_between_and_reasons() -> None:
    model = [ScoredItem("i1", 0.0), ScoredItem("i5", 0.0)]
    out = serve_list(model, {"i5": 1.0, "i7": 1.0}, history_len=2, full_at=4, k=5, available=AVAILABLE, exclude=set())
    by_id = {s.item_id: s for s in out}
    assert by_id["i5"].reason == "model+trending" and by_id["i5"].score == pytest.approx(0.5)
    assert by_id["i1"].score == pytest.approx(0.25) and by_id["i7"].score == pytest.approx(0.25)
    assert out[0].item_id == "i5"


def test_rules_hold_whatever_the_inputs() -> None:
    model = [ScoredItem("i1", 0.0), ScoredItem("gone", 0.0), ScoredItem("i2", -1.0), ScoredItem("i1", -2.0)]
    out = serve_list(
        model,
        {"i2": 3.0, "nope": 9.0, "i3": 1.0},
        history_len=1,
        full_at=2,
        k=2,
        available=AVAILABLE,
        exclude={"i2"},
    )
    ids = [s.item_id for s in out]
    assert len(ids) == len(set(ids)) <= 2
    assert not {"gone", "nope", "i2"} & set(ids)


def test_model_weight() -> None:
    assert [model_weight(n, 4) for n in (0, 1, 4, 40)] == [0.0, 0.25, 1.0, 1.0]
    assert model_weight(0, 0) == 1.0


def test_trending_decays_in_event_time() -> None:
    t = Trending(half_life_s=100.0)
    t.add("old", ts=1000.0, weight=8.0)
    t.add("new", ts=1300.0, weight=2.0)  # three half-lives later: "old" is worth 1 now
    snap = t.snapshot(5)
    assert snap["old"] == pytest.approx(1.0) and snap["new"] == pytest.approx(2.0)
    assert list(t.snapshot(1)) == ["new"]


def test_trending_survives_long_streams() -> None:
    t = Trending(half_life_s=1.0)
    for step in range(5000):
        t.add("a", ts=float(step))
    assert t.snapshot(1)["a"] == pytest.approx(2.0, rel=1e-3)  # geometric series 1 + 1/2 + ...


def test_trending_takes_any_leap_in_event_time() -> None:
    # 2100 after 2024 is ~670,000 half-lives of an hour: 2 ** that overflows a float.
    t = Trending(half_life_s=3600.0)
    t.add("now", ts=1_714_550_400.0)
    t.add("far", ts=4_102_444_800.0)
    t.add("past", ts=-62_135_596_800.0)  # the year 1, long before the reference
    snap = t.snapshot(3)
    assert snap["far"] == pytest.approx(1.0) and snap.get("past", 0.0) == 0.0
    t.add("now", ts=1_714_550_400.0 + 44 * 86_400.0)  # 44 days back the other way: older events only shrink
    assert t.snapshot(1) == {"far": pytest.approx(1.0)}


def test_merge_adds_partitions() -> None:
    assert merge_snapshots([{"a": 1.0, "b": 2.0}, {"a": 3.0}]) == {"a": 4.0, "b": 2.0}


def _update(types: list[str], trigger: int | None = -1) -> HistoryUpdate:
    t0 = datetime(2024, 6, 1, tzinfo=UTC)
    events = [
        Event(event_id=f"e{n}", user_id="u", item_id=f"i{n}", type=kind, ts=t0 + timedelta(seconds=n))
        for n, kind in enumerate(types)
    ]
    trigger_id = events[trigger].event_id if trigger is not None else "cut-from-the-history"
    return HistoryUpdate(user_id="u", events=events, trigger_event_id=trigger_id, event_ts=t0)


def test_the_trigger_type_is_the_trigger_events_or_the_newest() -> None:
    assert trigger_type(_update(["click", "purchase"])) == EventType.PURCHASE
    assert trigger_type(_update(["click", "purchase"], trigger=0)) == EventType.CLICK
    assert trigger_type(_update(["purchase", "click"], trigger=None)) == EventType.CLICK


def test_the_task_follows_the_users_state() -> None:
    def task(history_len: int, trigger: EventType, cold_start: bool = True, full_at: int = 5) -> str:
        return serving_task(
            history_len,
            trigger,
            full_at=full_at,
            cold_start=cold_start,
            purchase_task="next_purchase",
            default="next_click",
        )

    # Cold start while the trending blend still counts, whatever the trigger.
    assert task(1, EventType.CLICK) == task(4, EventType.PURCHASE) == "cold_start"
    assert task(5, EventType.PURCHASE) == "next_purchase" and task(5, EventType.CLICK) == "next_click"
    assert task(1, EventType.PURCHASE, cold_start=False) == "next_purchase"
    assert task(1, EventType.CLICK, full_at=0) == "next_click"  # no cold start at all
    assert serving_task(9, None, full_at=5, cold_start=True, purchase_task="cold_start", default="x") == "x"


def _serve_list_per_user(
    model_items: Sequence[ScoredItem],
    trending: Mapping[str, float],
    *,
    history_len: int,
    full_at: int,
    k: int,
    available: Collection[str],
    exclude: Collection[str],
) -> list[Served]:
    """The rules as written before TrendingProbs, every trending item scored for every user: the
    reference the prepared form must match exactly."""

    def probabilities(scores: dict[str, float], log: bool) -> dict[str, float]:
        if not scores:
            return {}
        if log:
            top = max(scores.values())
            weights = {i: math.exp(s - top) for i, s in scores.items() if math.isfinite(s)}
        else:
            weights = {i: max(0.0, s) for i, s in scores.items()}
        total = sum(weights.values())
        return {i: x / total for i, x in weights.items()} if total > 0 else {}

    w = model_weight(history_len, full_at)
    p_model = probabilities({s.item_id: s.score for s in model_items}, log=True) if w > 0 else {}
    p_trend = probabilities(dict(trending), log=False) if w < 1 else {}
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


def test_trending_prepared_once_per_batch_serves_exactly_the_per_user_lists() -> None:
    rng = random.Random(3)
    items = [f"i{n}" for n in range(60)]
    for _ in range(400):
        # Ties on purpose: counts and scores from a few values.
        trending = {i: float(rng.choice([0, 1, 2, 2, 5])) for i in rng.sample(items, rng.randint(0, 40))}
        model = [
            ScoredItem(i, rng.choice([-1.0, -2.0, -2.0, float("-inf")])) for i in rng.sample(items, rng.randint(0, 12))
        ]
        rules: dict[str, Any] = {
            "history_len": rng.randint(0, 6),
            "full_at": rng.choice([0, 4, 5]),
            "k": rng.randint(1, 12),
            "available": set(rng.sample(items, 50)),
            "exclude": set(rng.sample(items, rng.randint(0, 10))),
        }
        expected = _serve_list_per_user(model, trending, **rules)
        assert serve_list(model, TrendingProbs(trending), **rules) == expected
        assert serve_list(model, trending, **rules) == expected


def test_trending_is_prepared_again_only_when_a_snapshot_changes() -> None:
    def snapshot(partition: int, items: dict[str, float]) -> bytes:
        as_of = datetime(2024, 1, 1, tzinfo=UTC)
        return TrendingSnapshot(partition=partition, items=items, as_of=as_of).model_dump_json().encode()

    reader = TrendingReader()
    mirror = {b"0": snapshot(0, {"i1": 2.0}), b"1": snapshot(1, {"i1": 1.0, "i2": 1.0})}
    first = reader.read(mirror)
    assert dict(first) == {"i1": 3.0, "i2": 1.0} and first.ranked == ["i1", "i2"]
    assert reader.read(dict(mirror)) is first
    mirror[b"1"] = snapshot(1, {"i2": 5.0})
    assert reader.read(mirror).ranked == ["i2", "i1"]
