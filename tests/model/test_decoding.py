"""Multi-token decoding: the beam search over the item trie (through the decoder's KV cache) returns
what an exhaustive search over every item's whole identifier would, its scores are a distribution
over the catalog, and the served blend works under the title scheme too."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from streamrec.catalog import Catalog
from streamrec.datasets import LogEvent, leave_one_out
from streamrec.events import CatalogItem
from streamrec.instructions import HistoryItem, RecRequest

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")
from streamrec.model.blend import Blend, ItemKNN, Markov  # noqa: E402
from streamrec.model.recommender import Recommender, TinyConfig  # noqa: E402

ITEMS = 60
GENRES = ["Drama", "Comedy", "Action", "Horror"]
# Titles that share long prefixes ("Drama story number 1", "... 13", "... 13 returns"), so that a
# beam has to choose among many items below one prefix.
CATALOG = Catalog(
    CatalogItem(
        item_id=f"i{k}",
        title=f"{GENRES[k % 4]} story number {k // 4}" + (" returns" if k % 8 == 1 else ""),
        category=GENRES[k % 4],
    )
    for k in range(ITEMS)
)
TINY = TinyConfig(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, text_vocab=300)


def _events(users: int, seed: int) -> list[LogEvent]:
    """Walks through the catalog with a stride, so the next item is learnable from the last."""
    rng = random.Random(seed)
    events: list[LogEvent] = []
    for u in range(users):
        start = rng.randrange(ITEMS)
        for t in range(7):
            events.append(LogEvent(f"u{u}", f"i{(start + 5 * t) % ITEMS}", float(t), "click", len(events)))
    return events


SPLIT = leave_one_out(_events(120, seed=3))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recommender, list[RecRequest]]:
    """A tiny title-scheme model trained on the walks (a few seconds), and held-out requests."""
    from streamrec.lab.offline import requests_for
    from streamrec.model.training import train
    from streamrec.settings import TrainSettings

    split = SPLIT
    cfg = TrainSettings(
        epochs=3, batch_size=16, lr=3e-3, d_model=32, d_ff=64, num_layers=1, num_heads=4, text_vocab=300,
        warmup=0.1, dropout=0.0, cold_start_share=0.0, eval_users=60,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("titles") / "model"
    rec, _ = train(split, CATALOG, out, cfg, scheme="title", device="cpu", progress=False, log=lambda _: None)
    return rec, requests_for(split, "test", sorted(split.test))


def _ids(lists: list[list[object]]) -> list[list[str]]:
    return [[s.item_id for s in lst] for lst in lists]  # type: ignore[attr-defined]


def test_the_beam_search_returns_the_exhaustive_top_k(trained: tuple[Recommender, list[RecRequest]]) -> None:
    rec, requests = trained
    assert rec.trie.max_len >= 6  # identifiers of several tokens, sharing prefixes
    beams = _ids(rec.recommend(requests, k=10, blend=False))  # the default: 10 beams
    exact = rec.exhaustive(requests, 10)
    same = sum(a == b for a, b in zip(beams, exact, strict=True)) / len(requests)
    assert len(requests) == 120 and same >= 0.99


def test_batched_search_scores_are_the_teacher_forced_log_probabilities(
    trained: tuple[Recommender, list[RecRequest]],
) -> None:
    rec, requests = trained
    lists = rec.recommend(requests[:40], k=10, blend=False, batch_size=16)
    forced = rec.sequence_log_probs(requests[:40], _ids(lists))  # type: ignore[arg-type]
    for lst, lp in zip(lists, forced, strict=True):
        assert [s.score for s in lst] == pytest.approx(lp.tolist(), abs=1e-4)
    one_by_one = [rec.recommend([r], k=10, blend=False)[0] for r in requests[:40]]
    assert _ids(one_by_one) == _ids(lists)  # type: ignore[arg-type]


def test_identifier_scores_are_a_distribution_over_the_catalog(
    trained: tuple[Recommender, list[RecRequest]],
) -> None:
    rec, requests = trained
    every = [rec.trie_items] * 5
    for lp in rec.sequence_log_probs(requests[:5], every):
        assert float(np.exp(lp).sum()) == pytest.approx(1.0, abs=1e-4)


def test_an_untrained_model_and_a_length_penalty_still_give_the_exhaustive_lists() -> None:
    rec = Recommender.build_tiny(CATALOG, config=TINY, device="cpu", scheme="title")
    rng = random.Random(0)
    requests = []
    for _ in range(100):
        hist = [HistoryItem(rng.choice(CATALOG.ids)) for _ in range(rng.randint(0, 6))]
        requests.append(RecRequest(tuple(hist), frozenset(h.item_id for h in hist[:2])))
    for alpha in (0.0, 1.0):
        rec.length_penalty = alpha
        beams = _ids(rec.recommend(requests, k=10))
        exact = rec.exhaustive(requests, 10)
        assert sum(a == b for a, b in zip(beams, exact, strict=True)) >= 99, alpha
        for req, lst in zip(requests, beams, strict=True):
            assert not set(lst) & req.exclude and len(set(lst)) == 10


def test_the_blend_is_served_under_the_title_scheme(
    trained: tuple[Recommender, list[RecRequest]], tmp_path: Path
) -> None:
    rec, requests = trained
    # Signals fitted on a different pattern (stride 1), so they disagree with the model (stride 5).
    train = {f"s{n}": [HistoryItem(f"i{(n + t) % ITEMS}") for t in range(6)] for n in range(ITEMS)}
    knn, markov = ItemKNN(recent=2).fit(train, CATALOG.ids), Markov().fit(train, CATALOG.ids)
    assert isinstance(knn, ItemKNN) and isinstance(markov, Markov)
    blend = Blend(knn, markov, w_knn=0.2, w_markov=0.4)
    rec.set_blend(blend)
    try:
        reqs = requests[:20]
        served = rec.recommend(reqs, k=10)
        alone = rec.recommend(reqs, k=10, blend=False)
        assert _ids(served) != _ids(alone)  # type: ignore[arg-type]
        # The Markov signal's next item (stride 1) is served although the model alone misses it.
        nxt = [f"i{(int(r.history[-1].item_id[1:]) + 1) % ITEMS}" for r in reqs]
        assert sum(n in lst for n, lst in zip(nxt, _ids(served), strict=True)) > sum(  # type: ignore[arg-type]
            n in lst
            for n, lst in zip(nxt, _ids(alone), strict=True)  # type: ignore[arg-type]
        )
        # Each score is the log of the mixture, with the model's identifier probability in it.
        for req, lst in zip(reqs, served, strict=True):
            lp = rec.sequence_log_probs([req], [[s.item_id for s in lst]])[0]
            p_knn, p_markov = blend.signals([h.item_id for h in req.history], rec.trie_items)
            at = [rec.trie_items.index(s.item_id) for s in lst]
            for s, m, a, b in zip(lst, lp, p_knn[at], p_markov[at], strict=True):
                assert s.score == pytest.approx(math.log(0.4 * math.exp(m) + 0.2 * a + 0.4 * b), abs=1e-4)
            assert not {s.item_id for s in lst} & req.exclude
    finally:
        rec.set_blend(None)


def test_the_offline_report_gives_served_and_t5_alone_under_the_title_scheme(
    trained: tuple[Recommender, list[RecRequest]], tmp_path: Path
) -> None:
    from streamrec.lab.offline import compare

    rec, _ = trained
    try:
        report = compare(rec, SPLIT, CATALOG, save_blend=tmp_path, log=lambda _: None)
        assert {"streamrec", "streamrec-t5", "itemknn", "markov", "popularity"} <= set(report)
        blend = report["streamrec"]["blend"]
        assert blend["t5"] == pytest.approx(1 - blend["itemknn"] - blend["markov"], abs=1e-3)
        assert (tmp_path / "blend.npz").is_file() and rec.blend is not None
        # The weights were chosen on validation: the served list is at least as good there as the
        # model alone is on test, up to the split's noise (60 items, 120 users).
        assert report["streamrec"]["NDCG@10"] >= report["streamrec-t5"]["NDCG@10"] - 0.05
    finally:
        rec.set_blend(None)


def test_the_exact_search_setting_gives_the_exhaustive_lists_even_with_two_beams() -> None:
    rec = Recommender.build_tiny(CATALOG, config=TINY, device="cpu", scheme="title", seed=1)
    rng = random.Random(1)
    requests = []
    for _ in range(30):
        hist = [HistoryItem(rng.choice(CATALOG.ids)) for _ in range(rng.randint(0, 6))]
        requests.append(RecRequest(tuple(hist), frozenset(h.item_id for h in hist[:3])))
    exact = rec.exhaustive(requests, 10)
    narrow = _ids(rec.recommend(requests, k=10, num_beams=2))
    assert sum(a == b for a, b in zip(narrow, exact, strict=True)) < 30  # two beams alone miss items
    rec.exact_search = True
    assert _ids(rec.recommend(requests, k=10, num_beams=2)) == exact
