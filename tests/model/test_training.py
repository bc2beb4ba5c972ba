"""Training on small synthetic logs: the model learns a sequential pattern the baselines cannot, the
default scheme learns an ordinary next-item pattern, LoRA increments save and load, and
`streamrec eval` writes the report and its chart."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from walks import cycle_log

from streamrec.catalog import Catalog
from streamrec.datasets import LogEvent, Split, leave_one_out
from streamrec.events import CatalogItem
from streamrec.instructions import HistoryItem
from streamrec.lab.baselines import Popularity
from streamrec.model.blend import ItemKNN, Markov
from streamrec.ranking import rank_metrics
from streamrec.settings import TrainSettings

pytestmark = pytest.mark.model
pytest.importorskip("torch")

from streamrec.lab.offline import requests_for  # noqa: E402
from streamrec.model.training import cooccurrence_embeddings, train  # noqa: E402

PHASES = ["dawn", "noon", "dusk", "night", "frost", "bloom"]
SMALL = TrainSettings(
    batch_size=16,
    lr=3e-3,
    d_model=64,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    text_vocab=300,
    warmup=0.1,
    dropout=0.0,
    cold_start_share=0.0,
    eval_users=60,
)


def _series_log(series: int, seed: int = 0) -> tuple[Catalog, list[LogEvent]]:
    """Sagas of six episodes ("<name> dawn", "<name> noon", ... cyclic). Each saga is watched, in
    order from a random episode, by exactly one user: the episode that comes next was never seen
    by anyone in training, so only a model that reads item text and order can name it."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "zu", "ba", "fe"]
    names = sorted({a + b + c for a in syllables for b in syllables for c in "nrls"})
    rng.shuffle(names)
    items, events = [], []
    for s in range(series):
        items += [
            CatalogItem(item_id=f"s{s}e{e}", title=f"{names[s]} {p}", category="saga") for e, p in enumerate(PHASES)
        ]
        start = rng.randrange(6)
        for k in range(6):
            events.append(LogEvent(f"u{s}", f"s{s}e{(start + k) % 6}", float(k), "click", len(events)))
    return Catalog(items), events


def _hr10(lists: list[list[str]], split: Split, users: list[str], n_items: int) -> float:
    return rank_metrics(dict(zip(users, lists, strict=True)), split.targets("test"), n_items)["HR@10"]


def _baseline_hr10(split: Split, catalog: Catalog) -> dict[str, float]:
    users = sorted(split.test)
    out = {}
    for model in (Popularity(), ItemKNN(), Markov()):
        model.fit(split.train, catalog.ids)
        lists = [
            [s.item_id for s in model.recommend([h.item_id for h in r.history], r.exclude, 10)]
            for r in requests_for(split, "test", users)
        ]
        out[model.name] = _hr10(lists, split, users, len(catalog))
    return out


@pytest.mark.slow
def test_learns_a_sequential_pattern_the_baselines_cannot(tmp_path: Path) -> None:
    catalog, events = _series_log(150)
    split = leave_one_out(events)
    cfg = SMALL.model_copy(update={"epochs": 20, "patience": 4})
    rec, report = train(split, catalog, tmp_path / "m", cfg, scheme="title", device="cpu", progress=False)
    users = sorted(split.test)
    lists = [[s.item_id for s in lst] for lst in rec.recommend(requests_for(split, "test", users), k=10)]
    hr = _hr10(lists, split, users, len(catalog))
    baselines = _baseline_hr10(split, catalog)
    assert hr >= 0.7, report.history
    assert max(baselines.values()) <= 0.1, baselines
    assert all(item in catalog for lst in lists for item in lst)


