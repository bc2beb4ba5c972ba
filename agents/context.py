"""The one place that touches a faust internal: which event a table write belongs to."""

from __future__ import annotations

import weakref

import faust
from faust.streams import _current_event


def bind_event(event: faust.types.EventT) -> None:
    """Make `event` the current one, so the next table read/write goes to its partition.

    faust picks a table's RocksDB partition and changelog partition from the current event. When an
    agent works on a batch (take_events) that is the batch's last event, which may belong to another
    partition than the key being written: bind the key's own event first."""
    _current_event.set(weakref.ref(event))
