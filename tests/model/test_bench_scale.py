"""The scale benchmark at a tiny size: one record per scheme and size with every figure, measured
by fresh worker processes that load what the preparing process saved. No timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

pytest.importorskip("torch")
from streamrec.lab.bench.scale import run, scale_catalog, simulate_histories  # noqa: E402


def test_bench_scale_report(tmp_path: Path) -> None:
    out = tmp_path / "bench-scale.json"
    report = run(out, sizes=[600], users=200, timed=8, batch=4, log=lambda _: None)

    assert json.loads(out.read_text()) == report
    assert "cpus_usable" in report["machine"]
    assert [(r["scheme"], r["items"]) for r in report["runs"]] == [
        ("item_token", 600),
        ("title", 600),
        ("semantic", 600),
    ]
    for r in report["runs"]:
        assert {"scheme", "items", "users", "rss_bytes", "users_per_s", "blend_fit_s", "codes_s"} <= set(r)
        assert r["users"] == 200 and r["timed_users"] == 8
        assert (r["codes_s"] is None) == (r["scheme"] != "semantic"), r  # only semantic ids are fitted
        assert 0 < r["rss_start_bytes"] < r["rss_bytes"] <= r["peak_rss_bytes"]
        assert r["users_per_s"] > 0 and r["blend_fit_s"] > 0
        # The worker serves what was saved: every available item, under its scheme.
        assert r["trie_items"] == sum(i.available for i in scale_catalog(r["items"]))
        assert r["events"] == 200 * 20 and r["knn_neighbour_entries"] > 0 and r["markov_entries"] > 0
    token, title, semantic = report["runs"]
    assert token["embedding_rows"] > 600 and token["trie_max_len"] == 2  # a token per item, then EOS
    assert title["embedding_rows"] < token["embedding_rows"] and title["trie_max_len"] > 2
    assert semantic["codes_s"] > 0 and semantic["trie_max_len"] == 5  # 4 code tokens, then EOS
    # The text vocabulary plus a few dozen code tokens (17 per level at 600 items), not a row per item.
    assert 0 < semantic["embedding_rows"] - title["embedding_rows"] < 100


def test_the_simulated_catalog_names_every_item_uniquely_and_histories_follow_series() -> None:
    items = scale_catalog(2000)
    assert len({i.title for i in items}) == len({i.item_id for i in items}) == 2000
    assert 0 < sum(not i.available for i in items) < 100
    hist = simulate_histories(2000, 500, 20)
    assert hist.shape == (500, 20) and hist.min() >= 0 and hist.max() < 2000
    follows = (hist[:, 1:] == (hist[:, :-1] + 1) % 2000).mean()
    assert 0.3 < follows < 0.6
