"""The tiny T5 on the CPU: constrained generation only ever returns real, available, unbought
items; the model saves and loads like a hub checkpoint; catalog updates and LoRA adapters apply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamrec.catalog import Catalog
from streamrec.errors import ModelError
from streamrec.events import CatalogItem
from streamrec.instructions import HistoryItem, RecRequest

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")
from streamrec.model.recommender import Recommender, TinyConfig  # noqa: E402

TINY = TinyConfig(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, text_vocab=300)
GENRES = ["Drama", "Comedy", "Action", "Horror"]


def _catalog(n: int = 40, unavailable: frozenset[str] = frozenset({"i3", "i7"})) -> Catalog:
    return Catalog(
        CatalogItem(
            item_id=f"i{k}",
            title=f"{GENRES[k % 4]} story number {k}",
            category=GENRES[k % 4],
            available=f"i{k}" not in unavailable,
        )
        for k in range(n)
    )


def _requests() -> list[RecRequest]:
    return [
        RecRequest((HistoryItem("i1"), HistoryItem("i2", "purchase")), frozenset({"i2"})),
        RecRequest((HistoryItem("i5"),) * 3, frozenset({"i5", "i6", "i8", "i9", "i10"})),
        RecRequest(()),
        RecRequest((HistoryItem("unknown-item"), HistoryItem("i3")), frozenset(), task="cold_start"),
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model saved to disk once for the module."""
    rec = Recommender.build_tiny(_catalog(), config=TINY, device="cpu")
    return rec.save(tmp_path_factory.mktemp("tiny") / "model")


def _check_lists(cat: Catalog, requests: list[RecRequest], lists: list[list[object]], k: int) -> None:
    available = set(cat.available_ids)
    assert len(lists) == len(requests)
    for req, lst in zip(requests, lists, strict=True):
        ids = [s.item_id for s in lst]  # type: ignore[attr-defined]
        scores = [s.score for s in lst]  # type: ignore[attr-defined]
        assert len(ids) == k
        assert len(set(ids)) == len(ids), "duplicates"
        assert set(ids) <= available, "unknown or unavailable item"
        assert not set(ids) & req.exclude, "a purchased item was recommended"
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("scheme", ["item_token", "title"])
def test_constrained_generation_only_returns_valid_items(tiny: Path, scheme: str) -> None:
    rec = Recommender.load(str(tiny), "cpu", scheme=scheme)  # type: ignore[arg-type]
    cat = _catalog()
    reqs = _requests()
    _check_lists(cat, reqs, rec.recommend(reqs, k=8), k=8)  # type: ignore[arg-type]


def test_title_beam_search_finds_the_best_items(tiny: Path) -> None:
    """With beams as wide as the catalog, beam search over the trie returns the exact top items."""
    rec = Recommender.load(str(tiny), "cpu", scheme="title")
    req = _requests()[:1]
    wide = rec.recommend(req, k=5, num_beams=40)[0]
    narrow = rec.recommend(req, k=5, num_beams=5)[0]
    assert wide[0].score >= narrow[0].score - 1e-5
    assert [s.item_id for s in rec.recommend(req, k=5, num_beams=40)[0]] == [s.item_id for s in wide]


def test_asking_for_more_than_the_catalog_returns_what_exists(tiny: Path) -> None:
    rec = Recommender.load(str(tiny), "cpu")
    lists = rec.recommend([RecRequest((), frozenset(f"i{k}" for k in range(30)))], k=20)
    assert {s.item_id for s in lists[0]} == {f"i{k}" for k in range(30, 40)}


def test_batched_and_one_by_one_agree(tiny: Path) -> None:
    rec = Recommender.load(str(tiny), "cpu")
    reqs = _requests()
    batched = rec.recommend(reqs, k=5, batch_size=64)
    single = [rec.recommend([r], k=5)[0] for r in reqs]
    for a, b in zip(batched, single, strict=True):
        assert [s.item_id for s in a] == [s.item_id for s in b]
        assert [s.score for s in a] == pytest.approx([s.score for s in b], abs=1e-4)


def test_saved_like_a_hub_checkpoint_and_reloads_identically(tiny: Path) -> None:
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert json.loads((tiny / "config.json").read_text())["model_type"] == "t5"
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    T5ForConditionalGeneration.from_pretrained(tiny, use_safetensors=True)  # plain transformers loads it
    assert len(AutoTokenizer.from_pretrained(tiny)) > 40
    a, b = Recommender.load(str(tiny), "cpu"), Recommender.load(str(tiny), "cpu")
    reqs = _requests()
    assert [[s.item_id for s in lst] for lst in a.recommend(reqs)] == [
        [s.item_id for s in lst] for lst in b.recommend(reqs)
    ]
    assert a.version.base == "tiny" and a.version.adapter is None


def test_weights_that_are_not_safetensors_are_refused(tiny: Path, tmp_path: Path) -> None:
    for f in tiny.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not allowed")
    with pytest.raises(ModelError):
        Recommender.load(str(tmp_path), "cpu")


