"""The rolling-history rules, without Kafka or disk."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from streamrec.events import Event
from streamrec.history import UserState, apply_batch, apply_event

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def ev(i: int, seconds: int | None = None, eid: str | None = None, kind: str = "click") -> Event:
    return Event(
        event_id=eid or f"e{i}",
        user_id="u1",
        item_id=f"i{i}",
        type=kind,  # type: ignore[arg-type]
        ts=T0 + timedelta(seconds=i if seconds is None else seconds),
    )


def ids(state: UserState) -> list[str]:
    return [e.event_id for e in state.events]


def test_keeps_newest_events_oldest_first() -> None:
    state = None
    for i in range(8):
        state = apply_event(state, ev(i), max_events=5, dedup_window=100).state
    assert state is not None
    assert ids(state) == ["e3", "e4", "e5", "e6", "e7"]


def test_late_event_is_placed_by_event_time_and_ties_by_event_id() -> None:
    state = apply_batch(
        None,
        [ev(10, eid="b"), ev(30, eid="d"), ev(20, eid="c2"), ev(20, eid="c1")],
        max_events=10,
        dedup_window=10,
    ).state
    assert ids(state) == ["b", "c1", "c2", "d"]


def test_duplicate_is_dropped_and_input_untouched() -> None:
    first = apply_event(None, ev(1), max_events=5, dedup_window=10)
    again = apply_event(first.state, ev(1), max_events=5, dedup_window=10)
    assert (again.accepted, again.changed) == (False, False)
    assert again.state is first.state
    # A duplicate with other fields (a re-send after a producer retry) is still the same event.
    assert not apply_event(first.state, ev(99, eid="e1"), max_events=5, dedup_window=10).accepted


def test_duplicate_of_an_event_that_left_the_history_is_still_recognised() -> None:
    state = None
    for i in range(20):
        state = apply_event(state, ev(i), max_events=3, dedup_window=50).state
    assert state is not None and "e0" not in ids(state)
    assert not apply_event(state, ev(0), max_events=3, dedup_window=50).accepted


def test_dedup_window_forgets_the_oldest_ids() -> None:
    state = None
    for i in range(6):
        state = apply_event(state, ev(i), max_events=10, dedup_window=4).state
    assert state is not None and state.seen == ("e2", "e3", "e4", "e5")
    assert apply_event(state, ev(0), max_events=10, dedup_window=4).accepted


def test_event_older_than_a_full_history_is_accepted_but_changes_nothing() -> None:
    state = apply_batch(None, [ev(i) for i in range(10, 13)], max_events=3, dedup_window=10).state
    old = apply_event(state, ev(1), max_events=3, dedup_window=10)
    assert (old.accepted, old.changed) == (True, False)
    assert ids(old.state) == ids(state) and "e1" in old.state.seen


def test_any_arrival_order_gives_the_same_history() -> None:
    events = [ev(i, seconds=random.Random(i).randint(0, 50)) for i in range(200)]
    expected = sorted(events, key=lambda e: (e.ts, e.event_id))[-20:]
    for seed in range(5):
        shuffled = events + events[:30]  # with duplicates
        random.Random(seed).shuffle(shuffled)
        state, accepted, _, _ = apply_batch(None, shuffled, max_events=20, dedup_window=1000)
        assert list(state.events) == expected
        assert len(accepted) == 200


def test_state_round_trips_through_bytes() -> None:
    state = apply_batch(
        None, [ev(i, kind="purchase" if i % 3 else "click") for i in range(7)], max_events=5, dedup_window=6
    ).state
    assert UserState.from_bytes(state.to_bytes()) == state
