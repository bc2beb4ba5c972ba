"""Ingest agent: click and purchase events -> rolling per-user histories (RocksDB table with a
changelog) and history updates; anything that does not validate -> the dead-letter topic."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from datetime import UTC, datetime

import faust
from faust.types import EventT

from agents.app import Streams
from agents.internals import bind_event
from streamrec.errors import InvalidMessage
from streamrec.events import DeadLetter, Event, HistoryUpdate, TrendingSnapshot, parse, utcnow
from streamrec.history import UserState, apply_events
from streamrec.metrics import (
    EVENTS_CONSUMED,
    EVENTS_DUPLICATE,
    EVENTS_REJECTED,
    HISTORY_UPDATES,
    INGEST_BATCH,
)
from streamrec.trending import PURCHASE_WEIGHT, Trending

log = logging.getLogger(__name__)


def decode_event(message: faust.types.Message) -> Event:
    event = parse(Event, message.value)
    key = message.key.decode(errors="replace") if isinstance(message.key, bytes) else message.key
    if key != event.user_id:
        # The table is partitioned like the input topics: an event keyed by anything but its user
        # would land in another partition's copy of that user's history.
        raise InvalidMessage(f"message key {key!r} is not the event's user_id {event.user_id!r}")
    return event


async def send_dead_letter(streams: Streams, message: faust.types.Message, error: str) -> None:
    letter = DeadLetter.of(message.value, message.key, error, message.topic, message.partition, message.offset)
    log.warning("dead letter %s[%d]@%d: %s", message.topic, message.partition, message.offset, error)
    await streams.dlq.send(key=message.key, value=letter.model_dump_json().encode())


def register(streams: Streams) -> None:
    app, settings = streams.app, streams.settings
    max_events, window = settings.history.max_events, settings.history.dedup_window
    batch, within = settings.ingest.batch_size, settings.ingest.batch_within_s
    half_life, top_n = settings.trending.half_life_s, settings.trending.top_n
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
            state = UserState.from_bytes(stored) if stored else None
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

    @app.agent(streams.events, name="ingest")
    async def ingest(stream: faust.StreamT[bytes]) -> None:
        # Batches amortise the read-modify-write of hot users: one table write and one history
        # update per user per batch. Events are acked only after the batch body returns.
        assert isinstance(stream, faust.Stream)  # take_events is not on the StreamT protocol
        async for events in stream.take_events(batch, within=within):
            INGEST_BATCH.observe(len(events))
            by_user: dict[str, tuple[EventT[bytes], list[Event]]] = {}
            appended: dict[str, float] = {}  # event id -> Kafka timestamp of its message
            for raw in events:
                EVENTS_CONSUMED.labels(topic=raw.message.topic).inc()
                try:
                    event = decode_event(raw.message)
                except InvalidMessage as exc:
                    EVENTS_REJECTED.labels(topic=raw.message.topic).inc()
                    await send_dead_letter(streams, raw.message, str(exc))
                    continue
                by_user.setdefault(event.user_id, (raw, []))[1].append(event)
                appended[event.event_id] = raw.message.timestamp

            for user_id, (raw, user_events) in by_user.items():
                key = user_id.encode()
                bind_event(raw)
                new_state, accepted, changed = apply_events(
                    load(key), user_events, max_events=max_events, dedup_window=window
                )
                EVENTS_DUPLICATE.inc(len(user_events) - len(accepted))
                if not accepted:
                    continue
                streams.histories[key] = new_state.to_bytes()  # faust persists only on assignment
                remember(key, new_state)
                counts = trending.setdefault(raw.message.partition, Trending(half_life))
                for event in accepted:
                    counts.add(
                        event.item_id,
                        event.ts.timestamp(),
                        PURCHASE_WEIGHT if event.type == "purchase" else 1,
                    )
                if changed:
                    # Clicks and purchases interleave in any order: the trigger is the newest by event time.
                    last = max(accepted, key=lambda e: (e.ts, e.event_id))
                    update = HistoryUpdate(
                        user_id=user_id,
                        events=list(new_state.events),
                        trigger_event_id=last.event_id,
                        event_ts=last.ts,
                        trigger_appended_at=datetime.fromtimestamp(appended[last.event_id], UTC),
                    )
                    await streams.history_updates.send(key=key, value=update.model_dump_json().encode())
                    HISTORY_UPDATES.inc()

            if time.monotonic() - published["at"] >= settings.trending.publish_interval_s:
                published["at"] = time.monotonic()
                await publish_trending()
