"""The feedback store on a real RocksDB directory: a redelivered example counts once, the oldest go
first when it is full, it survives a reopen, and reads come back in event-time order."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from streamrec.feedback import FeedbackExample
from streamrec.feedback_store import ExampleStore
from streamrec.instructions import HistoryItem

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def example(eid: str, seconds: float, target: str = "x") -> FeedbackExample:
    return FeedbackExample(
        event_id=eid,
        user_id="u1",
        history=(HistoryItem("h1", "click"), HistoryItem("h2", "purchase")),
        target=target,
        target_type="click",
        ts=at(seconds),
        rec_id="r1",
        recommended=(target, "y"),
        taken=(target,),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ExampleStore]:
    s = ExampleStore(tmp_path / "feedback", capacity=100)
    yield s
    s.close()


def ids(store: ExampleStore, since: datetime | None = None) -> list[str]:
    return [e.event_id for e in store.examples(since)]


def test_putting_the_same_examples_again_counts_them_once(store: ExampleStore) -> None:
    batch = [example(f"e{n}", n) for n in range(10)]
    assert store.put_many(batch) == 10
    assert store.put_many(batch) == 0
    assert store.put_many([*batch[3:6], example("e10", 10)]) == 1
    # A redelivered example inside one batch counts once too.
    assert store.put_many([example("e11", 11), example("e11", 11)]) == 1
    assert len(store) == 12 == len(ids(store))
    assert store.put_many([]) == 0
    # A rewrite replaces the value: redelivery after a restart may join a different list.
    store.put_many([example("e0", 0, target="z")])
    assert next(store.examples()).target == "z" and len(store) == 12


def test_examples_come_back_in_event_time_order_whatever_the_write_order(store: ExampleStore) -> None:
    rng = random.Random(4)
    seconds = rng.sample(range(1, 100_000), 60)
    written = [example(f"ev-{s}", s + rng.random()) for s in seconds]
    for start in range(0, 60, 7):
        store.put_many(written[start : start + 7])
    back = list(store.examples())
    assert back == sorted(written, key=lambda e: e.ts)
    # Same timestamp: by event id; sub-second times keep their order.
    store.put_many([example("b", 0.25), example("a", 0.25), example("c", 0.000001)])
    assert ids(store)[:3] == ["c", "a", "b"]
    # Event times in any zone compare as instants.
    store.put_many([example("tz", 0.5).model_copy(update={"ts": at(0.5).astimezone(timezone(timedelta(hours=2)))})])
    assert ids(store)[:4] == ["c", "a", "b", "tz"]


def test_since_is_strictly_after(store: ExampleStore) -> None:
    store.put_many([example(f"e{n}", n) for n in range(10)])
    store.put_many([example("e5b", 5), example("e5-micro", 5.000001)])
    assert ids(store, at(5)) == ["e5-micro", "e6", "e7", "e8", "e9"]
    assert store.count_since(at(5)) == 5
    assert ids(store, at(4.5)) == ["e5", "e5b", "e5-micro", "e6", "e7", "e8", "e9"]
    assert ids(store, at(9)) == [] and store.count_since(at(9)) == 0
    assert ids(store, at(-100)) == ids(store) and store.count_since(None) == len(store) == 12


def test_capacity_keeps_the_newest_by_event_time(tmp_path: Path) -> None:
    store = ExampleStore(tmp_path / "small", capacity=5)
    try:
        store.put_many([example(f"e{n:02d}", n) for n in (3, 1, 4)])
        store.put_many([example(f"e{n:02d}", n) for n in (10, 9, 2, 6)])
        assert ids(store) == ["e03", "e04", "e06", "e09", "e10"] and len(store) == 5
        # Older than everything held: stored, then trimmed straight away.
        assert store.put_many([example("old", -1)]) == 1
        assert ids(store) == ["e03", "e04", "e06", "e09", "e10"] and len(store) == 5
        # A redelivered example already held does not push anything out.
        store.put_many([example("e04", 4), example("e10", 10)])
        assert ids(store) == ["e03", "e04", "e06", "e09", "e10"]
        store.put_many([example(f"n{n}", 100 + n) for n in range(7)])
        assert ids(store) == ["n2", "n3", "n4", "n5", "n6"] and len(store) == 5
    finally:
        store.close()


def test_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "feedback"
    store = ExampleStore(path, capacity=8)
    written = [example(f"e{n}", n, target=f"t{n}") for n in range(6)]
    store.put_many(written)
    store.close()

    store = ExampleStore(path, capacity=8)
    try:
        assert len(store) == 6
        assert list(store.examples()) == written
        # The count restored from disk still dedups and trims correctly.
        assert store.put_many(written[:2] + [example(f"e{n}", n) for n in range(6, 10)]) == 4
        assert len(store) == 8 and ids(store) == [f"e{n}" for n in range(2, 10)]
    finally:
        store.close()
    # Reopened with a smaller capacity: trims on the next write.
    store = ExampleStore(path, capacity=3)
    try:
        assert len(store) == 8
        store.put_many([example("e10", 10)])
        assert ids(store) == ["e8", "e9", "e10"] and len(store) == 3
    finally:
        store.close()


def arrivals(store: ExampleStore) -> list[tuple[int, str]]:
    return [(a.seq, a.example.event_id) for a in store.by_arrival()]


def test_arrival_numbers_follow_the_order_of_first_storing(store: ExampleStore) -> None:
    store.put_many([example("b", 20), example("a", 10)])
    store.put_many([example("late", 5), example("a", 10)])  # a redelivery keeps its first number
    assert arrivals(store) == [(1, "b"), (2, "a"), (3, "late")] and store.last_arrival == 3
    assert ids(store) == ["late", "a", "b"]  # event-time reads are unchanged
    # What arrived after number 1, and of that what happened after the floor.
    assert store.count_arrived_after(1) == 2 and store.count_arrived_after(3) == 0
    assert store.count_arrived_after(1, floor=at(5)) == 1 and store.count_arrived_after(0, floor=at(5)) == 2


def test_arrival_numbers_survive_a_reopen_and_go_on(tmp_path: Path) -> None:
    path = tmp_path / "feedback"
    store = ExampleStore(path, capacity=10)
    store.put_many([example("x", 3), example("y", 1)])
    store.close()
    store = ExampleStore(path, capacity=10)
    try:
        store.put_many([example("z", 2)])
        assert arrivals(store) == [(1, "x"), (2, "y"), (3, "z")]
    finally:
        store.close()


def test_trimming_drops_examples_and_arrival_numbers_beyond_capacity(tmp_path: Path) -> None:
    store = ExampleStore(tmp_path / "small", capacity=3)
    try:
        store.put_many([example(f"e{n}", n) for n in (5, 6, 7)])
        store.put_many([example("old", 1)])  # stored, then trimmed as the oldest by event time
        assert ids(store) == ["e5", "e6", "e7"]
        # Numbers are kept for the newest 3 arrivals: e5's went (it is unnumbered now, 0), and "old"
        # keeps a number for an example no longer held, which nothing counts.
        assert arrivals(store) == [(0, "e5"), (2, "e6"), (3, "e7")]
        assert store.count_arrived_after(0) == 2 and store.count_arrived_after(3) == 0
        store.put_many([example(f"n{n}", 10 + n) for n in range(3)])
        assert arrivals(store) == [(5, "n0"), (6, "n1"), (7, "n2")]
        assert store.count_arrived_after(4) == 3 and store.count_arrived_after(0) == 3
    finally:
        store.close()


def test_a_store_from_before_arrival_numbers_is_numbered_in_event_time_order(tmp_path: Path) -> None:
    from rocksdict import Options, Rdict

    from streamrec.feedback_store import example_key

    path = tmp_path / "legacy"
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    db = Rdict(str(path), opts)  # the layout before: the default family only
    for e in (example("b", 2), example("a", 1)):
        db[example_key(e)] = e.to_bytes()
    db.close()
    store = ExampleStore(path, capacity=10)
    try:
        assert arrivals(store) == [(1, "a"), (2, "b")]
        store.put_many([example("c", 0)])
        assert arrivals(store)[-1] == (3, "c") and store.count_arrived_after(2) == 1
    finally:
        store.close()
