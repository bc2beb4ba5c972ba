"""Under the `item_token` scheme, which token id names which item is part of the model and of each
adapter: the trainer alone gives new items ids, and every inference worker serves the adapter's
mapping, whatever order its own catalog mirror received the items in (the catalog topic has several
partitions, so that order differs from one process to the next)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from walks import CATALOG_ITEMS, ITEMS, walk

from streamrec.catalog import Catalog, item_token
from streamrec.events import CatalogItem
from streamrec.feedback import FeedbackExample
from streamrec.instructions import HistoryItem, RecRequest
from streamrec.registry import AdapterRegistry
from streamrec.settings import Settings, registry_root

pytestmark = pytest.mark.model
pytest.importorskip("torch")

from test_online import feedback, make_settings  # noqa: E402

from streamrec.generation import Generator  # noqa: E402
from streamrec.model.recommender import Recommender  # noqa: E402
from streamrec.online import run_increment  # noqa: E402

NEW = [CatalogItem(item_id=f"n{k}", title=f"novelty {k}", category="stuff") for k in range(6)]
REQUESTS = [
    RecRequest(tuple(HistoryItem(i) for i in h))
    for h in (walk(0, 4), walk(13, 4), ["n0", "n1", "i3"], ["i20", "n5", "n4", "n2"])
]


def token_ids(rec: Any) -> dict[str, int]:
    return {i: int(rec.tokenizer.convert_tokens_to_ids(item_token(i))) for i in rec.catalog.ids}


def scores(rec: Any) -> list[dict[str, float]]:
    """Each request's log P(item) by item id, so that two catalog orders compare."""
    logp = rec.item_log_probs(REQUESTS)
    return [dict(zip(rec.single_token_items, row.tolist(), strict=True)) for row in logp]


def worker(tmp_path: Path, settings: Settings, name: str, arrivals: list[list[CatalogItem]]) -> Generator:
    """An inference worker whose catalog mirror received `arrivals`, one catalog refresh each."""
    gen = Generator(settings.model_copy(update={"data_dir": tmp_path / name, "registry_dir": registry_root(settings)}))
    seen: list[CatalogItem] = []
    for batch in arrivals:
        seen += batch
        gen.set_catalog(Catalog(seen), (len(seen), hash(tuple(i.item_id for i in seen))))
    return gen


def test_workers_that_received_new_items_in_different_orders_serve_the_trainers_adapter_alike(
    tmp_path: Path, walk_model: Path
) -> None:
    """Two loads in one process stand for two inference workers: each Generator loads the base model
    from disk and keeps its own tokenizer and embeddings, which is all the mapping depends on. A third
    load (the adapter directory over the trainer's catalog) is the trainer's view."""
    settings = make_settings(tmp_path / "trainer", walk_model)
    registry = AdapterRegistry(registry_root(settings))
    trainer_catalog = Catalog([*CATALOG_ITEMS, *NEW])
    result = run_increment(settings, trainer_catalog, feedback(150, 0, seed=1, prefix="a"), None, registry)
    assert result.manifest is not None, result.decision.reason
    announcement = registry.announcement(result.manifest)

    # One worker gets the new items in the trainer's order; the other first sees two of them, later
    # the rest, from partitions that came in the other way round.
    one = worker(tmp_path, settings, "one", [CATALOG_ITEMS, NEW])
    two = worker(tmp_path, settings, "two", [CATALOG_ITEMS, NEW[:1:-1][:2], NEW[3::-1]])
    for w in (one, two):
        # Before an artifact names them, new items have no token of the mapping, but are served at
        # once from this worker's provisional ids.
        assert w.recommender is not None and not set(w.recommender.item_tokens) & {i.item_id for i in NEW}
        assert set(w.recommender.trie_items) == set(trainer_catalog.ids)
        w.apply_adapter(announcement)
    trainer = Recommender.load(str(registry.path(result.manifest.version)), "cpu", catalog=trainer_catalog)

    reference = token_ids(trainer)
    assert len(set(reference.values())) == len(reference)
    for w in (one, two):
        rec = w.recommender
        assert rec is not None and set(rec.trie_items) == set(trainer_catalog.ids)
        assert token_ids(rec) == reference
        for got, want in zip(scores(rec), scores(trainer), strict=True):
            assert got.keys() == want.keys()
            np.testing.assert_allclose([got[i] for i in want], list(want.values()), atol=1e-5)
        lists = [[s.item_id for s in lst] for lst in rec.recommend(REQUESTS, k=10)]
        assert lists == [[s.item_id for s in lst] for lst in trainer.recommend(REQUESTS, k=10)]

    # The next increment continues the adapter with its mapping, extended by an item published
    # since, whose row the grown adapter trains; both workers serve it under the trainer's id.
    later = Catalog([*trainer_catalog, CatalogItem(item_id="m0", title="latecomer", category="stuff")])
    again = run_increment(settings, later, feedback(150, 500, seed=2, prefix="b"), None, registry, seed=1)
    assert again.manifest is not None, again.decision.reason
    folder = registry.path(again.manifest.version)
    trainer = Recommender.load(str(folder), "cpu", catalog=later)
    grown = {**reference, "m0": max(reference.values()) + 1}
    assert token_ids(trainer) == grown
    trained = json.loads((folder / "adapter_config.json").read_text())["trainable_token_indices"]
    assert grown["m0"] in trained and set(reference.values()) <= set(trained)
    for w in (one, two):
        w.set_catalog(later, later.fingerprint())
        assert w.recommender is not None and "m0" in w.recommender.trie_items  # provisionally
        w.apply_adapter(registry.announcement(again.manifest))
        assert w.recommender.item_tokens == grown
        for got, want in zip(scores(w.recommender), scores(trainer), strict=True):
            np.testing.assert_allclose([got[i] for i in want], list(want.values()), atol=1e-5)


