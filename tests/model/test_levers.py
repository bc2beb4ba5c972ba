"""The in-process levers benchmark on the tiny walk model: it ranks exactly as the served model does,
and on a stream whose pattern changes, refitting the blend online beats the frozen one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from walks import CATALOG_ITEMS, ITEMS

from streamrec.catalog import Catalog
from streamrec.datasets import Dataset, LogEvent
from streamrec.instructions import HistoryItem
from streamrec.lab.prequential import plan
from streamrec.model.blend import Blend, ItemKNN, Markov

pytest.importorskip("torch")

from streamrec.lab.bench.levers import Stream, ranked, run
from streamrec.model.recommender import Recommender

CATALOG = Catalog(CATALOG_ITEMS)


def turning(users: int, steps: int) -> list[LogEvent]:
    """The first users walk the pattern (k, k+1, ...), the later ones stride it (k, k+7, ...)."""
    events: list[LogEvent] = []
    for half, direction in ((0, 1), (1, 7)):
        for u in range(users):
            start = (u * 7) % ITEMS
            for t in range(steps):
                item = f"i{(start + direction * t) % ITEMS}"
                ts = half * 10_000 + t * users + u
                events.append(LogEvent(f"{half}-{u}", item, float(ts), "click", len(events)))
    return events


@pytest.fixture
def blended(tmp_path: Path, walk_model: Path) -> tuple[Path, Dataset]:
    dataset = Dataset("turning", turning(30, 12), CATALOG)
    boot = plan(dataset.events, 0.5, 5).bootstrap
    seqs: dict[str, list[HistoryItem]] = {}
    for e in boot:
        seqs.setdefault(e.user_id, []).append(HistoryItem(e.item_id))
    model = tmp_path / "model"
    shutil.copytree(walk_model, model)
    knn, markov = ItemKNN(recent=3, window=2).fit(seqs, CATALOG.ids), Markov().fit(seqs, CATALOG.ids)
    assert isinstance(knn, ItemKNN) and isinstance(markov, Markov)
    Blend(knn, markov, 0.3, 0.3).save(str(model / "blend.npz"))
    return model, dataset


def test_the_bench_ranks_as_the_served_model_does(blended: tuple[Path, Dataset]) -> None:
    model, dataset = blended
    rec = Recommender.load(str(model), "cpu", catalog=CATALOG)
    assert rec.blend is not None
    stream = Stream(dataset, plan(dataset.events, 0.5, 5), rec)
    rows = stream.todo[:120]
    served = rec.recommend([stream.request(i) for i in rows], k=10)
    same = sum(
        ranked(stream, rec.blend, stream.p_model, i) == tuple(s.item_id for s in lst)
        for i, lst in zip(rows, served, strict=True)
    )
    assert same >= 0.95 * len(rows), f"{same} of {len(rows)} lists as served"


def test_refitting_the_blend_online_follows_the_new_pattern(blended: tuple[Path, Dataset], tmp_path: Path) -> None:
    model, dataset = blended
    out = tmp_path / "levers.json"
    result = run(dataset, model, out, every=40, tune=60)
    second = {name: r["second_half"]["HR@10"] for name, r in result["runs"].items()}
    assert second["refit"] > second["frozen"] + 0.1, second
    # The blend's weights, chosen again on the new pattern, lean on the signals that learned it.
    ndcg = {name: r["second_half"]["NDCG@10"] for name, r in result["runs"].items()}
    assert ndcg["refit+weights"] > ndcg["refit"], ndcg
    assert set(second) == {"frozen", "refit", "refit+weights"}
    assert json.loads(out.read_text())["second_half_HR@10_vs_frozen"]["frozen"] == 1.0
