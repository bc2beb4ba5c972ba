"""What the feedback agent keeps per user: duplicates make no example, a late event learns from the
history before it in event time, and recommendations join by rec_id or by horizon. No Kafka, no disk."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from streamrec.events import Event, ModelVersion, Recommendation, RecommendedItem
from streamrec.feedback import FeedbackExample, FeedbackUser
from streamrec.instructions import HistoryItem

T0 = datetime(2024, 1, 1, tzinfo=UTC)
HORIZON = 600.0
LIMITS = {"max_events": 50, "dedup_window": 1000, "horizon_s": HORIZON, "history_items": 20}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ev(eid: str, seconds: float, item: str, *, rec_id: str | None = None, kind: str = "click") -> Event:
    return Event(event_id=eid, user_id="u1", item_id=item, type=kind, ts=at(seconds), rec_id=rec_id)


def rec(rec_id: str, seconds: float, items: list[str], trigger: str | None = None) -> Recommendation:
    return Recommendation(
        rec_id=rec_id,
        user_id="u1",
        items=[RecommendedItem(item_id=i, score=1.0 / (n + 1)) for n, i in enumerate(items)],
        model=ModelVersion(base="tiny"),
        trigger_event_id=trigger,
        event_ts=at(seconds),
        generated_at=datetime(2030, 1, 1, tzinfo=UTC),  # wall time: the join must not use it
    )


def feed(user: FeedbackUser, *events: Event, **limits: float) -> tuple[FeedbackUser, list[FeedbackExample]]:
    out: list[FeedbackExample] = []
    for event in events:
        user, made = user.on_event(event, **(LIMITS | limits))  # type: ignore[arg-type]
        out += made
    return user, out


def items(example: FeedbackExample) -> list[str]:
    return [h.item_id for h in example.history]


def test_the_first_event_without_a_list_makes_no_example_and_the_next_one_does() -> None:
    user, examples = feed(FeedbackUser(), ev("e1", 0, "a"))
    assert examples == []
    user, examples = feed(user, ev("e2", 10, "b", kind="purchase"))
    [ex] = examples
    assert (ex.event_id, ex.user_id, ex.target, ex.target_type, ex.ts) == ("e2", "u1", "b", "purchase", at(10))
    assert ex.history == (HistoryItem("a", "click"),)
    assert (ex.rec_id, ex.recommended, ex.taken, ex.ignored) == (None, (), (), ())
    assert [e.event_id for e in user.state.events] == ["e1", "e2"]


def test_duplicates_make_no_example_even_after_a_restore_from_bytes() -> None:
    user, first = feed(FeedbackUser(), ev("e1", 0, "a"), ev("e2", 10, "b"), ev("e3", 20, "c"))
    assert [e.event_id for e in first] == ["e2", "e3"]
    # The same event again, with the same or a different payload: nothing changes.
    again, examples = user.on_event(ev("e2", 10, "b"), **LIMITS)  # type: ignore[arg-type]
    assert examples == [] and again is user
    _, examples = feed(user, ev("e3", 99, "zzz"))
    assert examples == []
    # A redelivery after a crash: the table value comes back from bytes and remembers what it saw.
    restored = FeedbackUser.from_bytes(user.to_bytes())
    assert restored == user
    restored, examples = feed(restored, ev("e1", 0, "a"), ev("e2", 10, "b"), ev("e3", 20, "c"), ev("e4", 30, "d"))
    assert [e.event_id for e in examples] == ["e4"]
    assert items(examples[0]) == ["a", "b", "c"]


def test_a_late_event_gets_the_history_that_precedes_it_in_event_time() -> None:
    user, _ = feed(FeedbackUser(), ev("e10", 10, "a"), ev("e20", 20, "b"), ev("e40", 40, "d"))
    user, [late] = feed(user, ev("e30", 30, "c"))
    assert items(late) == ["a", "b"]  # not "d": it happened after
    user, [ex] = feed(user, ev("e50", 50, "e"))
    assert items(ex) == ["a", "b", "c", "d"]  # the late event sits where it belongs
    # Earlier than everything seen, with no list in force: nothing precedes it, so no example.
    user, examples = feed(user, ev("e05", 5, "z"))
    assert examples == []
    # Equal timestamps are ordered by event id, like the history itself.
    _, [tie] = feed(user, ev("e20a", 20, "t"))
    assert items(tie) == ["z", "a", "b"]


def test_the_history_is_the_newest_history_items_before_the_event() -> None:
    events = [ev(f"e{n:02d}", n, f"i{n}") for n in range(12)]
    _, examples = feed(FeedbackUser(), *events, history_items=4)
    assert items(examples[-1]) == ["i7", "i8", "i9", "i10"]
    assert items(examples[0]) == ["i0"]
    # The kept history is bounded too: an event older than all of it learns from what is left.
    user, _ = feed(FeedbackUser(), *events, max_events=5)
    _, [ex] = feed(user, ev("x", 8.5, "late"))
    assert items(ex) == ["i7", "i8"]


def test_rec_id_join_names_the_list_even_past_the_horizon() -> None:
    user, _ = feed(FeedbackUser(), ev("e1", 0, "h"))
    user = user.on_recommendation(rec("r1", 0, ["a", "b", "c"], trigger="e1"))
    user = user.on_recommendation(rec("r2", 100, ["b", "d"]))
    user, [ex] = feed(user, ev("e2", 100 + 3 * HORIZON, "b", rec_id="r1"))
    assert (ex.rec_id, ex.recommended, ex.taken, ex.ignored) == ("r1", ("a", "b", "c"), ("b",), ("a", "c"))
    # An unknown rec_id falls back to the horizon rule: nothing in force that late.
    _, [ex] = feed(user, ev("e3", 100 + 3 * HORIZON, "b", rec_id="nope"))
    assert (ex.rec_id, ex.recommended, ex.taken) == (None, (), ())


def test_horizon_join_takes_the_newest_list_with_the_item_else_the_newest_list() -> None:
    user, _ = feed(FeedbackUser(), ev("e1", 0, "h"))
    for r in (rec("r1", 0, ["a", "b"]), rec("r2", 50, ["b", "c"]), rec("r3", 100, ["d", "e"])):
        user = user.on_recommendation(r)
    user, [taken] = feed(user, ev("e2", 200, "b"))
    assert (taken.rec_id, taken.taken, taken.ignored) == ("r2", ("b",), ("c",))
    user, [ignored] = feed(user, ev("e3", 210, "x"))
    assert (ignored.rec_id, ignored.recommended, ignored.taken, ignored.ignored) == ("r3", ("d", "e"), (), ("d", "e"))
    # Past the horizon of every list: no list in force, still a sequential example.
    _, [late] = feed(user, ev("e4", 100 + HORIZON + 1, "d"))
    assert (late.rec_id, late.recommended, late.taken) == (None, (), ())
    assert items(late) == ["h", "b", "x"]


def test_a_list_is_not_feedback_on_the_event_that_triggered_it() -> None:
    user, _ = feed(FeedbackUser(), ev("e1", 0, "h"))
    # Replayed after a restart, the recommendation for e2 can be read before e2 itself.
    user = user.on_recommendation(rec("r2", 10, ["a"], trigger="e2"))
    user, [ex] = feed(user, ev("e2", 10, "a"))
    assert (ex.rec_id, ex.taken) == (None, ())
    _, [nxt] = feed(user, ev("e3", 20, "a"))
    assert (nxt.rec_id, nxt.taken) == ("r2", ("a",))


def test_a_cold_start_list_makes_an_example_without_history() -> None:
    user = FeedbackUser().on_recommendation(rec("r0", 0, ["a", "b"]))
    _, [ex] = feed(user, ev("e1", 5, "b"))
    assert ex.history == () and (ex.rec_id, ex.taken, ex.ignored) == ("r0", ("b",), ("a",))


def test_recommendations_are_remembered_once_and_only_the_newest_keep() -> None:
    user = FeedbackUser().on_recommendation(rec("r1", 0, ["a"]))
    assert user.on_recommendation(rec("r1", 0, ["a"])) is user  # redelivered
    for n in range(2, 6):
        user = user.on_recommendation(rec(f"r{n}", n, ["a"]), keep=3)
    assert [r.rec_id for r in user.pending.recs] == ["r3", "r4", "r5"]
    assert user.state == FeedbackUser().state  # recommendations do not touch the history
    assert FeedbackUser.from_bytes(user.to_bytes()) == user


def test_a_shuffled_stream_with_duplicates_gives_one_example_per_event_with_something_before_it() -> None:
    """500 events arriving out of event-time order, a fifth of them twice: every distinct event that
    has an earlier (in event time) event already seen makes exactly one example, whose history is
    those events in event-time order."""
    rng = random.Random(11)
    events = [ev(f"e{n:03d}", rng.randrange(10_000), f"i{rng.randrange(40)}") for n in range(500)]
    arrivals = events + rng.sample(events, 100)
    rng.shuffle(arrivals)
    user = FeedbackUser()
    seen: list[Event] = []
    made: list[FeedbackExample] = []
    for event in arrivals:
        user, examples = user.on_event(event, max_events=1000, dedup_window=1000, horizon_s=HORIZON, history_items=15)
        if event in seen:
            assert examples == []
            continue
        key = (event.ts, event.event_id)
        before = sorted((e for e in seen if (e.ts, e.event_id) < key), key=lambda e: (e.ts, e.event_id))
        seen.append(event)
        if not before:
            assert examples == []
            continue
        [ex] = examples
        assert items(ex) == [e.item_id for e in before][-15:]
        made.append(ex)
    assert len({e.event_id for e in made}) == len(made) > 450
    assert len(seen) == 500
