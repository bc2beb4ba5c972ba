"""Send a catalog and an event stream to Kafka (kafka-python), keyed as the contracts say: events
by user id on the clicks or purchases topic, catalog items by item id."""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from streamrec.events import CatalogItem, Event, EventType
from streamrec.kafka.clients import producer
from streamrec.settings import Settings


@dataclass
class SendStats:
    sent: int = 0
    # TopicPartition -> next offset, from the broker's acknowledgements.
    ends: dict[Any, int] = field(default_factory=dict)
    # event id -> the message's Kafka timestamp (s), for the most recent events: where freshness starts.
    appended: OrderedDict[str, float] = field(default_factory=OrderedDict)
    keep_appended: int = 200_000
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def acked(self, event_id: str, meta: Any) -> None:
        from kafka import TopicPartition

        tp = TopicPartition(meta.topic, meta.partition)
        with self.lock:
            self.ends[tp] = max(self.ends.get(tp, 0), meta.offset + 1)
            self.appended[event_id] = meta.timestamp / 1000
            if len(self.appended) > self.keep_appended:
                self.appended.popitem(last=False)


def event_topic(settings: Settings, event: Event) -> str:
    return settings.topics.clicks if event.type is EventType.CLICK else settings.topics.purchases


def send_catalog(settings: Settings, items: Iterable[CatalogItem]) -> list[str]:
    """Publish `items` on the catalog topic; returns their ids."""
    prod = producer(settings.kafka)
    sent = []
    for item in items:
        prod.send(settings.topics.catalog, key=item.item_id.encode(), value=item.model_dump_json().encode())
        sent.append(item.item_id)
    prod.flush()
    prod.close()
    return sent


def send_events(
    settings: Settings,
    events: Iterable[Event],
    rate: float | None = None,
    stats: SendStats | None = None,
    stop: threading.Event | None = None,
    on_sent: Callable[[int], None] | None = None,
) -> SendStats:
    """Produce `events` in order, paced to `rate` events/s when given, until done or `stop` is set."""
    stats = stats or SendStats()
    prod = producer(settings.kafka)
    start, here = time.monotonic(), 0  # paced on this call's events: `stats` may carry earlier ones
    try:
        for event in events:
            if stop is not None and stop.is_set():
                break
            future = prod.send(
                event_topic(settings, event), key=event.user_id.encode(), value=event.model_dump_json().encode()
            )
            future.add_callback(functools.partial(stats.acked, event.event_id))
            stats.sent += 1
            here += 1
            if on_sent is not None:
                on_sent(stats.sent)
            if rate and here % 20 == 0:
                ahead = here / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        prod.flush()
    finally:
        prod.close()
    return stats
