"""The feedback store: training examples in a local RocksDB (rocksdict), ordered by event time and
bounded. Keys are `<event time in µs>|<event_id>`, so writing the same example again (a redelivery
after a crash) overwrites it instead of counting it twice, and a range scan returns time order.

A second column family, `arrival`, numbers the examples in the order they were first stored
(`<arrival number>` -> example key). The trainer consumes examples in that order: events reach the
feedback agent out of event-time order (partitions, late clients, a replay with one step in flight
per user), so "newer than the event time last trained on" would silently skip every late example."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from rocksdict import Options, Rdict, WriteBatch

from streamrec.feedback import FeedbackExample, Mark

_WIDTH = 20  # digits of the µs timestamp and of the arrival number: both sort as text
ARRIVAL = "arrival"


class Arrived(NamedTuple):
    """An example and its arrival number (1 for the first ever stored; 0 when unknown)."""

    seq: int
    example: FeedbackExample


def example_key(example: FeedbackExample) -> bytes:
    micros = round(example.ts.timestamp() * 1_000_000)
    return f"{micros:0{_WIDTH}d}|{example.event_id}".encode()


def _after(ts: datetime) -> bytes:
    """The first key strictly after every example at `ts` (timestamps are whole µs)."""
    return f"{round(ts.timestamp() * 1_000_000) + 1:0{_WIDTH}d}|".encode()


def _seq_key(seq: int) -> bytes:
    return f"{seq:0{_WIDTH}d}".encode()


def _options() -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)  # stores written before arrival numbers gain the family
    return opts


class ExampleStore:
    """The newest `capacity` examples by event time, numbered in arrival order. Safe to read from the
    trainer's thread while the feedback agent writes (RocksDB is thread-safe; a lock keeps the
    counters and trimming consistent)."""

    def __init__(self, path: str | Path, capacity: int) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self._db = Rdict(str(self.path), _options(), column_families={ARRIVAL: Options(raw_mode=True)})
        self._arrival = self._db.get_column_family(ARRIVAL)
        self._arrival_cf = self._db.get_column_family_handle(ARRIVAL)
        self._lock = threading.Lock()
        self._count = sum(1 for _ in self._db.keys())  # noqa: SIM118 (Rdict iterates keys)
        self._arrivals = sum(1 for _ in self._arrival.keys())  # noqa: SIM118
        last = next(iter(self._arrival.keys(backwards=True)), None)
        self._seq = int(last) if last is not None else 0
        if self._count and not self._arrivals:
            self._number_existing()

    def _number_existing(self) -> None:
        """A store from before arrival numbers: number what it holds in event-time order, once."""
        batch = WriteBatch(raw_mode=True)
        for key in self._db.keys():  # noqa: SIM118
            self._seq += 1
            batch.put(_seq_key(self._seq), key, self._arrival_cf)
        self._db.write(batch)
        self._arrivals = self._seq

    def put_many(self, examples: Iterable[FeedbackExample]) -> int:
        """Store examples (one atomic write, arrival numbers included); returns how many keys are new.
        A redelivered example keeps its first arrival number. Then trims the oldest beyond capacity."""
        with self._lock:
            batch = WriteBatch(raw_mode=True)
            new = 0
            staged: set[bytes] = set()
            for example in examples:
                key = example_key(example)
                if key not in staged and self._db.get(key) is None:
                    new += 1
                    batch.put(_seq_key(self._seq + new), key, self._arrival_cf)
                staged.add(key)
                batch.put(key, example.to_bytes())
            if not staged:
                return 0
            self._db.write(batch)
            self._seq += new
            self._count += new
            self._arrivals += new
            self._trim()
            return new

    def _trim(self) -> None:
        """Examples: the oldest by event time beyond capacity. Arrival numbers: the oldest beyond
        capacity too (an example that outlives its number is older than everything the trainer can
        still call fresh)."""
        trim = WriteBatch(raw_mode=True)
        excess = self._count - self.capacity
        if excess > 0:
            for n, old in enumerate(self._db.keys()):
                if n >= excess:
                    break
                trim.delete(old)
            self._count -= excess
        extra = self._arrivals - self.capacity
        if extra > 0:
            for n, old in enumerate(self._arrival.keys()):
                if n >= extra:
                    break
                trim.delete(old, self._arrival_cf)
            self._arrivals -= extra
        if excess > 0 or extra > 0:
            self._db.write(trim)

    def __len__(self) -> int:
        return self._count

    @property
    def last_arrival(self) -> int:
        """The newest arrival number handed out (0 for an empty store)."""
        return self._seq

    def examples(self, since: datetime | None = None) -> Iterator[FeedbackExample]:
        """Examples in event-time order; only those strictly after `since` when given."""
        for _, value in self._db.items(from_key=None if since is None else _after(since)):
            yield FeedbackExample.from_bytes(value)

    def count_since(self, since: datetime | None) -> int:
        """Examples with event time strictly after `since`."""
        if since is None:
            return len(self)
        return sum(1 for _ in self._db.keys(from_key=_after(since)))

    def by_arrival(self) -> list[Arrived]:
        """Every example held, in arrival order; examples whose number was trimmed come first, as 0."""
        numbered = {key: int(seq) for seq, key in self._arrival.items()}
        held = [Arrived(numbered.get(key, 0), FeedbackExample.from_bytes(value)) for key, value in self._db.items()]
        return sorted(held, key=lambda a: a.seq)  # stable: unnumbered ones stay in event-time order

    def count_arrived_after(self, seq: int, floor: datetime | None = None) -> int:
        """Examples still held that arrived after number `seq`, only those with event time strictly
        after `floor` when given (what the trainer would call fresh)."""
        low = None if floor is None else _after(floor)
        count = 0
        for _, key in self._arrival.items(from_key=_seq_key(seq + 1)):
            if (low is None or key >= low) and self._db.get(key) is not None:
                count += 1
        return count

    def count_fresh(self, mark: Mark, floor: datetime | None) -> int:
        """How many held examples `is_fresh` accepts under `mark` and `floor`, without reading them."""
        if mark.arrival is None and mark.through is not None:  # a cursor from before arrival numbers
            return self.count_since(mark.through if floor is None else max(mark.through, floor))
        return self.count_arrived_after(mark.arrival or 0, floor)

    def close(self) -> None:
        with self._lock:
            del self._arrival, self._arrival_cf  # the family holds the database open
            self._db.close()
