"""Ingest agent: click and purchase events -> rolling per-user histories (RocksDB table with a
changelog) and history updates; anything that does not validate -> the dead-letter topic."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import faust
from faust.types import EventT

from agents.app import Streams
from agents.internals import bind_event
from agents.supervision import dead_letter
from streamrec.errors import InvalidMessage, StateError
from streamrec.events import Event, HistoryUpdate, TrendingSnapshot, check_event_time, kafka_time, parse, utcnow
from streamrec.history import UserState, apply_event
from streamrec.metrics import (
    EVENTS_CONSUMED,
    EVENTS_DUPLICATE,
    HISTORY_UPDATES,
    INGEST_BATCH,
)
from streamrec.settings import ContractSettings
from streamrec.trending import PURCHASE_WEIGHT, Trending

log = logging.getLogger(__name__)


def decode_event(message: faust.types.Message, limits: ContractSettings) -> Event:
    """The event a message carries, or InvalidMessage: the contract, the event time range, and the key."""
    event = parse(Event, message.value, limits)
    key = message.key
    if not isinstance(key, bytes):
        raise InvalidMessage("the message has no key: events are keyed by their user_id")
    # The table is partitioned like the input topics: an event keyed by anything but its user would
    # land in another partition's copy of that user's history. Compared as bytes, since a lossy decode
    # of the key would let b"\xff" pass for the user "\ufffd", whose table key is its UTF-8.
    if key != event.user_id.encode():
        raise InvalidMessage(f"message key {key[:300]!r} is not the event's user_id {event.user_id!r}")
    check_event_time(event, limits)
    return event


def register(streams: Streams) -> None:
    app, settings = streams.app, streams.settings
    max_events, window = settings.history.max_events, settings.history.dedup_window
    batch, within = settings.ingest.batch_size, settings.ingest.batch_within_s
    half_life, top_n = settings.trending.half_life_s, settings.trending.top_n
    limits = settings.contract
    # Decoded states of recently active users. The table stays the truth: every change is written
    # to it; the cache only saves the read and decode. Any rebalance may move users, so forget all.
    cache: OrderedDict[bytes, UserState] = OrderedDict()
    cache_size = settings.ingest.cache_users

    def forget(*_: object, **__: object) -> None:
        cache.clear()

    app.on_partitions_revoked.connect(forget, weak=False)
    app.on_partitions_assigned.connect(forget, weak=False)

    def load(key: bytes) -> UserState | None:
        state = cache.get(key)
        if state is None:
            stored = streams.histories.get(key)
            try:
                state = UserState.from_bytes(stored) if stored else None
            except ValueError as exc:  # pydantic's ValidationError: written by us, so the store is damaged
                raise StateError(f"the stored history of user {key[:300]!r} is unreadable: {exc}") from exc
        else:
            cache.move_to_end(key)
        return state

    def remember(key: bytes, state: UserState) -> None:
        cache[key] = state
        cache.move_to_end(key)
        if len(cache) > cache_size:
            cache.popitem(last=False)

    # Rolling popularity per input partition, published for cold-start recommendations.
    trending: dict[int, Trending] = {}
    app.on_partitions_revoked.connect(lambda *_, **__: trending.clear(), weak=False)

    published = {"at": 0.0}

    async def publish_trending() -> None:
        # From the agent between batches rather than a faust timer: one task writes, so the
        # snapshots never interleave with a batch in progress.
        for partition, counts in list(trending.items()):
            snapshot = TrendingSnapshot(partition=partition, items=counts.snapshot(top_n), as_of=utcnow())
            value = snapshot.model_dump_json().encode()
            await streams.trending.send(key=str(partition).encode(), value=value)

    async def apply_user(key: bytes, arrivals: list[tuple[EventT[bytes], Event]]) -> None:
        """One user's events of a batch, in arrival order: one table write and one history update."""
        bind_event(arrivals[0][0])
        state = load(key) or UserState()
        accepted: list[tuple[EventT[bytes], Event]] = []
        changed = False
        for raw, event in arrivals:
            try:
                applied = apply_event(state, event, max_events=max_events, dedup_window=window)
            except Exception as exc:  # a rule that fails on one event must not take the batch with it
                await dead_letter(streams.dlq, settings, raw.message, exc)
                continue
            if applied.accepted:
                state, changed = applied.state, changed or applied.changed
                accepted.append((raw, event))
        EVENTS_DUPLICATE.inc(len(arrivals) - len(accepted))
        if not accepted:
            return
        bind_event(arrivals[0][0])  # the dead letters above may have moved faust's current event
        streams.histories[key] = state.to_bytes()  # faust persists only on assignment
        remember(key, state)
        counts = trending.setdefault(arrivals[0][0].message.partition, Trending(half_life))
        for _, event in accepted:
            counts.add(event.item_id, event.ts.timestamp(), PURCHASE_WEIGHT if event.type == "purchase" else 1)
        if changed:
            # Clicks and purchases interleave in any order: the trigger is the newest by event time.
            raw, last = max(accepted, key=lambda a: (a[1].ts, a[1].event_id))
            update = HistoryUpdate(
                user_id=last.user_id,
                events=list(state.events),
                trigger_event_id=last.event_id,
                event_ts=last.ts,
                trigger_appended_at=kafka_time(raw.message.timestamp),
            )
            await streams.history_updates.send(key=key, value=update.model_dump_json().encode())
            HISTORY_UPDATES.inc()

    @app.agent(streams.events, name="ingest")
    async def ingest(stream: faust.StreamT[bytes]) -> None:
        # Batches amortise the read-modify-write of hot users: one table write and one history
        # update per user per batch. Events are acked only after the batch body returns; a failure
        # that escapes it stops the worker (agents.supervision) before anything is acked.
        assert isinstance(stream, faust.Stream)  # take_events is not on the StreamT protocol
        async for events in stream.take_events(batch, within=within):
            INGEST_BATCH.observe(len(events))
            by_user: dict[bytes, list[tuple[EventT[bytes], Event]]] = {}
            for raw in events:
                EVENTS_CONSUMED.labels(topic=raw.message.topic).inc()
                try:
                    event = decode_event(raw.message, limits)
                except Exception as exc:  # whatever one message makes the decoder do, it is that message's
                    await dead_letter(streams.dlq, settings, raw.message, exc)
                    continue
                by_user.setdefault(event.user_id.encode(), []).append((raw, event))
            for key, arrivals in by_user.items():
                await apply_user(key, arrivals)

            if time.monotonic() - published["at"] >= settings.trending.publish_interval_s:
                published["at"] = time.monotonic()
                await publish_trending()
