"""`streamrec replay` end to end on a small simulated log: the real broker, ingest, inference and
train workers, both runs, the report's shape and its bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamrec.catalog import Catalog
from streamrec.datasets import Dataset, LogEvent
from streamrec.lab import replay
from streamrec.lab.simulate import SimConfig, generate_events, make_catalog

pytestmark = [pytest.mark.kafka, pytest.mark.model, pytest.mark.slow]


def small_log() -> Dataset:
    cfg = SimConfig(users=25, items=60, categories=4, seed=11)
    events = [
        LogEvent(e.user_id, e.item_id, e.ts.timestamp(), e.type.value, n)
        for n, e in enumerate(generate_events(cfg, 700))
    ]
    return Dataset(name="sim-small", events=events, catalog=Catalog(make_catalog(cfg)))


def test_replay_scores_both_runs_and_records_the_trainers_increments(tmp_path: Path) -> None:
    dataset = small_log()
    out = tmp_path / "replay.json"
    online = {"interval_s": 1.0, "min_new_examples": 40, "holdout": 30, "gate_min_examples": 10, "epochs": 1}
    result = replay.run(dataset, out, windows=2, train_minutes=0.2, online=online, log=print)

    assert json.loads(out.read_text())["dataset"] == "sim-small"
    assert out.with_suffix(".png").is_file()
    replayed = result["events"]["replayed"]
    assert result["events"]["bootstrap"] + replayed == 700
    for mode in ("frozen", "online"):
        run = result[mode]
        assert run["missing_recommendations"] == 0, f"{mode}: a step never got its recommendation"
        total = run["all"]["scored"] + run["all"]["no_recommendation"]
        assert total == replayed
        # Almost every user has a history from the warm-up, so almost every event is scored.
        assert run["all"]["scored"] >= 0.9 * replayed
        assert sum(w["scored"] for w in run["windows"]) == run["all"]["scored"]
        assert 0.0 <= run["second_half"]["HR@10"] <= 1.0
        assert (out.parent / f"replay-{mode}-logs" / "ingest.log").is_file()
    assert set(result["frozen"]["served_by"]) == {"base"}, "the frozen run served an adapter"
    increments = result["online"]["increments"]
    assert increments, "the trainer never ran an increment during the online run"
    adapters = result["adapters"]
    assert adapters["promoted"] + adapters["refused"] == len(increments)
    promoted = {i["version"] for i in increments if i["version"]}
    assert set(result["online"]["served_by"]) <= {"base"} | promoted
    assert set(result["online_vs_frozen"]) >= {"second_half HR@10", "second_half NDCG@10"}
