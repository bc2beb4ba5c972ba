"""The rolling-history rules, without Kafka or disk."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

from streamrec.events import Event, HistoryUpdate
from streamrec.history import UserState, apply_batch, apply_event, encode_events, history_update, history_update_json

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
    assert state is not None and state.seen == UserState(seen=("e2", "e3", "e4", "e5")).seen
    assert apply_event(state, ev(0), max_events=10, dedup_window=4).accepted


def test_event_older_than_a_full_history_is_accepted_but_changes_nothing() -> None:
    state = apply_batch(None, [ev(i) for i in range(10, 13)], max_events=3, dedup_window=10).state
    old = apply_event(state, ev(1), max_events=3, dedup_window=10)
    assert (old.accepted, old.changed) == (True, False)
    assert ids(old.state) == ids(state) and old.state.remembers("e1")


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


def test_a_value_stored_as_json_by_an_older_version_still_loads_and_dedups() -> None:
    state = apply_batch(None, [ev(i) for i in range(8)], max_events=5, dedup_window=100).state
    # The version 1 value: the model's JSON with the ids themselves in the dedup memory.
    v1 = json.dumps(
        {"events": [e.model_dump(mode="json") for e in state.events], "seen": [f"e{i}" for i in range(8)]}
    ).encode()
    old = UserState.from_bytes(v1)
    assert old == state and UserState.from_bytes(old.to_bytes()) == state
    assert not apply_event(old, ev(0), max_events=5, dedup_window=100).accepted  # it left the history


def test_the_stored_value_is_compact_with_a_full_dedup_memory() -> None:
    events = [ev(i, eid=f"event-{i:06d}-{'x' * 24}") for i in range(1000)]
    state = apply_batch(None, events, max_events=50, dedup_window=1000).state
    v1 = json.dumps(
        {"events": [e.model_dump(mode="json") for e in state.events], "seen": [e.event_id for e in events]}
    ).encode()
    assert len(state.to_bytes()) < 15_000 and len(v1) > 3 * 15_000
    assert all(state.remembers(e.event_id) for e in events) and not state.remembers("event-x")


def test_the_spliced_history_update_is_the_contract_s_json() -> None:
    state = apply_batch(
        None, [ev(i, kind="purchase" if i % 2 else "click") for i in range(4)], max_events=5, dedup_window=9
    ).state
    for appended in (None, T0 + timedelta(seconds=9)):
        spliced = history_update_json(encode_events(state.events), state.events[-1], appended)
        assert HistoryUpdate.model_validate_json(spliced) == history_update(state, state.events[-1], appended)
