"""Reading what the workers mirror from compacted topics: the catalog (entries that do not validate
are skipped, a message key must be the item id) and the trending snapshots of every partition,
counted per partition by the ingest worker. No Kafka."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from streamrec.catalog import Catalog, decode_item, read_catalog
from streamrec.errors import InvalidMessage
from streamrec.events import CatalogItem, Event, TrendingSnapshot
from streamrec.settings import ContractSettings
from streamrec.trending import PURCHASE_WEIGHT, PartitionTrending, read_trending

LIMITS = ContractSettings()
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def item(item_id: str, title: str = "t", available: bool = True) -> CatalogItem:
    return CatalogItem(item_id=item_id, title=title, available=available)


def test_the_catalog_mirror_skips_what_does_not_validate() -> None:
    mirror = {b"a": item("a").model_dump_json().encode(), b"b": b"not json", b"c": item("c").model_dump_json().encode()}
    assert read_catalog(mirror).ids == ["a", "c"]
    assert len(read_catalog({})) == 0


def test_a_catalog_message_is_keyed_by_its_item() -> None:
    value = item("a").model_dump_json().encode()
    assert decode_item(value, b"a", LIMITS) == item("a")
    assert decode_item(value, None, LIMITS) == item("a")
    with pytest.raises(InvalidMessage, match="is not the item_id"):
        decode_item(value, b"b", LIMITS)
    with pytest.raises(InvalidMessage, match="tombstone"):
        decode_item(None, b"a", LIMITS)


def test_the_fingerprint_follows_what_serving_depends_on() -> None:
    base = Catalog([item("a"), item("b")])
    assert base.fingerprint() == Catalog([item("a"), item("b")]).fingerprint()
    assert base.fingerprint() != Catalog([item("a"), item("b", available=False)]).fingerprint()
    assert base.fingerprint() != Catalog([item("a"), item("b", title="new")]).fingerprint()
    assert base.fingerprint() != Catalog([item("a")]).fingerprint()


def ev(eid: str, item_id: str, seconds: float, kind: str = "click") -> Event:
    return Event(event_id=eid, user_id="u", item_id=item_id, type=kind, ts=T0 + timedelta(seconds=seconds))


def test_each_partition_is_counted_and_published_on_its_own() -> None:
    counts = PartitionTrending(half_life_s=3600.0)
    counts.add(0, [ev("e1", "a", 0), ev("e2", "b", 0, "purchase")])
    counts.add(1, [ev("e3", "a", 0)])
    snapshots = {s.partition: s for s in counts.snapshots(10, as_of=T0)}
    assert snapshots[0].items == {"b": PURCHASE_WEIGHT, "a": 1.0} and snapshots[1].items == {"a": 1.0}
    assert snapshots[0].as_of == T0
    assert [s.items for s in counts.snapshots(1, as_of=T0) if s.partition == 0] == [{"b": PURCHASE_WEIGHT}]
    counts.clear()
    assert counts.snapshots(10, as_of=T0) == []


def test_the_trending_mirror_adds_every_partition_and_skips_bad_entries() -> None:
    def snap(partition: int, items: dict[str, float]) -> bytes:
        return TrendingSnapshot(partition=partition, items=items, as_of=T0).model_dump_json().encode()

    mirror = {b"0": snap(0, {"a": 2.0, "b": 1.0}), b"1": snap(1, {"a": 0.5}), b"2": b"{}"}
    assert read_trending(mirror) == {"a": 2.5, "b": 1.0}
