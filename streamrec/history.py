"""Rolling per-user histories: the pure rules for decoding and accepting events and for the history
update they trigger. No Kafka, no disk.

A user's state is the newest `max_events` events by event time (oldest first, ties broken by
event_id) plus the digests of the ids of the last `dedup_window` accepted events. Both live in one
value so a table write records them together: after a crash, a replayed event is recognised as a
duplicate."""

from __future__ import annotations

import bisect
import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, TypeAdapter, field_validator
from pydantic_core import to_json

from streamrec.errors import InvalidMessage, StateError
from streamrec.events import Event, HistoryUpdate, check_event_time, parse
from streamrec.settings import ContractSettings


def id_digest(event_id: str) -> int:
    """The 64-bit digest the dedup memory keeps of an event id: 8 bytes whatever the id's length.
    Two distinct ids of one user collide with odds of about 1 in 2^64 / dedup_window (1.8e16 for
    1,000 ids), per event: one lost event in some 6,000 years at 10^5 events/s."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


_EVENTS = TypeAdapter(tuple[Event, ...])
# Version 2 of the stored value: this byte, the digest count (u32), the digests (u64 each, little
# endian), then the events as compact JSON. Version 1 values are the model's JSON (they start with "{").
_V2 = b"\x02"
_COUNT = struct.Struct("<I")
assert array("Q").itemsize == 8  # the digests' array type, on every platform CPython builds for


def encode_events(events: Sequence[Event]) -> bytes:
    """Events as a JSON array, without the optional fields they leave unset: encoded once per
    write and shared by the table value and the history update."""
    return _EVENTS.dump_json(tuple(events), exclude_none=True)


class UserState(BaseModel):
    model_config = ConfigDict(frozen=True)

    events: tuple[Event, ...] = ()
    seen: tuple[int, ...] = ()  # id_digest of each remembered id, oldest first

    @field_validator("seen", mode="before")
    @classmethod
    def _digests(cls, value: Any) -> Any:
        # Version 1 values (and callers) give the ids themselves.
        if isinstance(value, list | tuple):
            return tuple(id_digest(v) if isinstance(v, str) else v for v in value)
        return value

    def remembers(self, event_id: str) -> bool:
        """True when `event_id` is in the dedup memory."""
        return id_digest(event_id) in self.seen

    def to_bytes(self, events_json: bytes | None = None) -> bytes:
        """The table value; `events_json`: encode_events(self.events) when the caller has it."""
        digests = array("Q", self.seen)
        if sys.byteorder == "big":  # the stored form is little endian wherever it was written
            digests.byteswap()
        return b"".join((_V2, _COUNT.pack(len(digests)), digests.tobytes(), events_json or encode_events(self.events)))

    @classmethod
    def from_bytes(cls, raw: bytes) -> UserState:
        if raw[:1] != _V2:
            return cls.model_validate_json(raw)
        count = _COUNT.unpack_from(raw, 1)[0] if len(raw) >= 1 + _COUNT.size else -1
        end = 1 + _COUNT.size + 8 * count
        if count < 0 or len(raw) < end:
            raise ValueError(f"a stored history of {len(raw)} bytes is cut short of its {count} digests")
        seen = array("Q")
        seen.frombytes(raw[1 + _COUNT.size : end])
        if sys.byteorder == "big":
            seen.byteswap()
        return cls.model_construct(events=_EVENTS.validate_json(raw[end:]), seen=tuple(seen))


def decode_event(value: bytes | None, key: object, limits: ContractSettings) -> Event:
    """The event a message carries, or InvalidMessage: the contract, the event time range, and the key."""
    event = parse(Event, value, limits)
    if not isinstance(key, bytes):
        raise InvalidMessage("the message has no key: events are keyed by their user_id")
    # The table is partitioned like the input topics: an event keyed by anything but its user would
    # land in another partition's copy of that user's history. Compared as bytes, since a lossy decode
    # of the key would let b"\xff" pass for the user "\ufffd", whose table key is its UTF-8.
    if key != event.user_id.encode():
        raise InvalidMessage(f"message key {key[:300]!r} is not the event's user_id {event.user_id!r}")
    check_event_time(event, limits)
    return event


def stored_state(key: bytes, stored: bytes | None) -> UserState | None:
    """A table value as a UserState (None when the user has none). The values are written by the
    ingest agent alone, so one that does not validate means the store is damaged: StateError."""
    try:
        return UserState.from_bytes(stored) if stored else None
    except ValueError as exc:  # pydantic's ValidationError
        raise StateError(f"the stored history of user {key[:300]!r} is unreadable: {exc}") from exc


class Applied(NamedTuple):
    state: UserState
    accepted: bool  # False: a duplicate within the window, nothing changed
    changed: bool  # False when accepted but too old to enter a full history


def _order(event: Event) -> tuple[float, str]:
    return (event.ts.timestamp(), event.event_id)


def apply_event(state: UserState | None, event: Event, *, max_events: int, dedup_window: int) -> Applied:
    """The user's state after `event`; the input state is not modified."""
    state = state or UserState()
    digest = id_digest(event.event_id)
    if digest in state.seen:
        return Applied(state, accepted=False, changed=False)
    seen = (*state.seen, digest)[-dedup_window:]

    events = list(state.events)
    # Clicks and purchases come from different topics, so arrival order is not event-time order.
    bisect.insort(events, event, key=_order)
    changed = len(events) <= max_events or events[0] is not event
    events = events[-max_events:]
    # Built from values already validated: re-validating 1,000 digests per event costs more than the rule.
    return Applied(UserState.model_construct(events=tuple(events), seen=seen), accepted=True, changed=changed)


