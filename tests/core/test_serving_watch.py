"""What the inference agent decides through the core between two batches: when to re-read the
catalog, which adapter announcement to act on (each new one once, a rollback too), the newest
history per user in a micro-batch, and how a served list is counted. No Kafka, no torch."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from streamrec.errors import InvalidMessage
from streamrec.events import (
    AdapterAnnouncement,
    CatalogItem,
    HistoryUpdate,
    ModelVersion,
    Recommendation,
    RecommendedItem,
)
from streamrec.generation import AdapterWatch, CatalogWatch, newest_per_user, refusal_reason, served_by
from streamrec.settings import ContractSettings

T0 = datetime(2024, 1, 1, tzinfo=UTC)
SHA = "0" * 64


def test_the_catalog_is_read_until_a_model_is_loaded_then_every_interval() -> None:
    mirror = {b"a": CatalogItem(item_id="a", title="A").model_dump_json().encode()}
    watch = CatalogWatch(every_s=5.0)
    assert watch.to_apply({}, loaded=False, now=100.0) is None  # nothing available: nothing to serve
    first = watch.to_apply(mirror, loaded=False, now=100.5)
    assert first is not None and first.ids == ["a"]
    assert watch.to_apply(mirror, loaded=False, now=101.0) is not None  # no model yet: read again
    assert watch.to_apply(mirror, loaded=True, now=105.0) is None
    assert watch.to_apply(mirror, loaded=True, now=106.0) is not None
    unavailable = {b"a": CatalogItem(item_id="a", title="A", available=False).model_dump_json().encode()}
    assert watch.to_apply(unavailable, loaded=True, now=200.0) is None


def announcement(version: str) -> bytes:
    raw = AdapterAnnouncement(version=version, uri=f"/registry/{version}", sha256=SHA, created_at=T0)
    return raw.model_dump_json().encode()


def test_each_new_announcement_is_acted_on_once_and_a_rollback_again() -> None:
    watch, serving = AdapterWatch(), ModelVersion(base="tiny")
    assert watch.to_apply(None, serving) is None
    v1 = watch.to_apply(announcement("v0001"), serving)
    assert v1 is not None and v1.version == "v0001"
    assert watch.to_apply(announcement("v0001"), serving) is None  # already handled
    serving = ModelVersion(base="tiny", adapter="v0001")
    v2 = announcement("v0002")
    assert watch.to_apply(v2, serving) is not None
    # A rollback announces v0001 again, byte for byte: it is acted on, though v0001 was handled before.
    assert watch.to_apply(announcement("v0001"), ModelVersion(base="tiny", adapter="v0002")) is not None
    # The version in service is not loaded again.
    assert watch.to_apply(announcement("v0003"), ModelVersion(base="tiny", adapter="v0003")) is None


def test_an_announcement_that_does_not_parse_is_refused_as_invalid_once() -> None:
    watch = AdapterWatch()
    with pytest.raises(InvalidMessage) as caught:
        watch.to_apply(b"not json", None)
    assert refusal_reason(caught.value) == "invalid"
    assert watch.to_apply(b"not json", None) is None


def test_a_batch_keeps_the_newest_update_per_user_and_names_the_bad_messages() -> None:
    def update(user: str, trigger: str) -> bytes:
        return HistoryUpdate(user_id=user, events=[], trigger_event_id=trigger, event_ts=T0).model_dump_json().encode()

    messages = [("m0", update("u1", "a")), ("m1", b"{"), ("m2", update("u2", "b")), ("m3", update("u1", "c"))]
    batch, bad = newest_per_user(messages, ContractSettings())
    assert [(m, u.user_id, u.trigger_event_id) for m, u in batch] == [("m3", "u1", "c"), ("m2", "u2", "b")]
    assert [(m, type(exc)) for m, exc in bad] == [("m1", InvalidMessage)]


def test_a_list_counts_as_the_models_when_the_model_placed_any_item() -> None:
    def rec(*reasons: str | None) -> Recommendation:
        items = [RecommendedItem(item_id=f"i{n}", score=1.0, reason=r) for n, r in enumerate(reasons)]
        return Recommendation(rec_id="r", user_id="u", items=items, model=ModelVersion(base="tiny"), generated_at=T0)

    assert served_by(rec("trending", "model")) == "model"
    assert served_by(rec("trending", None)) == "trending"
    assert served_by(rec()) == "trending"
