"""`streamrec train|eval --base DIR --scheme ...`: eval trains the base it is given instead of a fresh
tiny model, and both verbs use the scheme asked for (the flag, else STREAMREC_MODEL__SCHEME) over the
base directory's own. On a tiny log, one epoch: the point is what gets trained, not how well."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result
from walks import cycle_log

from streamrec.catalog import item_token
from streamrec.datasets import Dataset, write_recbole

pytestmark = pytest.mark.model
pytest.importorskip("torch")

from streamrec.cli import app  # noqa: E402
from streamrec.model.recommender import Recommender, TinyConfig  # noqa: E402

BASE = TinyConfig(d_model=24, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=2, text_vocab=200)
# Cheap runs; a tiny model built by mistake would have the settings' d_model (64), not the base's 24.
ENV: dict[str, str | None] = {
    "STREAMREC_TRAIN__D_MODEL": "64",
    "STREAMREC_TRAIN__BATCH_SIZE": "64",
    "STREAMREC_TRAIN__EVAL_USERS": "10",
    "STREAMREC_MODEL__SCHEME": None,  # unset
    "STREAMREC_MODEL__DTYPE": None,
}


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A small log, a tiny model saved by Recommender.save (item_token scheme) and the same model as
    a plain Hugging Face directory (weights and tokenizer only, as save_pretrained writes them)."""
    root = tmp_path_factory.mktemp("cli-base")
    catalog, events = cycle_log(users=24, items=12, length=6)
    write_recbole(Dataset("cycle", events, catalog), root / "cycle.inter")
    rec = Recommender.build_tiny(catalog, config=BASE, device="cpu")
    saved = rec.save(root / "saved")
    plain = root / "plain"
    rec.model.save_pretrained(plain)
    rec.tokenizer.save_pretrained(plain)
    return root / "cycle.inter", saved, plain


def invoke(*args: str, **env: str | None) -> Result:
    return CliRunner().invoke(app, [*args, "--epochs", "1", "--device", "cpu"], env=ENV | env)


def said(result: Result) -> str:
    """The output as one line, without the box rich draws around a usage error."""
    return " ".join(result.output.replace("│", " ").split())


def saved_scheme(model_dir: Path) -> str:
    return str(json.loads((model_dir / "streamrec.json").read_text())["scheme"])


def d_model(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["d_model"])


def test_eval_trains_the_base_it_is_given_with_the_scheme_asked_for(
    log: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    data, saved, _ = log
    out = tmp_path / "report.json"
    result = invoke("eval", "--data", str(data), "--out", str(out), "--base", str(saved), "--scheme", "title")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert (report["base"], report["scheme"], report["dtype"]) == (str(saved), "title", "float32")
    assert report["training"]["scheme"] == "title" and report["training"]["dtype"] == "float32"
    trained = Path(report["model_dir"])
    assert d_model(trained) == BASE.d_model  # the base was fine-tuned, no tiny model built
    assert saved_scheme(trained) == "title"  # over the saved base's own item_token
    assert {"streamrec", "popularity", "itemknn", "markov"} <= set(report["models"])


def test_train_honours_the_scheme_setting_on_a_plain_checkpoint(log: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, _, plain = log
    out = tmp_path / "tuned"
    # A plain checkpoint's scheme is title unless told otherwise; here the setting says item_token.
    result = invoke(
        "train", "--data", str(data), "--out", str(out), "--base", str(plain), STREAMREC_MODEL__SCHEME="item_token"
    )
    assert result.exit_code == 0, result.output
    assert saved_scheme(out) == "item_token" and d_model(out) == BASE.d_model
    tuned = Recommender.load(str(out), "cpu")
    assert tuned.scheme == "item_token" and item_token("i3") in tuned.tokenizer.get_vocab()


def test_eval_with_semantic_ids_reports_the_served_blend_and_the_t5_alone(
    log: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    data, _, _ = log
    out = tmp_path / "report.json"
    result = invoke("eval", "--data", str(data), "--out", str(out), "--scheme", "semantic")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["scheme"] == "semantic" and report["training"]["scheme"] == "semantic"
    trained = Path(report["model_dir"])
    assert saved_scheme(trained) == "semantic" and (trained / "codebook.npz").is_file()
    assert {"streamrec", "streamrec-t5", "itemknn", "markov"} <= set(report["models"]), report["models"]


def test_the_base_and_scheme_flags_refuse_what_they_cannot_do(log: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, saved, _ = log
    out = str(tmp_path / "x")
    bad = invoke("train", "--data", str(data), "--out", out, "--base", str(saved), "--scheme", "codes")
    assert bad.exit_code == 2 and "--scheme must be one of item_token, title, semantic" in said(bad)
    both = invoke("eval", "--data", str(data), "--out", out, "--model", str(saved), "--base", str(saved))
    assert both.exit_code == 2 and "leave out --base and --scheme" in said(both)
    lora = invoke("train", "--data", str(data), "--out", out, "--base", str(saved), "--lora", "--scheme", "title")
    assert lora.exit_code == 2 and "keeps its base's item identifiers" in said(lora)
