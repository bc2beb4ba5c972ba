"""The Flan-T5 path on a Flan-shaped checkpoint built here (T5 v1.1, untied, Unigram tokenizer with
T5's conventions, no streamrec metadata): it loads by path like google/flan-t5-small, bootstraps
(full and LoRA, titles and item tokens), evaluates with `streamrec eval --model`, takes an online
LoRA increment and hot-swaps it; and what once assumed the project's own tokenizer stays fixed."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flan_walks import VOCAB, bootstrap, one_thread, walk_log
from walks import CATALOG_ITEMS

from streamrec.catalog import Catalog, identifiers, item_token
from streamrec.events import CatalogItem
from streamrec.instructions import HistoryItem, RecRequest

pytestmark = pytest.mark.model
torch = pytest.importorskip("torch")

from streamrec.model.flan import SMALL_FLAN, build_flan_checkpoint, train_unigram_tokenizer  # noqa: E402
from streamrec.model.recommender import Recommender  # noqa: E402

CATALOG = Catalog(CATALOG_ITEMS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def untied(rec: Recommender) -> bool:
    t5 = rec.model.get_base_model() if hasattr(rec.model, "get_base_model") else rec.model
    return bool(t5.lm_head.weight.data_ptr() != t5.shared.weight.data_ptr())


def requests(n: int = 30) -> list[RecRequest]:
    from walks import walk

    return [RecRequest(tuple(HistoryItem(i) for i in walk(k, 5)), frozenset()) for k in range(n)]


# ---------------------------------------------------------------- the checkpoint


def test_the_checkpoint_is_shaped_like_a_hub_download_of_flan_t5(flan_checkpoint: Path) -> None:
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    files = sorted(p.name for p in flan_checkpoint.iterdir())
    assert files == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((flan_checkpoint / "config.json").read_text())
    assert (config["feed_forward_proj"], config["tie_word_embeddings"]) == ("gated-gelu", False)
    assert (config["pad_token_id"], config["eos_token_id"], config["decoder_start_token_id"]) == (0, 1, 0)
    tok = AutoTokenizer.from_pretrained(flan_checkpoint)
    assert type(tok).__name__ == "T5Tokenizer"
    # The embedding is wider than the tokenizer, padded to a multiple of 128, as 32,100 -> 32,128.
    assert len(tok) < config["vocab_size"] and config["vocab_size"] % 128 == 0
    model = T5ForConditionalGeneration.from_pretrained(flan_checkpoint)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)


def test_the_tokenizer_follows_t5s_conventions(flan_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(flan_checkpoint)
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    # <extra_id_0> is the last id, <extra_id_99> the first of the hundred, as in T5.
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [len(tok) - 1, len(tok) - 100]
    ids = tok("thing 12 stuff").input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert ids[-1] == 1 and ids.count(1) == 1
    assert pieces[0] == "▁thing" and all(p.startswith("▁") for p in pieces[:-1])
    assert tok.decode(ids, skip_special_tokens=True) == "thing 12 stuff"
    # Case kept, like Flan's (the project's own tokenizer lower-cases).
    assert tok("Thing").input_ids != tok("thing").input_ids


def test_the_tokenizer_trained_here_is_the_one_loaded_from_disk(tmp_path: Path) -> None:
    from flan_walks import corpus
    from transformers import AutoTokenizer

    catalog, _ = walk_log()
    built = train_unigram_tokenizer(corpus(catalog), VOCAB)
    built.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Next click. History: thing 3  thing 4 purchase. Latest: Thing 4 (stuff) {x} ★"
    assert loaded(text).input_ids == built(text).input_ids
    assert len(loaded) == len(built) and loaded.get_vocab() == built.get_vocab()
    # One corpus, one numbering, though the trainer itself is not deterministic.
    assert train_unigram_tokenizer(corpus(catalog), VOCAB).get_vocab() == built.get_vocab()


def test_a_corpus_too_small_for_the_vocabulary_gives_fewer_pieces_and_says_so(caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="streamrec.model.flan"):
        tok = train_unigram_tokenizer(["a small corpus", "a smaller one"], 1000, extra_ids=10)
    assert len(tok) < 1000
    assert "the tokenizer has" in caplog.text and str(len(tok)) in caplog.text
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1


def test_a_config_vocab_size_sets_the_embedding(tmp_path: Path) -> None:
    from transformers import T5Config

    catalog, _ = walk_log()
    from flan_walks import corpus

    out = build_flan_checkpoint(tmp_path, corpus(catalog), config={**SMALL_FLAN, "vocab_size": 1024}, vocab_size=VOCAB)
    assert T5Config.from_pretrained(out).vocab_size == 1024
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_flan_checkpoint(tmp_path / "x", corpus(catalog), config={**SMALL_FLAN, "vocab_size": 128})


def test_loaded_by_path_it_serves_titles_like_a_hub_checkpoint(flan_checkpoint: Path) -> None:
    rec = Recommender.load(str(flan_checkpoint), "cpu", catalog=CATALOG)
    assert (rec.scheme, rec.base, rec.start_token_id) == ("title", str(flan_checkpoint), 0)
    assert all(rec.trie.path(i)[-1] == 1 for i in rec.trie_items)  # every title ends with Flan's EOS
    exclude = frozenset({"i3", "i4"})
    lists = rec.recommend([RecRequest(requests(1)[0].history, exclude)], k=10, num_beams=4)
    ids = [s.item_id for s in lists[0]]
    assert len(ids) == 10 == len(set(ids)) and set(ids) <= set(CATALOG.ids) - exclude


# ---------------------------------------------------------------- tokenizer assumptions (regressions)


def test_item_tokens_on_an_untied_model_keep_its_output_head_and_its_spare_rows(flan_checkpoint: Path) -> None:
    """Adding item tokens to Flan once (1) shrank its embedding to len(tokenizer), dropping the spare
    rows past the tokenizer, and (2) tied its output head to the input embedding: transformers 5
    re-ties T5 on every resize, so Flan's own output embedding was silently replaced."""
    from transformers import T5ForConditionalGeneration

    hub = T5ForConditionalGeneration.from_pretrained(flan_checkpoint)
    rows = hub.config.vocab_size
    rec = Recommender.load(str(flan_checkpoint), "cpu", scheme="item_token", catalog=CATALOG)
    text = len(rec.tokenizer) - len(CATALOG)
    assert rec.model.get_input_embeddings().weight.shape[0] == rows  # the 30 items fit the spare rows
    assert untied(rec)
    torch.testing.assert_close(rec.model.lm_head.weight[:text], hub.lm_head.weight[:text])
    ids = rec.item_token_ids
    assert sorted(ids) == list(range(text, text + len(CATALOG)))
    # New items' rows start near the mean of the known ones, not as whatever the spare rows held.
    head = rec.model.lm_head.weight.detach()
    assert (head[ids] - head[:text].mean(dim=0)).norm(dim=1).max() < head[:text].std(dim=0).norm()

    # More items than spare rows: the embedding grows, the head stays its own.
    more = Catalog([*CATALOG_ITEMS, *(CatalogItem(item_id=f"n{k}", title=f"new {k}") for k in range(rows))])
    rec.set_catalog(more)
    assert rec.model.get_input_embeddings().weight.shape[0] == len(rec.tokenizer) > rows
    assert rec.model.lm_head.weight.shape[0] == len(rec.tokenizer) and untied(rec)
    torch.testing.assert_close(rec.model.lm_head.weight[:text], hub.lm_head.weight[:text])
    lists = rec.recommend(requests(2), k=5)
    assert all(len(lst) == 5 for lst in lists)


