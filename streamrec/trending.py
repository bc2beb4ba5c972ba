"""Rolling item popularity for cold start: exponentially decayed counts in event time. Pure.

Each ingest worker keeps one Trending per input partition it owns and publishes a snapshot of its
top items; inference workers add the latest snapshot of every partition together."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter

from streamrec.errors import InvalidMessage
from streamrec.events import Event, TrendingSnapshot, parse
from streamrec.serving import TrendingProbs

PURCHASE_WEIGHT = 3.0  # a purchase says more about what is wanted now than a click


@dataclass
class Trending:
    """Counts that halve every `half_life_s` seconds of event time. Stored relative to a reference
    time so adding an event costs O(1); `snapshot` brings them to the newest time seen."""

    half_life_s: float = 3600.0
    ref_ts: float = 0.0
    counts: dict[str, float] = field(default_factory=dict)
    newest_ts: float = 0.0

    def _factor(self, ts: float) -> float:
        # 2 ** x overflows past x = 1024 and underflows quietly to 0: `add` re-bases so that
        # ts - ref_ts stays under 50 half-lives, and older events only ever shrink.
        return math.pow(2.0, (ts - self.ref_ts) / self.half_life_s)

    def add(self, item_id: str, ts: float, weight: float = 1.0) -> None:
        if not self.counts:
            self.ref_ts = ts
        # Re-base before the exponent grows large: a count is stored times 2 ** (ts - ref_ts).
        if ts - self.ref_ts > 50 * self.half_life_s:
            self._rebase(ts)
        self.counts[item_id] = self.counts.get(item_id, 0.0) + weight * self._factor(ts)
        self.newest_ts = max(self.newest_ts, ts)

    def _rebase(self, ts: float) -> None:
        # The inverse factor computed directly: 1 / 2 ** x would overflow for an event more than
        # ~1024 half-lives newer than the reference (43 days at the default half-life).
        scale = math.pow(2.0, max((self.ref_ts - ts) / self.half_life_s, -1100.0))
        self.counts = {i: c * scale for i, c in self.counts.items() if c * scale > 1e-6}
        self.ref_ts = ts

    def snapshot(self, n: int) -> dict[str, float]:
        """The top `n` items with their decayed counts as of the newest event seen."""
        scale = math.pow(2.0, (self.ref_ts - self.newest_ts) / self.half_life_s) if self.counts else 1.0
        # By count descending, ties by id: a stable sort by count over the id order. itemgetter keeps
        # the key in C; this runs over every counted item at each publish.
        top = sorted(sorted(self.counts.items()), key=itemgetter(1), reverse=True)[:n]
        return {item: count * scale for item, count in top}


def merge_snapshots(snapshots: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Sum per-partition snapshots. Users are spread over partitions, so the sum estimates the
    global count (each partition's snapshot is its own top items, so the tail is approximate)."""
    total: dict[str, float] = {}
    for snap in snapshots:
        for item, count in snap.items():
            total[item] = total.get(item, 0.0) + count
    return total


class PartitionTrending:
    """What one ingest worker counts: a Trending per input partition it owns, each published as its
    own snapshot (clear it when partitions move: the new owner counts from then on)."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self.partitions: dict[int, Trending] = {}

    def add(self, partition: int, events: Iterable[Event]) -> None:
        counts = self.partitions.setdefault(partition, Trending(self.half_life_s))
        for event in events:
            counts.add(event.item_id, event.ts.timestamp(), PURCHASE_WEIGHT if event.type == "purchase" else 1)

    def snapshots(self, top_n: int, as_of: datetime) -> list[TrendingSnapshot]:
        return [
            TrendingSnapshot(partition=partition, items=counts.snapshot(top_n), as_of=as_of)
            for partition, counts in list(self.partitions.items())
        ]

    def clear(self) -> None:
        self.partitions.clear()


def read_trending(table: Mapping[bytes, bytes]) -> dict[str, float]:
    """The merged popularity held in a topic mirror of snapshots (partition -> TrendingSnapshot JSON),
    skipping entries that do not validate."""
    snapshots = []
    for value in list(table.values()):
        try:
            snapshots.append(parse(TrendingSnapshot, value).items)
        except InvalidMessage:
            continue
    return merge_snapshots(snapshots)


class TrendingReader:
    """The merged trending of a topic mirror of snapshots, prepared for serving (TrendingProbs).
    Snapshots change every few seconds and batches come many times a second: decoded and prepared
    only when one changed, not for each batch and user."""

    def __init__(self) -> None:
        self._snapshots: tuple[tuple[bytes, bytes], ...] | None = None
        self._prepared = TrendingProbs({})

    def read(self, table: Mapping[bytes, bytes]) -> TrendingProbs:
        snapshots = tuple(table.items())
        if snapshots != self._snapshots:
            self._snapshots, self._prepared = snapshots, TrendingProbs(read_trending(dict(snapshots)))
        return self._prepared
