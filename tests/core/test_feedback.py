"""Feedback joins and the split for an increment, without Kafka or disk."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from streamrec.events import Event, ModelVersion, Recommendation, RecommendedItem
from streamrec.feedback import (
    FeedbackExample,
    Mark,
    PendingRecs,
    is_fresh,
    split_fresh_replay,
    user_sequences,
)
from streamrec.instructions import HistoryItem

T0 = datetime(2024, 1, 1, tzinfo=UTC)
HORIZON = 600.0
HIST = (HistoryItem("h1", "click"), HistoryItem("h2", "purchase"))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def rec(rec_id: str, seconds: float, items: list[str], trigger: str | None = None) -> Recommendation:
    return Recommendation(
        rec_id=rec_id,
        user_id="u1",
        items=[RecommendedItem(item_id=i, score=1.0 / (n + 1)) for n, i in enumerate(items)],
        model=ModelVersion(base="tiny"),
        trigger_event_id=trigger,
        event_ts=at(seconds),
        # Generated "now": the join must use event time, not this.
        generated_at=datetime(2030, 1, 1, tzinfo=UTC),
    )


def ev(eid: str, seconds: float, item: str, rec_id: str | None = None, kind: str = "click") -> Event:
    return Event(
        event_id=eid,
        user_id="u1",
        item_id=item,
        type=kind,
        ts=at(seconds),
        rec_id=rec_id,
    )


def one(pending: PendingRecs, event: Event, history: tuple[HistoryItem, ...] = HIST) -> FeedbackExample:
    _, examples = pending.on_event(event, history, HORIZON)
    assert len(examples) == 1
    return examples[0]


def example(eid: str, seconds: float, target: str = "x") -> FeedbackExample:
    return FeedbackExample(event_id=eid, user_id="u1", history=HIST, target=target, target_type="click", ts=at(seconds))


# ---- joining -------------------------------------------------------------------------------


def test_join_by_rec_id_names_the_list_even_past_the_horizon() -> None:
    pending = PendingRecs().add_recommendation(rec("r1", 0, ["a", "b", "c"]))
    pending = pending.add_recommendation(rec("r2", 10, ["d", "a"]))
    # Both lists contain "a"; the client says r1, and 2 hours is past the horizon.
    ex = one(pending, ev("e1", 7200, "a", rec_id="r1"))
    assert ex.rec_id == "r1"
    assert ex.recommended == ("a", "b", "c")
    assert ex.taken == ("a",)
    assert ex.ignored == ("b", "c")
    assert ex.target == "a" and ex.target_type == "click"
    assert ex.history == HIST
    assert ex.event_id == "e1" and ex.user_id == "u1" and ex.ts == at(7200)


def test_rec_id_that_is_not_remembered_falls_back_to_the_horizon_rule() -> None:
    pending = PendingRecs().add_recommendation(rec("r1", 0, ["a", "b"]))
    ex = one(pending, ev("e1", 30, "b", rec_id="gone"))
    assert (ex.rec_id, ex.taken) == ("r1", ("b",))


def test_rec_id_naming_a_list_without_the_item_is_a_miss_on_that_list() -> None:
    pending = PendingRecs().add_recommendation(rec("r1", 0, ["a", "b"]))
    pending = pending.add_recommendation(rec("r2", 5, ["z"]))
    ex = one(pending, ev("e1", 30, "z", rec_id="r1"))
    assert (ex.rec_id, ex.recommended, ex.taken, ex.ignored) == ("r1", ("a", "b"), (), ("a", "b"))


def test_join_by_horizon_takes_the_most_recent_list_holding_the_item() -> None:
    pending = PendingRecs()
    for r in (rec("r1", 0, ["a", "b"]), rec("r2", 100, ["b", "c"]), rec("r3", 200, ["d"])):
        pending = pending.add_recommendation(r)
    ex = one(pending, ev("e1", 300, "b"))
    assert (ex.rec_id, ex.recommended, ex.taken, ex.ignored) == ("r2", ("b", "c"), ("b",), ("c",))
    assert ex.outcome == "taken"


def test_item_not_recommended_is_a_sequential_example_against_the_latest_list() -> None:
    pending = PendingRecs().add_recommendation(rec("r1", 0, ["a"])).add_recommendation(rec("r2", 100, ["b", "c"]))
    ex = one(pending, ev("e1", 300, "q", kind="purchase"))
    assert (ex.rec_id, ex.recommended, ex.taken, ex.ignored) == ("r2", ("b", "c"), (), ("b", "c"))
    assert ex.outcome == "ignored"
    assert ex.target_item == HistoryItem("q", "purchase")


def test_horizon_boundaries() -> None:
    pending = PendingRecs().add_recommendation(rec("r1", 0, ["a"]))
    assert one(pending, ev("e1", HORIZON, "a")).taken == ("a",)  # exactly at the horizon: in force
    late = one(pending, ev("e2", HORIZON + 1, "a"))
    assert (late.rec_id, late.recommended, late.taken) == (None, (), ())
    # A list made after the event (in event time) was not in force for it.
    early = one(PendingRecs().add_recommendation(rec("r9", 100, ["a"])), ev("e3", 99, "a"))
    assert early.rec_id is None


def test_a_list_is_not_feedback_on_its_own_trigger() -> None:
    pending = PendingRecs().add_recommendation(rec("r0", 0, ["a"]))
    pending = pending.add_recommendation(rec("r1", 50, ["a", "b"], trigger="e1"))
    # e1 triggered r1 (same event time); the list in force for e1 is r0.
    assert one(pending, ev("e1", 50, "a")).rec_id == "r0"
    # Another event at the same timestamp does see r1.
    assert one(pending, ev("e2", 50, "b")).rec_id == "r1"


def test_events_with_no_recommendation_in_force() -> None:
    ex = one(PendingRecs(), ev("e1", 10, "a"))
    assert (ex.rec_id, ex.recommended, ex.taken, ex.ignored) == (None, (), (), ())
    assert ex.outcome == "none"
    assert ex.target == "a" and ex.history == HIST
    # No history and no list: nothing to learn, no example.
    pending, examples = PendingRecs().on_event(ev("e2", 10, "a"), (), HORIZON)
    assert examples == [] and pending == PendingRecs()
    # No history but a list in force (a cold-start recommendation): an example.
    cold = PendingRecs().add_recommendation(rec("r1", 0, ["a"]))
    assert one(cold, ev("e3", 5, "a"), history=()).taken == ("a",)


def test_pending_keeps_newest_in_event_time_and_ignores_redelivery() -> None:
    pending = PendingRecs()
    for n in (3, 1, 4, 0, 2):  # out of order, as from several inference workers
        pending = pending.add_recommendation(rec(f"r{n}", n * 10, ["a"]), keep=3)
    assert [r.rec_id for r in pending.recs] == ["r2", "r3", "r4"]
    assert pending.add_recommendation(rec("r4", 999, ["z"]), keep=3) is pending
    # A rec_id that fell out of memory no longer joins by name.
    assert one(pending, ev("e1", 7200, "a", rec_id="r0")).rec_id is None


def test_every_event_after_a_list_gives_one_example_and_a_list_can_be_taken_twice() -> None:
    pending = PendingRecs().add_recommendation(rec("r1", 0, ["a", "b", "c"]))
    history: tuple[HistoryItem, ...] = HIST
    taken = []
    for n, item in enumerate(["a", "x", "c"]):
        event = ev(f"e{n}", 10 + n, item)
        pending, examples = pending.on_event(event, history, HORIZON)
        assert [e.history for e in examples] == [history]
        taken += [e.taken for e in examples]
        history = (*history, HistoryItem(item, "click"))
    assert taken == [("a",), (), ("c",)]


def test_round_trips() -> None:
    pending = PendingRecs().add_recommendation(rec("r1", 0, ["a", "b"]))
    assert PendingRecs.from_bytes(pending.to_bytes()) == pending
    ex = one(pending, ev("e1", 5, "a"))
    back = FeedbackExample.from_bytes(ex.to_bytes())
    assert back == ex and isinstance(back.history[0], HistoryItem)


def test_taken_must_be_recommended() -> None:
    with pytest.raises(ValidationError):
        FeedbackExample(
            event_id="e",
            user_id="u",
            history=(),
            target="a",
            target_type="click",
            ts=T0,
            recommended=("b",),
            taken=("a",),
        )


def test_negative_horizon_is_refused() -> None:
    with pytest.raises(ValueError):
        PendingRecs().on_event(ev("e1", 0, "a"), HIST, -1)


# ---- the split ------------------------------------------------------------------------------


def newer_than(seconds: float) -> Callable[[FeedbackExample], bool]:
    return lambda e: e.ts > at(seconds)


def fresh_buffer() -> list[FeedbackExample]:
    return [example(f"e{n:02d}", n) for n in range(40)]


def test_split_holds_out_the_newest_and_trains_on_fresh_plus_replay() -> None:
    train, holdout = split_fresh_replay(fresh_buffer(), newer_than(19), 0.5, random.Random(0), holdout=10)
    assert [e.event_id for e in holdout] == [f"e{n}" for n in range(30, 40)]
    fresh = [e for e in train if e.ts > at(19)]
    replay = [e for e in train if e.ts <= at(19)]
    assert [e.event_id for e in fresh] == [f"e{n}" for n in range(20, 30)]
    assert len(replay) == 10  # share 0.5: as many old as fresh
    assert [e.ts for e in train] == sorted(e.ts for e in train)
    assert not {e.event_id for e in train} & {e.event_id for e in holdout}


def test_split_is_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    buf = fresh_buffer()

    def replayed(seed: int) -> list[str]:
        train, _ = split_fresh_replay(buf, newer_than(29), 0.5, seed, holdout=5)
        return [e.event_id for e in train if e.ts <= at(29)]

    assert replayed(1) == replayed(1)
    assert len(replayed(1)) == 5
    assert len({tuple(replayed(s)) for s in range(10)}) > 1
    a = split_fresh_replay(buf, newer_than(29), 0.5, random.Random(7), holdout=5)
    b = split_fresh_replay(buf, newer_than(29), 0.5, random.Random(7), holdout=5)
    assert a == b


def test_split_goes_by_arrival_so_a_late_example_is_trained_when_it_arrives() -> None:
    on_time = [example(f"e{n:02d}", n) for n in range(20)]
    late = example("late", 5)  # happened at 5, arrived after e19
    arrived = [*on_time, late]
    seq = {e.event_id: n + 1 for n, e in enumerate(arrived)}
    # The last increment consumed arrivals 1..15 (e00..e14): e15..e19 and the late one are fresh,
    # although the late one is older than everything trained on.
    mark = Mark(arrival=15, through=at(14))
    fresh = lambda e: is_fresh(seq[e.event_id], e, mark, None)  # noqa: E731
    train, holdout = split_fresh_replay(arrived, fresh, 0.0, 0, holdout=2)
    assert [e.event_id for e in holdout] == ["late", "e19"]  # the last arrivals, in event-time order
    assert [e.event_id for e in train] == ["e15", "e16", "e17", "e18"]
    train, holdout = split_fresh_replay(arrived, fresh, 0.0, 0, holdout=0)
    assert [e.event_id for e in train] == ["late", "e15", "e16", "e17", "e18", "e19"]
    # By event time the late example would never be fresh: that was the bug this order fixes.
    assert not is_fresh(seq["late"], late, Mark(through=at(14)), None)


def test_freshness_rules() -> None:
    e = example("e", 10)
    assert is_fresh(8, e, Mark(), None)  # nothing consumed yet
    assert is_fresh(8, e, Mark(arrival=7), None) and not is_fresh(7, e, Mark(arrival=7), None)
    # A floor (the end of a bootstrap) keeps older examples replay-only, whatever their arrival.
    assert not is_fresh(8, e, Mark(arrival=7), at(10)) and is_fresh(8, e, Mark(arrival=7), at(9))
    # A cursor written before arrival numbers: event time decides, once.
    assert is_fresh(1, e, Mark(through=at(9)), None) and not is_fresh(99, e, Mark(through=at(10)), None)


def test_split_edges() -> None:
    buf = fresh_buffer()
    # First training: everything not held out is fresh.
    train, holdout = split_fresh_replay(buf, None, 0.5, 0, holdout=10)
    assert len(train) == 30 and len(holdout) == 10
    # No replay asked for.
    train, _ = split_fresh_replay(buf, newer_than(34), 0.0, 0, holdout=0)
    assert [e.event_id for e in train] == [f"e{n}" for n in range(35, 40)]
    # More replay wanted than exists: all old examples, no more.
    train, _ = split_fresh_replay(buf, newer_than(1), 0.9, 0, holdout=0)
    assert len(train) == 40
    # A hold-out larger than the buffer takes everything; nothing is left to train on.
    train, holdout = split_fresh_replay(buf, None, 0.5, 0, holdout=100)
    assert train == [] and len(holdout) == 40
    for share in (-0.1, 1.0):
        with pytest.raises(ValueError):
            split_fresh_replay(buf, None, share, 0, holdout=1)


def test_user_sequences_are_each_users_targets_in_time_order() -> None:
    examples = [
        example("e3", 30, "c"),
        example("e1", 10, "a"),
        FeedbackExample(event_id="o1", user_id="u2", history=(), target="z", target_type="purchase", ts=at(20)),
        example("e2", 20, "b"),
        example("e0", 20, "b0"),  # same instant: event id breaks the tie, as in every split
    ]
    assert user_sequences(examples) == {
        "u1": [HistoryItem("a"), HistoryItem("b0"), HistoryItem("b"), HistoryItem("c")],
        "u2": [HistoryItem("z", "purchase")],
    }
