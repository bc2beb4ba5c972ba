"""The only module that reaches into faust internals, each for a reason written beside it."""

from __future__ import annotations

import functools
import weakref
from typing import Any

from faust.streams import _current_event
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import EventT


def bind_event(event: EventT[Any]) -> None:
    """Make `event` the current one, so the next table read/write goes to its partition.

    faust picks a table's RocksDB partition and changelog partition from the current event. When an
    agent works on a batch (take_events) that is the batch's last event, which may belong to another
    partition than the key being written: bind the key's own event first."""
    _current_event.set(weakref.ref(event))


def set_fetch_max_wait(ms: int) -> None:
    """faust hard-codes fetch_max_wait_ms=1500 for its consumer. A broker that holds a fetch for the
    whole wait even when data is there (the embedded Tansu broker does) then delivers events in
    1.5 s lumps, which is most of the freshness budget. Patch the value at consumer creation."""
    thread_cls: Any = faust_aiokafka.AIOKafkaConsumerThread
    original = getattr(thread_cls, "_streamrec_original_create", thread_cls._create_worker_consumer)

    @functools.wraps(original)
    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = ms  # read by aiokafka when the consumer starts its fetcher
        return consumer

    thread_cls._streamrec_original_create = original
    thread_cls._create_worker_consumer = create
