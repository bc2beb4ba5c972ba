"""The model settings reach the model: STREAMREC_MODEL__TEMPLATES changes what the model reads (when
served and when trained), __NUM_BEAMS the beam search of the title scheme, __BATCH_SIZE how many
users share a forward pass; and the tiny model has one set of defaults, the training settings'."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamrec.catalog import Catalog
from streamrec.events import CatalogItem
from streamrec.instructions import DEFAULT_TEMPLATES, HistoryItem, RecRequest
from streamrec.settings import Settings, TrainSettings

pytestmark = pytest.mark.model
pytest.importorskip("torch")

from streamrec.generation import load_recommender  # noqa: E402
from streamrec.model.recommender import Recommender, TinyConfig  # noqa: E402

SMALL = TinyConfig(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, text_vocab=300)
CATALOG = Catalog(
    CatalogItem(item_id=f"i{k}", title=f"{['Drama', 'Comedy'][k % 2]} story number {k}", category="film")
    for k in range(40)
)
REQUESTS = [RecRequest(tuple(HistoryItem(f"i{(s + t) % 40}") for t in range(3))) for s in range(0, 35, 7)]
EDITED = "Whatever the user opens next. History: {history}. Latest: {recent_text}. Recommend the next item:"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Recommender.build_tiny(CATALOG, config=SMALL, device="cpu").save(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def edited_templates(tmp_path: Path) -> Path:
    """The packaged templates with the served next-click wording changed."""
    text = DEFAULT_TEMPLATES.read_text(encoding="utf-8")
    served = "Next click. History: {history}. Latest: {recent_text}. Recommend the next item:"
    assert served in text
    path = tmp_path / "mine.toml"
    path.write_text(text.replace(served, EDITED), encoding="utf-8")
    return path


def settings(tmp_path: Path, base: str, **model: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", model={"base": base, "device": "cpu", **model})


def test_the_templates_setting_changes_what_the_model_reads(tiny: Path, tmp_path: Path, edited_templates: Path) -> None:
    request = REQUESTS[0]
    saved = load_recommender(settings(tmp_path, str(tiny)), CATALOG)
    assert saved.instruction(request).startswith("Next click. History:")  # the model directory's copy
    edited = load_recommender(settings(tmp_path, str(tiny), templates=edited_templates), CATALOG)
    assert edited.instruction(request).startswith("Whatever the user opens next. History:")
    assert edited.instruction(request).split("History:")[1] == saved.instruction(request).split("History:")[1]
    # The untrained tiny model served when none was trained reads them too.
    untrained = load_recommender(settings(tmp_path, "tiny", templates=edited_templates), CATALOG)
    assert untrained.instruction(request).startswith("Whatever the user opens next.")


@pytest.mark.slow
def test_streamrec_train_learns_on_the_templates_setting(tmp_path: Path, edited_templates: Path) -> None:
    from typer.testing import CliRunner

    from streamrec.cli import app
    from streamrec.datasets import Dataset, LogEvent, write_recbole

    rng = random.Random(0)
    events = []
    for u in range(30):
        start = rng.randrange(40)
        events += [LogEvent(f"u{u}", f"i{(start + t) % 40}", float(t), "click", len(events) + t) for t in range(6)]
    write_recbole(Dataset("walks", events, CATALOG), tmp_path / "walks.inter")
    small = {"D_MODEL": "32", "D_FF": "64", "TEXT_VOCAB": "300", "BATCH_SIZE": "64", "EVAL_USERS": "10"}
    env = {f"STREAMREC_TRAIN__{k}": v for k, v in small.items()} | {"STREAMREC_MODEL__TEMPLATES": str(edited_templates)}
    args = ["train", "--data", str(tmp_path / "walks.inter"), "--out", str(tmp_path / "m"), "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"], env=env)
    assert result.exit_code == 0, result.output
    # The model keeps the wording it was trained on and serves it without the setting.
    assert (tmp_path / "m" / "instructions.toml").read_text() == edited_templates.read_text()
    served = Recommender.load(str(tmp_path / "m"), "cpu")
    assert served.instruction(REQUESTS[0]).startswith("Whatever the user opens next.")


def _lists(rec: Recommender, **kwargs: Any) -> list[list[str]]:
    return [[s.item_id for s in lst] for lst in rec.recommend(REQUESTS, k=5, **kwargs)]


def test_the_num_beams_setting_is_the_beam_count_of_the_title_scheme(tiny: Path, tmp_path: Path) -> None:
    plain = Recommender.load(str(tiny), "cpu", scheme="title")
    narrow = load_recommender(settings(tmp_path, str(tiny), scheme="title", num_beams=1), CATALOG)
    assert _lists(narrow) == _lists(plain, num_beams=1)
    assert _lists(narrow) != _lists(plain, num_beams=10)
    wide = load_recommender(settings(tmp_path, str(tiny), scheme="title", num_beams=40), CATALOG)
    assert _lists(wide) == _lists(plain, num_beams=40)
    assert _lists(wide, num_beams=1) == _lists(narrow)  # asked for in the call, the call wins


def test_the_length_penalty_setting_reaches_the_title_ranking(tiny: Path, tmp_path: Path) -> None:
    plain = Recommender.load(str(tiny), "cpu", scheme="title")
    assert plain.length_penalty == 0.0
    rec = load_recommender(
        settings(tmp_path, str(tiny), scheme="title", length_penalty=2.0, exact_search=True), CATALOG
    )
    assert rec.length_penalty == 2.0 and rec.exact_search
    plain.length_penalty = 2.0
    assert _lists(rec) == _lists(plain)
    lengths = [len(rec.trie.path(s.item_id)) for s in rec.recommend(REQUESTS[:1], k=5)[0]]
    scores = [s.score for s in rec.recommend(REQUESTS[:1], k=5)[0]]
    forced = rec.sequence_log_probs(REQUESTS[:1], [[s.item_id for s in rec.recommend(REQUESTS[:1], k=5)[0]]])[0]
    assert scores == pytest.approx((forced / np.array(lengths) ** 2.0).tolist(), abs=1e-4)


def _encoder_passes(rec: Recommender, run: Any) -> int:
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    hook = rec.model.get_encoder().register_forward_hook(count)
    try:
        run()
    finally:
        hook.remove()
    return calls


@pytest.mark.parametrize("scheme", ["item_token", "title"])
def test_the_batch_size_setting_is_how_many_users_share_a_forward_pass(tiny: Path, tmp_path: Path, scheme: str) -> None:
    whole = load_recommender(settings(tmp_path, str(tiny), scheme=scheme), CATALOG)
    pairs = load_recommender(settings(tmp_path, str(tiny), scheme=scheme, batch_size=2), CATALOG)
    assert _encoder_passes(whole, lambda: whole.recommend(REQUESTS, k=5)) == 1
    assert _encoder_passes(pairs, lambda: pairs.recommend(REQUESTS, k=5)) == 3  # 5 users, 2 at a time
    assert _lists(pairs) == _lists(whole)
    if scheme == "item_token":
        assert _encoder_passes(pairs, lambda: pairs.item_log_probs(REQUESTS)) == 3
        assert _encoder_passes(pairs, lambda: pairs.item_log_probs(REQUESTS, batch_size=5)) == 1


def test_the_tiny_model_has_one_set_of_defaults_the_training_settings(tmp_path: Path) -> None:
    assert TinyConfig() == TinyConfig.from_settings(TrainSettings())
    custom = TinyConfig.from_settings(TrainSettings(d_model=32, d_ff=64, num_layers=3, text_vocab=300))
    assert (custom.d_model, custom.d_ff, custom.num_layers, custom.text_vocab) == (32, 64, 3, 300)
    # The untrained tiny model served when none was trained is the one `streamrec train` would build.
    small = {"d_model": 32, "d_ff": 48, "num_layers": 2, "text_vocab": 300}
    configured = Settings(data_dir=tmp_path, model={"base": "tiny", "device": "cpu"}, train=small)
    untrained = load_recommender(configured, CATALOG)
    config = untrained.model.config
    assert (config.d_model, config.d_ff, config.num_layers) == (32, 48, 2)