def test_a_lora_with_item_tokens_on_flan_starts_as_the_base_and_trains_its_own_head(
    flan_checkpoint: Path, tmp_path: Path
) -> None:
    """peft once tied Flan's head to the item tokens' trainable input rows (T5 lists lm_head among
    its tied weights whatever the checkpoint holds): a fresh increment's adapter changed every item
    score before it had trained at all, and could never train the items' output rows."""
    from streamrec.model.recommender import Trainer

    base = Recommender.load(str(flan_checkpoint), "cpu", scheme="item_token", catalog=CATALOG).save(tmp_path / "b")
    rec = Recommender.load(str(base), "cpu", train=True)
    asked = requests(6)
    before = rec.item_log_probs(asked)
    rec.add_lora(4, 8, 0.0, train_items=True)
    rec.model.eval()
    np.testing.assert_allclose(rec.item_log_probs(asked), before, atol=1e-6)
    trainable = {n.split(".")[2] for n, p in rec.model.named_parameters() if p.requires_grad and "lora" not in n}
    assert trainable == {"shared", "lm_head"}

    trainer = Trainer(rec, lr=1e-2, weight_decay=0.0, warmup_steps=1, total_steps=5)
    trainer.train_mode(True)
    for _ in range(5):
        trainer.step(rec.tokenize_inputs([rec.instruction(r) for r in asked]), rec.target_ids(["i9"] * len(asked)))
    trainer.train_mode(False)
    trained = rec.item_log_probs(asked)
    assert (trained[:, 9] > before[:, 9] + 0.5).all()
    rec.save_adapter(tmp_path / "v1")
    # Loaded with its base, swapped into a serving model, continued by the next increment: one model.
    served = Recommender.load(str(base), "cpu")
    served.load_adapter(str(tmp_path / "v1"))
    np.testing.assert_allclose(served.item_log_probs(asked), trained, atol=1e-5)
    np.testing.assert_allclose(Recommender.load(str(tmp_path / "v1"), "cpu").item_log_probs(asked), trained, atol=1e-5)
    again = Recommender.load(str(base), "cpu", train=True)
    again.continue_adapter(str(tmp_path / "v1"))
    again.model.eval()
    np.testing.assert_allclose(again.item_log_probs(asked), trained, atol=1e-5)


