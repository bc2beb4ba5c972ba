"""Serving per task on the trained tiny model: each user is asked with the task their state calls for
(cold start, next purchase, next click), one batch mixing all three serves each user as alone, and
every explanation names an item of the user's history."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from walks import CATALOG_ITEMS, ITEMS, walk

from streamrec.catalog import Catalog
from streamrec.events import Event, HistoryUpdate, Recommendation
from streamrec.generation import Generator
from streamrec.instructions import HistoryItem, RecRequest
from streamrec.model.blend import Blend, ItemKNN, Markov
from streamrec.settings import Settings

pytestmark = pytest.mark.model

T0 = datetime(2024, 3, 1, tzinfo=UTC)
TITLES = {i.item_id: i.title for i in CATALOG_ITEMS}


def update(user: str, items: list[str], last: str = "click") -> HistoryUpdate:
    types = ["click"] * (len(items) - 1) + [last]
    events = [
        Event(event_id=f"{user}-{n}", user_id=user, item_id=item, type=kind, ts=T0 + timedelta(seconds=n))
        for n, (item, kind) in enumerate(zip(items, types, strict=True))
    ]
    return HistoryUpdate(user_id=user, events=events, trigger_event_id=events[-1].event_id, event_ts=events[-1].ts)


@pytest.fixture
def generator(walk_model: Path, tmp_path: Path) -> Generator:
    worker = Generator(Settings(data_dir=tmp_path, model={"base": str(walk_model), "top_k": 5}))
    worker.set_catalog(Catalog(CATALOG_ITEMS), (1, 1))
    return worker


def asked(generator: Generator) -> list[RecRequest]:
    """Record the requests the model is asked with."""
    assert generator.recommender is not None
    real, seen = generator.recommender.recommend, []

    def recommend(requests: Sequence[RecRequest], *args: Any, **kwargs: Any) -> Any:
        seen.extend(requests)
        return real(requests, *args, **kwargs)

    generator.recommender.recommend = recommend  # type: ignore[method-assign]
    return seen


def lists(rec: Recommendation) -> list[tuple[str, float]]:
    return [(i.item_id, i.score) for i in rec.items]


def test_one_batch_serves_every_task_as_each_user_alone(generator: Generator) -> None:
    batch = [update("cold", walk(3, 2)), update("buyer", walk(10, 6), last="purchase"), update("clicker", walk(20, 6))]
    alone = [generator.generate([u], {"i0": 5.0})[0] for u in batch]
    requests = asked(generator)
    served = generator.generate(batch, {"i0": 5.0})

    assert [(r.task, r.template) for r in served] == [
        ("cold_start", "cold-plain"),
        ("next_purchase", "purchase-plain"),
        ("next_click", "click-plain"),
    ]
    assert [r.task for r in requests] == ["cold_start", "next_purchase", "next_click"]
    assert generator.recommender is not None
    texts = [generator.recommender.instruction(r) for r in requests]
    assert texts[0] == "The user liked thing 3 (stuff); thing 4 (stuff). Recommend an item they will like:"
    assert texts[1].startswith("Next purchase.") and texts[2].startswith("Next click.")
    for mixed, single in zip(served, alone, strict=True):
        assert [i for i, _ in lists(mixed)] == [i for i, _ in lists(single)]
        assert [s for _, s in lists(mixed)] == pytest.approx([s for _, s in lists(single)], abs=1e-5)

    # What the cold-start instruction gives a short history: valid items, mixed with trending.
    cold = served[0]
    assert len(cold.items) == 5 and {i.item_id for i in cold.items} <= set(TITLES)
    assert {part for i in cold.items for part in (i.reason or "").split("+")} == {"model", "trending"}
    assert "i15" not in {i.item_id for i in served[1].items}  # the item bought is never recommended


def test_explanations_name_history_items_from_the_blends_signals(generator: Generator) -> None:
    assert generator.recommender is not None
    seqs = {f"w{s}": [HistoryItem(i) for i in walk(s, 8)] for s in range(ITEMS)}
    knn, markov = ItemKNN(window=2).fit(seqs, TITLES), Markov().fit(seqs, TITLES)
    assert isinstance(knn, ItemKNN) and isinstance(markov, Markov)
    generator.recommender.set_blend(Blend(knn, markov, w_knn=0.1, w_markov=0.5))
    batch = [update("buyer", walk(3, 6), last="purchase"), update("cold", walk(15, 1)), update("c", walk(22, 7))]
    served = generator.generate(batch, {"i0": 5.0, "i1": 1.0})

    for rec, upd in zip(served, batch, strict=True):
        history = {e.item_id: e.type.value for e in upd.events}
        for item in rec.items:
            if item.reason == "trending":
                assert (item.explanation, item.explained_by, item.explanation_item_id) == (
                    "trending now",
                    "trending",
                    None,
                )
                continue
            assert item.explanation_item_id in history, (rec.user_id, item)
            verb = "bought" if history[item.explanation_item_id] == "purchase" else "clicked"
            assert item.explanation == f'because you {verb} "{TITLES[item.explanation_item_id]}"'
            assert item.explained_by in {"knn", "markov", "recent"}
    # The walk's next item follows the last one: the Markov transition ranks it, from that item.
    top = served[0].items[0]
    assert (top.item_id, top.explained_by, top.explanation_item_id) == ("i9", "markov", "i8")
    assert top.explanation == 'because you bought "thing 8"'
    assert served[2].items[0].explanation == 'because you clicked "thing 28"'
