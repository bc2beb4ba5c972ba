"""The inference benchmark on a handful of users: the report has its figures, and the batched and
the one-user-at-a-time paths rank the same top item (they do the same work). No timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

pytest.importorskip("torch")
from streamrec.lab.bench.infer import run  # noqa: E402


@pytest.mark.parametrize("flan", [False, True], ids=["tiny", "tiny+flan-shape"])
def test_bench_infer_report(tmp_path: Path, flan: bool) -> None:
    out = tmp_path / "bench-infer.json"
    report = run(out, users=6, repeats=1, flan=flan, flan_users=2, flan_single_users=1, exact_users=2, batch_size=4)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    assert report["benchmark"] == "infer"
    assert report["users"] == 6
    assert report["device"] == "cpu"
    assert report["torch_threads"] >= 1
    assert "cpus_usable" in report["machine"]
    assert set(report["models"]) == ({"tiny", "flan-t5-small shape", "flan-t5-small shape bf16"} if flan else {"tiny"})
    for figures in report["models"].values():
        assert figures["batched"]["users_per_s"] > 0
        assert figures["single"]["users_per_s"] > 0
        assert len(figures["batched"]["seconds"]) == len(figures["single"]["seconds"]) == 1
        assert figures["speedup"] == pytest.approx(figures["batched"]["users_per_s"] / figures["single"]["users_per_s"])
        assert 0.0 <= figures["top_item_agreement"] <= 1.0
        assert figures["exhaustive"]["users"] == 2

    tiny = report["models"]["tiny"]
    assert tiny["scheme"] == "item_token"
    assert tiny["batched"]["users"] == tiny["single"]["users"] == 6
    assert tiny["top_item_agreement"] == 1.0
    assert tiny["exhaustive"]["same_lists"] == 1.0  # one-step ranking is exact
    if flan:
        shape = report["models"]["flan-t5-small shape"]
        assert shape["scheme"] == "title" and shape["dtype"] == "float32"
        assert shape["exhaustive"]["same_lists"] == 1.0
        assert report["models"]["flan-t5-small shape bf16"]["dtype"] == "bfloat16"
        assert 0.0 <= report["models"]["flan-t5-small shape bf16"]["same_lists_as_float32"] <= 1.0
        assert shape["config"]["d_model"] == 512 and shape["config"]["vocab_size"] == 32128
        assert shape["batched"]["users"] == 2 and shape["single"]["users"] == 1
        assert "note" in shape["single"]