def test_a_title_written_with_extra_spaces_gets_an_identifier() -> None:
    """identifiers() counted titles as written but looked them up with whitespace collapsed: a title
    with a double space raised KeyError (a catalog update stopped the worker's serving)."""
    catalog = Catalog(
        [
            CatalogItem(item_id="a", title="Big  Lamp"),
            CatalogItem(item_id="b", title="big lamp"),
            CatalogItem(item_id="c", title="Small\tLamp"),
        ]
    )
    assert identifiers(catalog, "title") == {"a": "Big Lamp #a", "b": "big lamp #b", "c": "Small Lamp"}


def test_titles_a_unigram_tokenizer_cannot_tell_apart_still_get_paths_of_their_own(flan_checkpoint: Path) -> None:
    # Characters the vocabulary lacks become <unk>, and runs of spaces collapse: these titles encode alike.
    items = [
        CatalogItem(item_id="x1", title="thing ★"),
        CatalogItem(item_id="x2", title="thing ☆"),
        CatalogItem(item_id="x3", title="thing 1"),
    ]
    rec = Recommender.load(str(flan_checkpoint), "cpu", catalog=Catalog(items))
    assert rec.encode_target("thing ★") == rec.encode_target("thing ☆")
    paths = {i: rec.trie.path(i) for i in ("x1", "x2", "x3")}
    assert len(set(paths.values())) == 3
    assert rec.tokenizer.unk_token_id not in paths["x3"]


# ---------------------------------------------------------------- training, evaluation, online


def test_a_full_bootstrap_learns_the_walk_with_titles_and_saves_a_loadable_model(
    flan_model: tuple[Path, Any],
) -> None:
    out, report = flan_model
    assert report.scheme == "title" and report.epochs == 10
    # Chance is HR@10 1/3, NDCG@10 about 0.15 on 30 items.
    assert report.best_val_ndcg10 > 0.45, report.history
    rec = Recommender.load(str(out), "cpu")
    assert rec.scheme == "title" and len(rec.catalog) == len(CATALOG) and untied(rec)