def test_default_scheme_learns_next_item_and_lora_increment_reloads(tmp_path: Path) -> None:
    from streamrec.model.recommender import Recommender

    catalog, events = cycle_log(users=120, items=40, length=8)
    split = leave_one_out(events)
    cfg = SMALL.model_copy(update={"epochs": 5, "batch_size": 16, "d_model": 32, "d_ff": 64, "num_layers": 1})
    rec, report = train(split, catalog, tmp_path / "base", cfg, device="cpu", progress=False)
    users = sorted(split.test)
    lists = [[s.item_id for s in lst] for lst in rec.recommend(requests_for(split, "test", users), k=10)]
    assert _hr10(lists, split, users, len(catalog)) >= 0.9, report.history
    assert report.best_val_ndcg10 > 0.5 and report.epochs >= 1

    # A LoRA increment on top of the saved model: only the adapter is written, and it loads back.
    lora_cfg = cfg.model_copy(update={"epochs": 1})
    tuned, _ = train(
        split, catalog, tmp_path / "v1", lora_cfg, base=str(tmp_path / "base"), lora=True, device="cpu", progress=False
    )
    assert tuned.version.adapter == "v1"
    files = {p.name for p in (tmp_path / "v1").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    served = Recommender.load(str(tmp_path / "base"), "cpu")
    served.load_adapter(str(tmp_path / "v1"), version="v1")
    assert served.version.adapter == "v1"
    again = [[s.item_id for s in lst] for lst in served.recommend(requests_for(split, "test", users), k=10)]
    assert _hr10(again, split, users, len(catalog)) >= 0.8


@pytest.mark.slow
def test_eval_command_writes_report_and_chart(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from streamrec.cli import app
    from streamrec.datasets import Dataset, write_recbole

    catalog, events = cycle_log(users=80, items=30, length=8, seed=1)
    write_recbole(Dataset("cycle", events, catalog), tmp_path / "cycle.inter")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--data",
            str(tmp_path / "cycle.inter"),
            "--format",
            "recbole",
            "--out",
            str(out),
            "--epochs",
            "2",
            "--device",
            "cpu",
        ],
        env={
            "STREAMREC_TRAIN__D_MODEL": "32",
            "STREAMREC_TRAIN__D_FF": "64",
            "STREAMREC_TRAIN__NUM_LAYERS": "1",
            "STREAMREC_TRAIN__TEXT_VOCAB": "200",
            "STREAMREC_TRAIN__BATCH_SIZE": "64",
        },
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert {"dataset", "protocol", "users", "items", "device", "train_seconds", "models"} <= set(report)
    assert report["users"] == 80 and report["items"] == 30
    assert {"streamrec", "streamrec-t5", "popularity", "itemknn", "markov"} <= set(report["models"])
    for metrics in report["models"].values():
        assert {"HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR", "coverage@10"} <= set(metrics)
        assert 0.0 <= metrics["NDCG@10"] <= metrics["HR@10"] <= 1.0
    assert out.with_suffix(".png").stat().st_size > 1000


def _dense_ppmi_embeddings(seqs: dict[str, list[HistoryItem]], items: list[str], dim: int, window: int) -> Any:
    """The item vectors by the book: the dense positive-PMI matrix, then the same randomised SVD."""
    index = {item: n for n, item in enumerate(items)}
    n = len(items)
    co = np.zeros((n, n))
    for seq in seqs.values():
        ids = np.array([index[h.item_id] for h in seq if h.item_id in index], dtype=np.int64)
        for lag in range(1, window + 1):
            if len(ids) > lag:
                np.add.at(co, (ids[:-lag], ids[lag:]), 1.0 / lag)
    co += co.T
    row = co.sum(axis=1) + 1e-9
    pmi = np.log(np.maximum(co * co.sum() / row[:, None] / row[None, :], 1.0))
    rng = np.random.default_rng(0)
    k = min(dim, n)
    q, _ = np.linalg.qr(pmi @ rng.standard_normal((n, k + 8)).astype(np.float32))
    for _ in range(2):
        q, _ = np.linalg.qr(pmi @ (pmi.T @ q))
    u, sv, _ = np.linalg.svd(q.T @ pmi, full_matrices=False)
    vecs = (q @ u[:, :k]) * np.sqrt(sv[:k])[None, :]
    return vecs / (vecs.std() + 1e-9)


def test_item_vectors_come_from_the_sparse_pmi_as_from_the_dense_one() -> None:
    rng = random.Random(3)
    items = [f"i{k}" for k in range(60)]
    # Walks along the item order with jumps, repeats (an item next to itself) and an unknown item.
    seqs: dict[str, list[HistoryItem]] = {}
    for u in range(80):
        at, seq = rng.randrange(60), []
        for _ in range(rng.randint(2, 12)):
            seq.append(HistoryItem(items[at] if rng.random() > 0.05 else "gone"))
            at = (at + rng.choice([0, 1, 1, 2, 7])) % 60
        seqs[f"u{u}"] = seq
    got = cooccurrence_embeddings(seqs, items, 8, window=3)
    expected = _dense_ppmi_embeddings(seqs, items, 8, window=3)
    assert got.shape == (60, 8)
    np.testing.assert_allclose(got @ got.T, expected @ expected.T, atol=1e-4)


def test_item_vectors_for_a_million_items_need_only_the_pairs() -> None:
    n = 1_000_000
    items = [f"i{k}" for k in range(n)]
    seqs = {f"u{u}": [HistoryItem(f"i{(u * 7919 + j) % n}") for j in range(5)] for u in range(300)}
    vecs = cooccurrence_embeddings(seqs, items, 4, window=2)  # a dense PMI would be 8 TB
    assert vecs.shape == (n, 4) and np.isfinite(vecs).all() and vecs.any()
    # Only the 1,500 items some user had get a vector; the others (the last one among them) none,
    # up to the QR's rounding.
    norms = np.linalg.norm(vecs, axis=1)
    assert int((norms > 1e-6).sum()) <= 300 * 5 and norms[n - 1] < 1e-6 and norms[0] > 1e-3
