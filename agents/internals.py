"""The only module that reaches into faust internals, each for a reason written beside it."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Awaitable, Callable, Container, Iterable
from typing import Any

from faust.streams import _current_event
from faust.tables import recovery as faust_recovery
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, EventT


def bind_event(event: EventT[Any]) -> None:
    """Make `event` the current one, so the next table read/write goes to its partition.

    faust picks a table's RocksDB partition and changelog partition from the current event. When an
    agent works on a batch (take_events) that is the batch's last event, which may belong to another
    partition than the key being written: bind the key's own event first."""
    _current_event.set(weakref.ref(event))


def on_agent_error(app: Any, handler: Callable[[Any, BaseException], Awaitable[None]]) -> None:
    """Replace faust's handler of an exception that escapes an agent, for agents defined after this.

    faust's own handler commits the consumer's offsets (`Consumer.on_task_error`), then restarts the
    agent: the events buffered behind the failure, and those of a `take_events` batch in progress,
    count as processed and are lost. `app.agent` passes `self._on_agent_error` to every agent it
    makes, so the instance attribute decides."""
    app._on_agent_error = handler


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


def resume_inputs_after_recovery() -> None:
    """faust ends table recovery by resuming the input partitions, then seeking them to their
    committed offsets, then resuming the flow, which empties every stream's queue. The flow is
    already on (recovery needed it for the changelogs), so during the seek the fetcher hands input
    records to the streams: those still queued when the flow resumes are thrown away although
    faust counts them as read, and the seek rewinds faust's read offsets under records still
    arriving, which it books as a gap of nonexistent offsets. After a restart with a backlog this
    loses events (faust commits over the dropped ones), stops a partition's commits for good (a
    dropped record outside any gap), or crawls (offsets booked both as gap and as processed let
    each commit advance by one, once per commit interval). aiokafka fetches committed offsets one
    partition at a time, so the seek is long enough to hit this on the embedded broker. Resume
    the input partitions once recovery is over, seek and flow included: nothing is fetched from
    them before, so nothing is thrown away. (Needs `fetch_active_partitions_only`.)"""
    recovery_cls: Any = faust_recovery.Recovery
    # Apps without tables resume through Recovery._resume_streams instead, with the flow still off
    # during the seek: nothing to fix there.
    original = getattr(recovery_cls, "_streamrec_original_on_recovery_completed", recovery_cls.on_recovery_completed)
    recovery_cls._streamrec_original_on_recovery_completed = original
    recovery_cls.on_recovery_completed = _resume_when_done(original)


def _resume_when_done(original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(original)
    async def run(self: Any, generation_id: int = 0) -> None:
        consumer = self.app.consumer
        held: list[Iterable[TP]] = []
        consumer.resume_partitions = held.append  # hides the method for the length of the call
        try:
            await original(self, generation_id)
        finally:
            del consumer.resume_partitions
        # Not after an exception: that is a new rebalance (its own recovery resumes what it
        # assigns) or a stop.
        for tps in held:
            consumer.resume_partitions(tps)

    return run


def fetch_active_partitions_only() -> None:
    """faust asks aiokafka for the records of its active partitions, passing its live set of them.
    aiokafka takes an empty set for "every partition", and faust drops what comes back for a
    partition that is not active, though aiokafka has moved past it. So a fetch that waits while
    the set empties (recovery pauses the changelogs before the input partitions are resumed)
    returns the input partitions' records, and faust loses them. Pass a view of the live set that
    is never taken for "every partition"."""
    thread_cls: Any = faust_aiokafka.AIOKafkaConsumerThread
    original = getattr(thread_cls, "_streamrec_original_fetch_records", thread_cls._fetch_records)

    @functools.wraps(original)
    async def fetch(self: Any, consumer: Any, active_partitions: Any, *args: Any, **kwargs: Any) -> Any:
        view = None if active_partitions is None else _ActivePartitions(active_partitions)
        return await original(self, consumer, view, *args, **kwargs)

    thread_cls._streamrec_original_fetch_records = original
    thread_cls._fetch_records = fetch


class _ActivePartitions:
    """Membership follows the live set; truth does not depend on it being empty."""

    def __init__(self, live: Container[TP]) -> None:
        self._live = live

    def __bool__(self) -> bool:
        return True

    def __contains__(self, tp: object) -> bool:
        return tp in self._live


# Applied on import: every app is built in agents.app, which imports this module.
resume_inputs_after_recovery()
fetch_active_partitions_only()