def pointing_to(item: str, after: int, n: int, start_s: float, seed: int, prefix: str) -> list[FeedbackExample]:
    """`n` examples, one second apart from `start_s`: every second one a walk that ends at item
    `after` and then clicks `item`, the others the walk pattern."""
    walkers = feedback(n, start_s, seed, prefix)
    rng = random.Random(seed)
    out = []
    for k, e in enumerate(walkers):
        if k % 2 == 0:
            length = rng.randint(3, 7)
            seq = walk((after - length + 1) % ITEMS, length)
            e = e.model_copy(update={"history": tuple(HistoryItem(i, "click") for i in seq), "target": item})
        out.append(e)
    return out


def test_an_item_published_mid_stream_is_recommended_after_one_increment(tmp_path: Path, walk_model: Path) -> None:
    """An item that appears on the catalog topic after the first adapter, and that users now click
    after item i5, is in the served lists of users whose histories end at i5 once the next increment
    is promoted: the model's own scores (not only the refitted blend) name it, and users elsewhere on
    the walk are not shown it first."""
    settings = make_settings(tmp_path / "trainer", walk_model, epochs=4, lr=3e-3)
    registry = AdapterRegistry(registry_root(settings))
    first = run_increment(settings, Catalog(CATALOG_ITEMS), feedback(150, 0, seed=1, prefix="a"), None, registry)
    assert first.manifest is not None, first.decision.reason

    fresh = CatalogItem(item_id="m0", title="latecomer", category="stuff")
    later = Catalog([*CATALOG_ITEMS, fresh])
    gen = worker(tmp_path, settings, "worker", [CATALOG_ITEMS])
    gen.apply_adapter(registry.announcement(first.manifest))
    gen.set_catalog(later, later.fingerprint())  # the catalog topic brings m0 mid-stream
    pointing = [RecRequest(tuple(HistoryItem(i) for i in walk(5 - n + 1, n))) for n in (3, 4, 5)]
    elsewhere = [RecRequest(tuple(HistoryItem(i) for i in walk(18 - n + 1, n))) for n in (3, 4, 5)]
    assert all(r.history[-1].item_id == "i5" for r in pointing)

    again = run_increment(settings, later, pointing_to("m0", 5, 300, 500, seed=2, prefix="b"), None, registry, seed=1)
    assert again.manifest is not None, again.decision.reason
    gen.apply_adapter(registry.announcement(again.manifest))
    rec = gen.recommender
    assert rec is not None and "m0" in rec.item_tokens  # under the artifact's mapping now
    for blend in (False, None):
        for lst in rec.recommend(pointing, k=10, blend=blend):
            assert "m0" in [s.item_id for s in lst], (blend, lst)
        for lst in rec.recommend(elsewhere, k=10, blend=blend):
            assert lst[0].item_id != "m0", (blend, lst)
