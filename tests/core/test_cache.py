"""The per-user cache the ingest and feedback agents share: bounded, least recently used out first."""

from __future__ import annotations

import pytest

from streamrec.cache import LRUCache


def test_the_least_recently_used_value_goes_first() -> None:
    cache: LRUCache[bytes, int] = LRUCache(2)
    cache.put(b"a", 1)
    cache.put(b"b", 2)
    assert cache.get(b"a") == 1  # a read counts as a use: b is now the oldest
    cache.put(b"c", 3)
    assert b"b" not in cache
    assert (cache.get(b"a"), cache.get(b"c"), len(cache)) == (1, 3, 2)
    cache.put(b"a", 10)  # a write replaces and renews
    cache.put(b"d", 4)
    assert cache.get(b"a") == 10 and cache.get(b"c") is None


def test_capacity_zero_keeps_nothing_and_clear_forgets_everything() -> None:
    none: LRUCache[str, str] = LRUCache(0)
    none.put("u", "state")
    assert none.get("u") is None and len(none) == 0
    cache: LRUCache[str, str] = LRUCache(10)
    for n in range(5):
        cache.put(f"u{n}", "state")
    cache.clear()
    assert len(cache) == 0 and cache.get("u1") is None
    with pytest.raises(ValueError, match="negative"):
        LRUCache(-1)
