"""How an increment caps its training set without losing the replay share."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from streamrec.feedback import FeedbackExample
from streamrec.online import cap

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def examples(n: int) -> list[FeedbackExample]:
    return [
        FeedbackExample(
            event_id=f"e{k:04d}", user_id="u", history=(), target="i", target_type="click", ts=T0 + timedelta(seconds=k)
        )
        for k in range(n)
    ]


def test_under_the_cap_nothing_changes() -> None:
    train = examples(10)
    assert cap(train, lambda e: e.ts > T0 + timedelta(seconds=4), 10, 0.5, random.Random(0)) == train


def test_the_cap_keeps_the_newest_fresh_and_the_replay_share() -> None:
    train = examples(1000)  # 0..299 old, 300..999 fresh
    since = T0 + timedelta(seconds=299)
    kept = cap(train, lambda e: e.ts > since, 100, 0.3, random.Random(0))
    fresh = [e for e in kept if e.ts > since]
    old = [e for e in kept if e.ts <= since]
    assert len(kept) == 100 and len(fresh) == 70 and len(old) == 30
    assert [e.event_id for e in fresh] == [f"e{k:04d}" for k in range(930, 1000)]
    assert kept == sorted(kept, key=lambda e: e.ts)


def test_without_a_cursor_everything_is_fresh() -> None:
    kept = cap(examples(50), None, 20, 0.5, random.Random(0))
    assert [e.event_id for e in kept] == [f"e{k:04d}" for k in range(30, 50)]