def test_a_lora_bootstrap_on_the_fine_tuned_flan_saves_an_adapter_that_loads(
    flan_model: tuple[Path, Any], tmp_path: Path
) -> None:
    base, _ = flan_model
    out, report = bootstrap(base, tmp_path / "lora", epochs=3, lora=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == base.resolve()
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert report.scheme == "title" and report.steps > 0
    rec = Recommender.load(str(out), "cpu", catalog=CATALOG)
    assert rec.adapter_version == "lora" and untied(rec)
    assert all(len(lst) == 10 for lst in rec.recommend(requests(3), k=10))


def test_an_item_token_bootstrap_on_flan_learns_the_walk_and_keeps_the_head_untied(
    flan_checkpoint: Path, tmp_path: Path
) -> None:
    out, report = bootstrap(flan_checkpoint, tmp_path / "items", epochs=6, scheme="item_token")
    assert report.best_val_ndcg10 > 0.45, report.history
    rec = Recommender.load(str(out), "cpu")
    assert rec.scheme == "item_token" and untied(rec)
    assert rec.model.config.vocab_size == json.loads((flan_checkpoint / "config.json").read_text())["vocab_size"]
    assert sorted(rec.tokenizer.convert_ids_to_tokens(rec.item_token_ids)) == sorted(map(item_token, CATALOG.ids))
    # The saved tokenizer reads a history as the one it trained with did (item tokens swallow the space before them).
    trained_with = Recommender.load(str(flan_checkpoint), "cpu", scheme="item_token", catalog=CATALOG)
    text = [rec.instruction(r) for r in requests(3)]
    assert rec.tokenize_inputs(text) == trained_with.tokenize_inputs(text)
    assert "▁" not in rec.tokenizer.convert_ids_to_tokens(rec.tokenize_inputs(["History: <item_i1> <item_i2>"])[0])


def test_eval_model_scores_the_fine_tuned_flan_against_the_baselines(
    flan_checkpoint: Path, flan_model: tuple[Path, Any], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from streamrec.cli import app
    from streamrec.datasets import Dataset, write_recbole

    model, _ = flan_model
    catalog, events = walk_log()
    write_recbole(Dataset("walk", events, catalog), tmp_path / "walk.inter")
    out = tmp_path / "report.json"
    env = {"STREAMREC_MODEL__SCHEME": None, "STREAMREC_MODEL__DTYPE": None, "STREAMREC_MODEL__TEMPLATES": None}
    with one_thread():
        result = CliRunner().invoke(
            app,
            ["eval", "--data", str(tmp_path / "walk.inter"), "--model", str(model), "--out", str(out)],
            env=env,
        )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert (report["scheme"], report["base"], report["training"]) == ("title", str(flan_checkpoint.resolve()), None)
    models = report["models"]
    assert {"streamrec", "streamrec-t5", "popularity", "itemknn", "markov"} <= set(models), models
    assert models["streamrec-t5"]["HR@10"] > models["popularity"]["HR@10"], models


def test_an_online_increment_on_flan_is_promoted_and_hot_swaps_in(
    flan_checkpoint: Path, flan_model: tuple[Path, Any], tmp_path: Path
) -> None:
    from test_online import feedback, make_settings

    from streamrec.online import run_increment
    from streamrec.registry import AdapterRegistry
    from streamrec.settings import registry_root

    base, _ = flan_model
    # This test is about the path, not the gate (tested with the tiny model): a loose tolerance.
    settings = make_settings(tmp_path, base, gate_tolerance=0.5, lr=3e-3, epochs=2)
    registry = AdapterRegistry(registry_root(settings))
    one = run_increment(settings, CATALOG, feedback(120, 0, seed=1, prefix="a"), None, registry)
    assert one.decision.accepted and one.manifest is not None, one.decision.reason
    assert one.manifest.base == str(flan_checkpoint.resolve())  # the hub checkpoint the bootstrap started from
    assert one.losses and all(loss == loss for loss in one.losses)
    version = one.manifest.version

    # The hot swap: a serving model takes the adapter between two calls, and then serves exactly what
    # a model loaded with that adapter from the start serves.
    served = Recommender.load(str(base), "cpu", catalog=CATALOG)
    asked = requests(8)
    before = served.recommend(asked, k=5)
    served.load_adapter(str(registry.path(version)), version=version)
    after = served.recommend(asked, k=5)
    fresh = Recommender.load(str(registry.path(version)), "cpu", catalog=CATALOG).recommend(asked, k=5)
    assert served.adapter_version == version and untied(served)
    assert [[s.item_id for s in lst] for lst in after] == [[s.item_id for s in lst] for lst in fresh]
    for a, b in zip(after, fresh, strict=True):
        assert [s.score for s in a] == pytest.approx([s.score for s in b], abs=1e-4)
    assert [[s.score for s in lst] for lst in after] != [[s.score for s in lst] for lst in before]
