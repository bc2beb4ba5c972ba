"""The `semantic` scheme: each item is named by a few code tokens from a fixed code vocabulary,
learned by residual k-means over item text and co-occurrence. The codes are part of the model and of
each adapter; a new item gets a code from its text, and only the trainer's codes are ever saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from walks import CATALOG_ITEMS, walk

from streamrec.catalog import Catalog
from streamrec.codes import CODEBOOK_FILE, CODES_FILE
from streamrec.errors import ModelError
from streamrec.events import CatalogItem
from streamrec.instructions import HistoryItem, RecRequest
from streamrec.registry import AdapterRegistry
from streamrec.settings import registry_root

pytestmark = pytest.mark.model
pytest.importorskip("torch")

from test_item_mapping import pointing_to, worker  # noqa: E402
from test_online import feedback, make_settings  # noqa: E402

from streamrec.model.recommender import Recommender  # noqa: E402
from streamrec.online import run_increment  # noqa: E402

NEW = [CatalogItem(item_id=f"n{k}", title=f"novelty {k}", category="stuff") for k in range(6)]
WALKS = [RecRequest(tuple(HistoryItem(i) for i in walk(s, 4))) for s in (0, 7, 13, 21)]


def ids(lists: list[list[object]]) -> list[list[str]]:
    return [[s.item_id for s in lst] for lst in lists]  # type: ignore[attr-defined]


def test_a_semantic_bootstrap_learns_the_walk_and_loads_back_with_its_codes(semantic_walk_model: Path) -> None:
    rec = Recommender.load(str(semantic_walk_model), "cpu")
    assert rec.scheme == "semantic" and rec.semantic is not None
    assert (semantic_walk_model / CODEBOOK_FILE).is_file()
    saved = json.loads((semantic_walk_model / CODES_FILE).read_text())
    assert {i: tuple(c) for i, c in saved.items()} == rec.item_codes
    assert set(rec.item_codes) == {i.item_id for i in CATALOG_ITEMS}
    assert len(set(rec.item_codes.values())) == len(rec.item_codes)
    # Every identifier is its code's tokens and EOS, one token per level, from the code vocabulary.
    vocab = set(rec.code_token_ids)
    assert len(vocab) == sum(rec.semantic.book.sizes)
    for item in rec.trie_items:
        path = rec.trie.path(item)
        assert len(path) == len(rec.semantic.book.sizes) + 1 and set(path[:-1]) <= vocab
    # The walk is learned: after k comes k+1, named by its code.
    for req, lst in zip(WALKS, rec.recommend(WALKS, k=10, blend=False), strict=True):
        nxt = walk(int(req.history[-1].item_id[1:]) + 1, 1)[0]
        assert nxt in [s.item_id for s in lst[:3]], (req.history, lst)


def test_the_code_vocabulary_stays_fixed_as_the_catalog_grows(semantic_walk_model: Path) -> None:
    trainer = Recommender.load(str(semantic_walk_model), "cpu")
    vocab, rows = len(trainer.tokenizer), trainer._rows()
    grown = Catalog([*CATALOG_ITEMS, *NEW])
    trainer.set_catalog(grown)  # the trainer's role: new items get codes of the model's own
    assert len(trainer.tokenizer) == vocab and trainer._rows() == rows
    assert set(trainer.trie_items) == set(grown.ids)
    assert len(set(trainer.item_codes.values())) == len(grown)
    # An inference worker codes them provisionally, never saving those codes, and gets the same ones.
    worker_rec = Recommender.load(str(semantic_walk_model), "cpu", extend_items=False, provisional_items=True)
    worker_rec.set_catalog(Catalog([*reversed(NEW), *CATALOG_ITEMS]))
    assert set(worker_rec.trie_items) == set(grown.ids)
    assert set(worker_rec.item_codes) == {i.item_id for i in CATALOG_ITEMS}
    assert {**worker_rec.item_codes, **worker_rec._provisional_codes} == trainer.item_codes
    # Without provisional codes (nor the trainer's role), items no artifact names are not served.
    plain = Recommender.load(str(semantic_walk_model), "cpu", extend_items=False)
    plain.set_catalog(grown)
    assert set(plain.trie_items) == {i.item_id for i in CATALOG_ITEMS}


def test_an_adapter_whose_codes_move_an_item_in_service_is_refused(semantic_walk_model: Path, tmp_path: Path) -> None:
    trainer = Recommender.load(str(semantic_walk_model), "cpu", train=True)
    trainer.add_lora(4, 8, 0.0, train_items=True)
    good = tmp_path / "good"
    trainer.save_adapter(good)
    bad = tmp_path / "bad"
    trainer.save_adapter(bad)
    codes = json.loads((bad / CODES_FILE).read_text())
    codes["i1"], codes["i2"] = codes["i2"], codes["i1"]
    (bad / CODES_FILE).write_text(json.dumps(codes))

    serving = Recommender.load(str(semantic_walk_model), "cpu", extend_items=False, provisional_items=True)
    before = ids(serving.recommend(WALKS, k=5))
    with pytest.raises(ModelError, match="codes differ"):
        serving.load_adapter(str(bad))
    assert serving.adapter_version is None and serving.item_codes == trainer.item_codes
    assert ids(serving.recommend(WALKS, k=5)) == before
    serving.load_adapter(str(good))
    assert serving.adapter_version == "good"


def test_an_item_published_mid_stream_gets_a_code_and_is_recommended_after_one_increment(
    tmp_path: Path, semantic_walk_model: Path
) -> None:
    """As under `item_token` (test_item_mapping): an item the catalog topic brings after the first
    adapter, that users now click after i5, is named by the trainer's code for it, which every
    worker adopts over its provisional one, and is served after i5 by the model alone."""
    settings = make_settings(tmp_path / "trainer", semantic_walk_model, epochs=4, lr=3e-3)
    registry = AdapterRegistry(registry_root(settings))
    first = run_increment(settings, Catalog(CATALOG_ITEMS), feedback(150, 0, seed=1, prefix="a"), None, registry)
    assert first.manifest is not None, first.decision.reason

    fresh = CatalogItem(item_id="m0", title="latecomer", category="stuff")
    later = Catalog([*CATALOG_ITEMS, fresh])
    gen = worker(tmp_path, settings, "worker", [CATALOG_ITEMS])
    gen.apply_adapter(registry.announcement(first.manifest))
    gen.set_catalog(later, later.fingerprint())
    assert gen.recommender is not None and "m0" in gen.recommender.trie_items  # provisionally, at once
    pointing = [RecRequest(tuple(HistoryItem(i) for i in walk(5 - n + 1, n))) for n in (3, 4, 5)]
    elsewhere = [RecRequest(tuple(HistoryItem(i) for i in walk(18 - n + 1, n))) for n in (3, 4, 5)]

    again = run_increment(settings, later, pointing_to("m0", 5, 300, 500, seed=2, prefix="b"), None, registry, seed=1)
    assert again.manifest is not None, again.decision.reason
    saved = json.loads((registry.path(again.manifest.version) / CODES_FILE).read_text())
    assert "m0" in saved
    gen.apply_adapter(registry.announcement(again.manifest))
    rec = gen.recommender
    assert rec is not None and rec.item_codes["m0"] == tuple(saved["m0"])
    for blend in (False, None):
        for lst in rec.recommend(pointing, k=10, blend=blend):
            assert "m0" in [s.item_id for s in lst], (blend, lst)
        for lst in rec.recommend(elsewhere, k=10, blend=blend):
            assert lst[0].item_id != "m0", (blend, lst)


def test_on_a_flan_shaped_checkpoint_codes_join_its_vocabulary_and_a_lora_trains_their_rows(
    flan_checkpoint: Path, tmp_path: Path
) -> None:
    """`streamrec train --base DIR --scheme semantic` on a Flan-shaped hub directory (Unigram
    tokenizer, untied head, spare rows), then `--lora` on the result: both learn the walk, and the
    adapter trains the code tokens' input and output rows and carries the codes."""
    from flan_walks import bootstrap

    model, report = bootstrap(flan_checkpoint, tmp_path / "full", scheme="semantic")
    assert report.scheme == "semantic" and report.best_val_ndcg10 > 0.6, report.history
    rec = Recommender.load(str(model), "cpu")
    assert rec.semantic is not None and rec.tokenizer.pad_token_id == 0 and rec.tokenizer.eos_token_id == 1
    req = RecRequest(tuple(HistoryItem(i) for i in walk(3, 4)), frozenset(walk(3, 4)))
    pieces = rec.tokenizer.convert_ids_to_tokens(rec.tokenizer(rec.instruction(req)).input_ids)
    code = rec.tokenizer.convert_ids_to_tokens(list(rec.trie.path("i3")[:-1]))
    assert "".join(code) == rec.names["i3"] and code == pieces[pieces.index(code[0]) :][: len(code)]
    assert rec.recommend([req], k=3, blend=False)[0][0].item_id == "i7"

    adapter, lora = bootstrap(model, tmp_path / "lora", lora=True, epochs=2)
    assert lora.best_val_ndcg10 > 0.6, lora.history
    assert json.loads((adapter / CODES_FILE).read_text()).keys() == rec.item_codes.keys()
    served = Recommender.load(str(adapter), "cpu")
    assert served.adapter_version == "lora" and served.item_codes == rec.item_codes
    assert served.recommend([req], k=3, blend=False)[0][0].item_id == "i7"

    # An online increment's adapter (train_items) trains the code tokens' rows, in the input
    # embedding and in the head of its own.
    trainer = Recommender.load(str(model), "cpu", train=True)
    trainer.add_lora(4, 8, 0.0, train_items=True)
    trainer.save_adapter(tmp_path / "increment")
    trained = json.loads((tmp_path / "increment" / "adapter_config.json").read_text())["trainable_token_indices"]
    assert isinstance(trained, dict) and len(trained) == 2
    assert all(sorted(rows) == sorted(rec.code_token_ids) for rows in trained.values())
