"""What the ingest agent decides through the core: the event a message carries (contract, key,
time range), a damaged stored history, one user's batch with its failures, and the history update
with its trigger. No Kafka, no disk."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from streamrec import history
from streamrec.errors import InvalidMessage, StateError
from streamrec.events import Event, utcnow
from streamrec.history import UserState, apply_batch, decode_event, history_update, stored_state
from streamrec.settings import ContractSettings

LIMITS = ContractSettings()
T0 = utcnow() - timedelta(hours=1)


def ev(eid: str, seconds: float, kind: str = "click", user: str = "u1") -> Event:
    return Event(event_id=eid, user_id=user, item_id=f"i-{eid}", type=kind, ts=T0 + timedelta(seconds=seconds))


def raw(event: Event) -> bytes:
    return event.model_dump_json().encode()


def test_an_event_is_keyed_by_its_user_as_bytes() -> None:
    event = ev("e1", 0)
    assert decode_event(raw(event), b"u1", LIMITS) == event
    with pytest.raises(InvalidMessage, match="no key"):
        decode_event(raw(event), None, LIMITS)
    with pytest.raises(InvalidMessage, match="is not the event's user_id"):
        decode_event(raw(event), b"u2", LIMITS)
    # A key that is not UTF-8 never passes for the user its lossy decoding would name.
    lossy = ev("e2", 0, user="\ufffd")
    with pytest.raises(InvalidMessage, match="is not the event's user_id"):
        decode_event(raw(lossy), b"\xff", LIMITS)
    with pytest.raises(InvalidMessage, match="not JSON"):
        decode_event(b"{", b"u1", LIMITS)


def test_an_event_outside_the_time_range_is_refused() -> None:
    ahead = ev("e1", 3 * 86_400)
    with pytest.raises(InvalidMessage, match="ahead of now"):
        decode_event(raw(ahead), b"u1", LIMITS)
    early = ContractSettings(ts_min=datetime(2000, 1, 1, tzinfo=UTC))
    old = Event(event_id="e1", user_id="u1", item_id="i", type="click", ts=datetime(1999, 1, 1, tzinfo=UTC))
    with pytest.raises(InvalidMessage, match="is before"):
        decode_event(raw(old), b"u1", early)


def test_a_stored_history_that_does_not_validate_is_a_damaged_store() -> None:
    state = UserState(events=(ev("e1", 0),), seen=("e1",))
    assert stored_state(b"u1", state.to_bytes()) == state
    assert stored_state(b"u1", None) is None and stored_state(b"u1", b"") is None
    with pytest.raises(StateError, match="unreadable"):
        stored_state(b"u1", b'{"events": 3}')
    for damaged in (b"\x02", b"\x02\x05\x00\x00\x00" + bytes(8), state.to_bytes()[:-3]):
        with pytest.raises(StateError, match="unreadable"):
            stored_state(b"u1", damaged)


def test_a_batch_skips_duplicates_and_names_the_newest_event_as_trigger() -> None:
    first = apply_batch(None, [ev("e2", 20), ev("e1", 10)], max_events=10, dedup_window=100)
    assert first.accepted == [0, 1] and first.failed == [] and first.trigger == 0  # newest by event time
    # Arrival order is not event time: the purchase that arrives first is still the newest.
    again = apply_batch(
        first.state, [ev("p1", 40, "purchase"), ev("e2", 20), ev("e3", 30)], max_events=10, dedup_window=100
    )
    assert again.accepted == [0, 2] and again.trigger == 0
    assert [e.event_id for e in again.state.events] == ["e1", "e2", "e3", "p1"]
    # Only duplicates: nothing changes and nothing triggers.
    dup = apply_batch(again.state, [ev("e1", 10)], max_events=10, dedup_window=100)
    assert dup.accepted == [] and dup.trigger is None and dup.state == again.state


def test_an_event_too_old_for_a_full_history_is_accepted_but_triggers_nothing() -> None:
    full = apply_batch(None, [ev(f"e{n}", 100 + n) for n in range(3)], max_events=3, dedup_window=100)
    late = apply_batch(full.state, [ev("old", 1)], max_events=3, dedup_window=100)
    assert late.accepted == [0] and late.trigger is None
    assert late.state.remembers("old") and [e.event_id for e in late.state.events] == ["e0", "e1", "e2"]


def test_a_rule_that_fails_on_one_event_keeps_the_rest_of_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    real = history.apply_event

    def breaks_on_e2(state: UserState | None, event: Event, **limits: int) -> history.Applied:
        if event.event_id == "e2":
            raise RuntimeError("a bug")
        return real(state, event, **limits)

    monkeypatch.setattr(history, "apply_event", breaks_on_e2)
    batch = apply_batch(None, [ev("e1", 10), ev("e2", 20), ev("e3", 5)], max_events=10, dedup_window=100)
    assert batch.accepted == [0, 2] and [(n, str(exc)) for n, exc in batch.failed] == [(1, "a bug")]
    assert batch.trigger == 0 and [e.event_id for e in batch.state.events] == ["e3", "e1"]


def test_the_history_update_carries_the_whole_history_and_its_trigger() -> None:
    batch = apply_batch(None, [ev("e2", 20, "purchase"), ev("e1", 10)], max_events=10, dedup_window=100)
    assert batch.trigger is not None
    appended = utcnow()
    update = history_update(batch.state, [ev("e2", 20, "purchase"), ev("e1", 10)][batch.trigger], appended)
    assert update.user_id == "u1" and update.trigger_event_id == "e2"
    assert [e.event_id for e in update.events] == ["e1", "e2"]
    assert update.event_ts == T0 + timedelta(seconds=20) and update.trigger_appended_at == appended
