"""The feedback store: training examples in a local RocksDB (rocksdict), ordered by event time and
bounded. Keys are `<event time in µs>|<event_id>`, so writing the same example again (a redelivery
after a crash) overwrites it instead of counting it twice, and a range scan returns time order."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from rocksdict import Options, Rdict, WriteBatch

from streamrec.feedback import FeedbackExample

_WIDTH = 20  # digits of the µs timestamp: sorts as text for every date after 1970


def example_key(example: FeedbackExample) -> bytes:
    micros = round(example.ts.timestamp() * 1_000_000)
    return f"{micros:0{_WIDTH}d}|{example.event_id}".encode()


def _after(ts: datetime) -> bytes:
    """The first key strictly after every example at `ts` (timestamps are whole µs)."""
    return f"{round(ts.timestamp() * 1_000_000) + 1:0{_WIDTH}d}|".encode()


class ExampleStore:
    """The newest `capacity` examples by event time. Safe to read from the trainer's thread while the
    feedback agent writes (RocksDB is thread-safe; a lock keeps the count and trimming consistent)."""

    def __init__(self, path: str | Path, capacity: int) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self._db = Rdict(str(self.path), opts)
        self._lock = threading.Lock()
        self._count = sum(1 for _ in self._db.keys())  # noqa: SIM118 (Rdict iterates keys)

    def put_many(self, examples: Iterable[FeedbackExample]) -> int:
        """Store examples (one atomic write); returns how many keys are new. Then trims the oldest
        beyond capacity."""
        with self._lock:
            batch = WriteBatch(raw_mode=True)
            new = 0
            staged: set[bytes] = set()
            for example in examples:
                key = example_key(example)
                if key not in staged and self._db.get(key) is None:
                    new += 1
                staged.add(key)
                batch.put(key, example.to_bytes())
            if not staged:
                return 0
            self._db.write(batch)
            self._count += new
            excess = self._count - self.capacity
            if excess > 0:
                trim = WriteBatch(raw_mode=True)
                for n, old in enumerate(self._db.keys()):
                    if n >= excess:
                        break
                    trim.delete(old)
                self._db.write(trim)
                self._count -= excess
            return new

    def __len__(self) -> int:
        return self._count

    def examples(self, since: datetime | None = None) -> Iterator[FeedbackExample]:
        """Examples in event-time order; only those strictly after `since` when given."""
        for _, value in self._db.items(from_key=None if since is None else _after(since)):
            yield FeedbackExample.from_bytes(value)

    def count_since(self, since: datetime | None) -> int:
        if since is None:
            return len(self)
        return sum(1 for _ in self._db.keys(from_key=_after(since)))

    def close(self) -> None:
        with self._lock:
            self._db.close()