class Batch(NamedTuple):
    """One user's events of an ingest batch, applied. Indexes are into the events given."""

    state: UserState
    accepted: list[int]  # arrival order; the others were duplicates or failed
    failed: list[tuple[int, Exception]]  # events a rule failed on: each is that event's dead letter
    trigger: int | None  # the event that triggers a history update; None: the history did not change


def apply_batch(state: UserState | None, events: Sequence[Event], *, max_events: int, dedup_window: int) -> Batch:
    """Apply one user's events in arrival order; a rule that fails on one event skips that event only.
    Clicks and purchases interleave in any order, so the trigger is the newest accepted event by
    event time (ties by event_id), not the last to arrive."""
    state = state or UserState()
    accepted: list[int] = []
    failed: list[tuple[int, Exception]] = []
    changed = False
    for n, event in enumerate(events):
        try:
            applied = apply_event(state, event, max_events=max_events, dedup_window=dedup_window)
        except Exception as exc:  # whatever the rule does on one event must not take the batch with it
            failed.append((n, exc))
            continue
        if applied.accepted:
            state, changed = applied.state, changed or applied.changed
            accepted.append(n)
    trigger = max(accepted, key=lambda n: (events[n].ts, events[n].event_id)) if changed else None
    return Batch(state, accepted, failed, trigger)


def history_update_json(state_events_json: bytes, trigger: Event, appended_at: datetime | None) -> bytes:
    """history_update(...).model_dump_json(), around events already encoded (encode_events): the
    ingest worker encodes a user's events once per write, for the table value and this message."""
    return b"".join(
        (
            b'{"user_id":',
            to_json(trigger.user_id),
            b',"events":',
            state_events_json,
            b',"trigger_event_id":',
            to_json(trigger.event_id),
            b',"event_ts":',
            to_json(trigger.ts),
            b',"trigger_appended_at":',
            to_json(appended_at),
            b"}",
        )
    )


def history_update(state: UserState, trigger: Event, appended_at: datetime | None) -> HistoryUpdate:
    """What the inference workers receive: the user's whole history and the event that triggered it
    (`appended_at`: when the broker appended the trigger, for the freshness metric)."""
    return HistoryUpdate(
        user_id=trigger.user_id,
        events=list(state.events),
        trigger_event_id=trigger.event_id,
        event_ts=trigger.ts,
        trigger_appended_at=appended_at,
    )
