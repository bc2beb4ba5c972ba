"""STREAMREC_MODEL__DTYPE: a model served in bf16 on the CPU has bf16 weights and still ranks valid
items, `auto` stays fp32 on the CPU, training keeps fp32 weights, and a dtype the settings do not
offer is refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from streamrec.catalog import Catalog
from streamrec.errors import ConfigError
from streamrec.events import CatalogItem
from streamrec.instructions import HistoryItem, RecRequest
from streamrec.settings import Settings, load_settings

pytestmark = pytest.mark.model
torch = pytest.importorskip("torch")

from streamrec.generation import load_recommender  # noqa: E402
from streamrec.model.recommender import Recommender, TinyConfig, Trainer, resolve_dtype  # noqa: E402

SMALL = TinyConfig(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, text_vocab=300)
CATALOG = Catalog(CatalogItem(item_id=f"i{k}", title=f"Story number {k}", category="film") for k in range(30))
REQUESTS = [
    RecRequest(tuple(HistoryItem(f"i{(s + t) % 30}") for t in range(3)), frozenset({f"i{s}", f"i{s + 1}"}))
    for s in range(0, 25, 5)
]


def dtypes(rec: Recommender) -> set[torch.dtype]:
    return {p.dtype for p in rec.model.parameters()}


def assert_valid(rec: Recommender, k: int = 5) -> None:
    """Every list: k distinct catalog items, none excluded, finite scores, best first."""
    for request, items in zip(REQUESTS, rec.recommend(REQUESTS, k=k), strict=True):
        ids = [s.item_id for s in items]
        assert len(ids) == k and len(set(ids)) == k
        assert all(i in CATALOG for i in ids) and not set(ids) & request.exclude
        scores = [s.score for s in items]
        assert all(math.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Recommender.build_tiny(CATALOG, config=SMALL, device="cpu").save(tmp_path_factory.mktemp("tiny") / "m")


@pytest.mark.parametrize("scheme", ["item_token", "title"])
def test_a_tiny_model_in_bfloat16_on_the_cpu_has_bf16_weights_and_valid_lists(scheme: str) -> None:
    rec = Recommender.build_tiny(CATALOG, config=SMALL, device="cpu", dtype="bfloat16", scheme=scheme)  # type: ignore[arg-type]
    assert dtypes(rec) == {torch.bfloat16} and rec.dtype == torch.bfloat16
    assert not rec.autocast  # the CPU never autocasts: the weights themselves are bf16
    assert_valid(rec)


def test_the_dtype_setting_reaches_the_served_model_and_auto_is_fp32_on_the_cpu(tiny: Path, tmp_path: Path) -> None:
    def served(**model: str) -> Recommender:
        return load_recommender(
            Settings(data_dir=tmp_path, model={"base": str(tiny), "device": "cpu", **model}), CATALOG
        )

    assert dtypes(served()) == {torch.float32}  # the default, auto
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    bf16 = served(dtype="bfloat16")
    assert dtypes(bf16) == {torch.bfloat16}
    assert_valid(bf16)
    assert dtypes(served(dtype="float32")) == {torch.float32}


def test_training_keeps_fp32_weights_and_a_bf16_served_model_trains_in_fp32(tiny: Path) -> None:
    training = Recommender.load(str(tiny), "cpu", dtype="bfloat16", train=True)
    assert training.dtype == torch.bfloat16 and dtypes(training) == {torch.float32}
    # The online increment starts from the model as served: its LoRA (item tokens too) trains on fp32.
    rec = Recommender.load(str(tiny), "cpu", dtype="bfloat16")
    rec.add_lora(4, 8, 0.0, train_items=True)
    trainer = Trainer(rec, lr=1e-3, weight_decay=0.0, warmup_steps=1, total_steps=2)
    assert dtypes(rec) == {torch.float32}
    inputs = rec.tokenize_inputs([rec.instruction(r) for r in REQUESTS])
    assert math.isfinite(trainer.step(inputs, rec.target_ids([f"i{k + 2}" for k in range(0, 25, 5)])))


def test_an_adapter_serves_on_a_bf16_base(tiny: Path, tmp_path: Path) -> None:
    rec = Recommender.load(str(tiny), "cpu")
    rec.add_lora(4, 8, 0.0, train_items=True)
    rec.save_adapter(tmp_path / "v1")
    served = Recommender.load(str(tiny), "cpu", dtype="bfloat16")
    served.load_adapter(str(tmp_path / "v1"))
    assert served.version.adapter == "v1" and torch.bfloat16 in dtypes(served)
    assert_valid(served)


def test_a_dtype_the_settings_do_not_offer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")  # no stray .env file
    with pytest.raises(ValidationError, match="dtype"):
        Settings(model={"dtype": "float16"})  # T5 overflows in fp16
    monkeypatch.setenv("STREAMREC_MODEL__DTYPE", "bf16")
    with pytest.raises(ConfigError, match="dtype"):
        load_settings()
    monkeypatch.setenv("STREAMREC_MODEL__DTYPE", "bfloat16")
    assert load_settings().model.dtype == "bfloat16"
