"""Rolling per-user histories: the pure rules for accepting one event. No Kafka, no disk.

A user's state is the newest `max_events` events by event time (oldest first, ties broken by
event_id) plus the ids of the last `dedup_window` accepted events. Both live in one value so a
table write records them together: after a crash, a replayed event is recognised as a duplicate."""

from __future__ import annotations

import bisect
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

from streamrec.events import Event


class UserState(BaseModel):
    model_config = ConfigDict(frozen=True)

    events: tuple[Event, ...] = ()
    seen: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_defaults=False).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> UserState:
        return cls.model_validate_json(raw)


class Applied(NamedTuple):
    state: UserState
    accepted: bool  # False: a duplicate within the window, nothing changed
    changed: bool  # False when accepted but too old to enter a full history


def _order(event: Event) -> tuple[float, str]:
    return (event.ts.timestamp(), event.event_id)


def apply_event(state: UserState | None, event: Event, *, max_events: int, dedup_window: int) -> Applied:
    """The user's state after `event`; the input state is not modified."""
    state = state or UserState()
    if event.event_id in state.seen:
        return Applied(state, accepted=False, changed=False)
    seen = (*state.seen, event.event_id)[-dedup_window:]

    events = list(state.events)
    # Clicks and purchases come from different topics, so arrival order is not event-time order.
    bisect.insort(events, event, key=_order)
    changed = len(events) <= max_events or events[0] is not event
    events = events[-max_events:]
    return Applied(UserState(events=tuple(events), seen=seen), accepted=True, changed=changed)


def apply_events(
    state: UserState | None, events: list[Event], *, max_events: int, dedup_window: int
) -> tuple[UserState, list[Event], bool]:
    """Apply a batch of one user's events in arrival order: (state, accepted events, changed)."""
    state = state or UserState()
    accepted: list[Event] = []
    changed = False
    for event in events:
        state, ok, ch = apply_event(state, event, max_events=max_events, dedup_window=dedup_window)
        if ok:
            accepted.append(event)
        changed = changed or ch
    return state, accepted, changed