def test_catalog_updates_take_effect(tiny: Path) -> None:
    rec = Recommender.load(str(tiny), "cpu")
    cat = _catalog().updated(
        [
            CatalogItem(item_id="brand-new", title="A brand new film"),
            CatalogItem(item_id="i1", title="x", available=False),
        ]
    )
    rec.set_catalog(cat)
    everything = rec.recommend([RecRequest(())], k=len(cat))[0]
    ids = {s.item_id for s in everything}
    assert "brand-new" in ids  # a new item gets a token and can be recommended
    assert "i1" not in ids and "i3" not in ids  # unavailable items never are
    _check_lists(cat, _requests(), rec.recommend(_requests(), k=6), k=6)  # type: ignore[arg-type]


def test_a_lora_adapter_swaps_in_and_is_reported(tiny: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import T5ForConditionalGeneration

    base = T5ForConditionalGeneration.from_pretrained(tiny, use_safetensors=True)
    peft_model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=4, target_modules=["q", "v"]))
    with torch.no_grad():  # a visibly different adapter: LoRA starts as a no-op otherwise
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "v2")

    rec = Recommender.load(str(tiny), "cpu")
    before = rec.recommend(_requests(), k=5)
    rec.load_adapter(str(tmp_path / "v2"), version="v2")
    after = rec.recommend(_requests(), k=5)
    assert rec.version.adapter == "v2"
    assert [s.score for s in before[0]] != pytest.approx([s.score for s in after[0]])
    _check_lists(_catalog(), _requests(), after, k=5)  # type: ignore[arg-type]
    rec.load_adapter(str(tmp_path / "v2"), version="v3")  # a second swap replaces the first
    assert rec.version.adapter == "v3"
    loaded = Recommender.load(str(tmp_path / "v2"), "cpu")  # an adapter directory loads its base too
    assert loaded.version.adapter == "v2"
    assert [s.item_id for s in loaded.recommend(_requests(), k=5)[0]] == [s.item_id for s in after[0]]


def test_no_catalog_is_an_error() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    from streamrec.instructions import Instructions

    rec = Recommender.build_tiny(_catalog(5), config=TINY, device="cpu")
    empty = Recommender(
        T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=8)),
        rec.tokenizer,
        scheme="item_token",
        instructions=Instructions.load(),
        device=torch.device("cpu"),
        base="x",
    )
    with pytest.raises(ModelError):
        empty.recommend(_requests())


def test_a_saved_blend_is_served_and_keeps_every_constraint(tiny: Path, tmp_path: Path) -> None:
    from streamrec.model.blend import Blend, ItemKNN, Markov

    train = {f"u{n}": [HistoryItem(f"i{(n + t) % 40}") for t in range(6)] for n in range(40)}
    ids = _catalog().ids
    knn, markov = ItemKNN(recent=2).fit(train, ids), Markov().fit(train, ids)
    assert isinstance(knn, ItemKNN) and isinstance(markov, Markov)
    rec = Recommender.load(str(tiny), "cpu")
    rec.set_blend(Blend(knn, markov, w_knn=0.3, w_markov=0.6))
    rec.save(tmp_path / "blended")
    served = Recommender.load(str(tmp_path / "blended"), "cpu")
    assert served.blend is not None and served.blend.w_markov == pytest.approx(0.6)
    reqs = _requests()
    blended = served.recommend(reqs, k=5)
    _check_lists(_catalog(), reqs, blended, k=5)  # type: ignore[arg-type]
    # With most of the weight on the saved signals, the ranking differs from the model alone.
    alone = served.recommend(reqs, k=5, blend=False)
    assert [s.item_id for s in blended[0]] != [s.item_id for s in alone[0]]
    assert Recommender.load(str(tmp_path / "blended"), "cpu", use_blend=False).blend is None


@pytest.mark.parametrize("blended", [False, True], ids=["model alone", "blended"])
def test_one_step_lists_read_from_a_few_columns_are_those_of_every_column(tiny: Path, blended: bool) -> None:
    from streamrec.model.blend import Blend, ItemKNN, Markov, top_k

    ids = _catalog().ids
    train = {f"u{n}": [HistoryItem(f"i{(n * 3 + t) % 40}") for t in range(5)] for n in range(40)}
    knn, markov = ItemKNN(recent=3).fit(train, ids), Markov().fit(train, ids)
    assert isinstance(knn, ItemKNN) and isinstance(markov, Markov)
    rec = Recommender.load(str(tiny), "cpu")
    blend = Blend(knn, markov, w_knn=0.3, w_markov=0.3) if blended else None
    rec.set_blend(blend)
    reqs = [
        *_requests(),
        RecRequest(tuple(HistoryItem(f"i{k}") for k in (4, 9, 13)), frozenset(f"i{k}" for k in range(10, 22))),
    ]
    items = rec.single_token_items
    col = {item: n for n, item in enumerate(items)}
    expected = []
    for req, row in zip(reqs, rec.item_log_probs(reqs).astype(np.float64), strict=True):
        if blend is not None:
            row = blend.log_probs(np.exp(row), [h.item_id for h in req.history], items)
        top = top_k(row, [col[i] for i in req.exclude if i in col], 6)
        expected.append([(items[n], float(row[n])) for n in top])
    got = [[(s.item_id, s.score) for s in lst] for lst in rec.recommend(reqs, k=6)]
    assert got == expected
