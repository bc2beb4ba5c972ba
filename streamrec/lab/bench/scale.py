"""Catalog scale: for simulated catalogs of growing size (titles included) and one simulated user
population, per identifier scheme, one inference worker's resident memory (model, blend, trie and
catalog), batched users/s, the time to fit the blend and, for schemes whose items get codes, to
assign them. Each size is prepared and each worker measured in a fresh subprocess, so one size's
memory never counts in another's. The model has untrained tiny weights grown to the catalog: time and
memory do not depend on what the weights are."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.catalog import Catalog, SchemeName
from streamrec.events import CatalogItem
from streamrec.instructions import HistoryItem, RecRequest
from streamrec.lab.bench import machine
from streamrec.lab.simulate import CATEGORIES

SIZES = (10_000, 100_000, 1_000_000)
SCHEMES: tuple[SchemeName, ...] = ("item_token", "title", "semantic")
USERS = 100_000
EVENTS_PER_USER = 20  # each simulated user's history: what the blend is fitted on
TIMED_USERS = 512  # requests timed per worker (their histories: simulated users' last events)
BATCH = 64
HISTORY = "histories.json"
FIT = "fit.json"


def semantic_codes(catalog: Catalog, train: dict[str, list[HistoryItem]]) -> Any:
    """What `streamrec train --scheme semantic` fits before the model: the codebook and every item's
    code, from its text and its co-occurrence in `train` (timed as `codes_s`)."""
    from streamrec.datasets import Split
    from streamrec.model.training import semantic_ids

    return semantic_ids(Split(train, {}, {}), catalog)


# Schemes whose items get codes: the fit is timed as `codes_s` on the size's catalog and handed to
# the model. Schemes without codes report null.
CODES: dict[str, Callable[[Catalog, dict[str, list[HistoryItem]]], Any]] = {"semantic": semantic_codes}

_BRANDS = ("Acme", "Northwind", "Bluebird", "Everpeak", "Solace", "Kestrel", "Umbra", "Verdant", "Lumen", "Wren")
_ADJECTIVES = ("classic", "compact", "deluxe", "eco", "light", "modern", "pro", "smart", "sport", "ultra")


def scale_catalog(items: int, seed: int = 0) -> list[CatalogItem]:
    """`items` catalog items with titles (brand, adjective, a category noun and a model number, so
    every title is unique), a category, a short description, 2% unavailable. Fast at 10^6: no
    per-pair work, unlike the traffic simulator's world."""
    rng = np.random.default_rng(seed)
    cats = list(CATEGORIES)
    cat = rng.integers(0, len(cats), items)
    noun = rng.integers(0, 7, items)
    brand = rng.integers(0, len(_BRANDS), items)
    adj = rng.integers(0, len(_ADJECTIVES), items)
    gone = rng.random(items) < 0.02
    out = []
    for k in range(items):
        c = cats[cat[k]]
        nouns = CATEGORIES[c]
        n = nouns[noun[k] % len(nouns)]
        b, a = _BRANDS[brand[k]], _ADJECTIVES[adj[k]]
        out.append(
            CatalogItem(
                item_id=f"i{k}",
                title=f"{b} {a.capitalize()} {n.title()} {k}",
                category=c,
                description=f"{a.capitalize()} {n} by {b}.",
                available=not gone[k],
            )
        )
    return out


def simulate_histories(items: int, users: int, length: int, seed: int = 0) -> np.ndarray:
    """A (users, length) array of item positions: each step follows the item's series (the next
    item) with probability 0.4, else a Zipf-popular item, so both blend signals have structure."""
    rng = np.random.default_rng(seed + 1)
    rank = rng.permutation(items)  # popularity rank -> item

    def popular(size: int) -> np.ndarray:
        return rank[np.minimum(rng.zipf(1.3, size) - 1, items - 1)]

    out = np.zeros((users, length), dtype=np.int64)
    out[:, 0] = popular(users)
    for t in range(1, length):
        follow = rng.random(users) < 0.4
        out[:, t] = np.where(follow, (out[:, t - 1] + 1) % items, popular(users))
    return out


def _rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kB on Linux


def prepare(items: int, users: int, schemes: Sequence[str], out: Path, timed: int) -> None:
    """In a subprocess: the size's catalog, histories and blend (timed), and a saved model per scheme
    (its catalog, blend and templates beside it, as `streamrec train` writes one)."""
    from streamrec.model.blend import Blend, ItemKNN, Markov
    from streamrec.model.recommender import Recommender
    from streamrec.settings import ModelSettings

    catalog = Catalog(scale_catalog(items))
    ids = catalog.ids
    hist = simulate_histories(items, users, EVENTS_PER_USER)
    train = {f"u{u}": [HistoryItem(ids[c]) for c in row] for u, row in enumerate(hist.tolist())}
    cfg = ModelSettings()
    start = time.perf_counter()
    knn = ItemKNN(window=cfg.blend_window, decay=cfg.blend_decay).fit(train, ids)
    markov = Markov().fit(train, ids)
    fit_s = time.perf_counter() - start
    assert isinstance(knn, ItemKNN) and isinstance(markov, Markov)
    blend = Blend(knn, markov, 0.3, 0.2)
    codes: dict[str, float] = {}
    fitted: dict[str, Any] = {}
    for scheme in schemes:
        if scheme in CODES:
            start = time.perf_counter()
            fitted[scheme] = CODES[scheme](catalog, train)
            codes[scheme] = time.perf_counter() - start
    picked = np.random.default_rng(2).choice(users, size=min(timed, users), replace=False)
    (out / HISTORY).write_text(json.dumps([[ids[c] for c in hist[u]] for u in picked.tolist()]))
    fit = {
        "blend_fit_s": fit_s,
        "codes_s": codes,
        "events": int(hist.size),
        "knn_neighbour_entries": int(knn.indices.size),
        "markov_entries": int(markov.indices.size),
        "available": len(catalog.available_ids),
    }
    (out / FIT).write_text(json.dumps(fit))
    del train, hist
    gc.collect()
    for scheme in schemes:
        rec = Recommender.build_tiny(catalog, device="cpu", scheme=scheme, semantic=fitted.get(scheme))  # type: ignore[arg-type]
        rec.set_blend(blend)
        rec.save(out / scheme)
        del rec
        gc.collect()


def serve(model_dir: Path, histories: Path, batch: int, threads: int = 0) -> dict[str, Any]:
    """In a fresh subprocess: load the saved model, catalog and blend as an inference worker does,
    then time `recommend` batched on the histories (one warm-up batch first). `threads`: torch's
    (0: the usable cores)."""
    import torch

    from streamrec.model.recommender import Recommender

    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))

    start_rss = _rss()
    start = time.perf_counter()
    rec = Recommender.load(str(model_dir), "cpu", batch_size=batch)
    load_s = time.perf_counter() - start
    gc.collect()
    loaded_rss = _rss()
    requests = [
        RecRequest(tuple(HistoryItem(i) for i in row), frozenset(row[-3:])) for row in json.loads(histories.read_text())
    ]
    rec.recommend(requests[:batch], k=10)
    start = time.perf_counter()
    lists = rec.recommend(requests, k=10)
    elapsed = time.perf_counter() - start
    assert all(len(x) == 10 for x in lists)
    return {
        "rss_bytes": loaded_rss,
        "rss_start_bytes": start_rss,
        "peak_rss_bytes": _peak_rss(),
        "after_serving_rss_bytes": _rss(),
        "load_s": load_s,
        "timed_users": len(requests),
        "users_per_s": len(requests) / elapsed,
        "embedding_rows": int(rec.model.get_input_embeddings().weight.shape[0]),
        "trie_items": len(rec.trie),
        "trie_max_len": rec.trie.max_len,
        "torch_threads": torch.get_num_threads(),
    }


def _child(args: list[str], timeout_s: float) -> str:
    """Run this module's `_main` in a fresh interpreter; its last stdout line."""
    cmd = [sys.executable, "-c", "from streamrec.lab.bench.scale import _main; _main()", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench scale step {args[0]} failed ({done.returncode}): {done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def _main() -> None:
    """The subprocess side: `prepare ITEMS USERS SCHEMES DIR TIMED` or `serve DIR HISTORIES BATCH THREADS`."""
    step, *rest = sys.argv[1:]
    if step == "prepare":
        prepare(int(rest[0]), int(rest[1]), rest[2].split(","), Path(rest[3]), int(rest[4]))
        print("{}")
    else:
        print(json.dumps(serve(Path(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]))))


def run(
    out: Path,
    *,
    sizes: Sequence[int] = SIZES,
    users: int = USERS,
    schemes: Sequence[str] = SCHEMES,
    timed: int = TIMED_USERS,
    batch: int = BATCH,
    threads: int = 0,
    timeout_s: float = 3600.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every (scheme, size); write the JSON report to `out` and print a table."""
    runs: list[dict[str, Any]] = []
    for items in sizes:
        with tempfile.TemporaryDirectory(prefix=f"streamrec-scale-{items}-") as tmp:
            log(f"{items:,} items: catalog, {users:,} users' histories, blend fit, models ({', '.join(schemes)})")
            _child(["prepare", str(items), str(users), ",".join(schemes), tmp, str(timed)], timeout_s)
            fit = json.loads((Path(tmp) / FIT).read_text())
            for scheme in schemes:
                log(f"{items:,} items, {scheme}: a fresh worker loads and serves")
                args = ["serve", str(Path(tmp) / scheme), str(Path(tmp) / HISTORY), str(batch), str(threads)]
                figures = json.loads(_child(args, timeout_s))
                runs.append(
                    {
                        "scheme": scheme,
                        "items": items,
                        "users": users,
                        "rss_bytes": figures.pop("rss_bytes"),
                        "users_per_s": figures.pop("users_per_s"),
                        "blend_fit_s": fit["blend_fit_s"],
                        "codes_s": fit["codes_s"].get(scheme),
                        **figures,
                        "events": fit["events"],
                        "knn_neighbour_entries": fit["knn_neighbour_entries"],
                        "markov_entries": fit["markov_entries"],
                    }
                )
    report = {
        "benchmark": "scale",
        "runs": runs,
        "machine": machine(),
        "model": "Recommender.build_tiny (the default TinyConfig) with untrained weights, grown to the catalog "
        "(one token per item under item_token); saved, then loaded by a fresh process as a worker does",
        "rss": "rss_bytes: resident memory of the worker process once the model, catalog, blend and trie are "
        "loaded; peak_rss_bytes: its peak, loading and serving included",
        "batch_size": batch,
        "blend": "item-kNN (STREAMREC_MODEL__BLEND_WINDOW / __BLEND_DECAY defaults, 200 neighbours) and Markov, "
        f"fitted on {EVENTS_PER_USER} events per user; blend_fit_s is one fit per size, shared by the schemes",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    _table(runs)
    log(f"written to {out}")
    return report


def _table(runs: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="streamrec bench scale")
    for name in ("scheme", "items", "RSS", "peak RSS", "users/s", "blend fit", "codes"):
        table.add_column(name, justify="left" if name == "scheme" else "right")
    for r in runs:
        codes = "-" if r["codes_s"] is None else f"{r['codes_s']:.1f} s"
        table.add_row(
            r["scheme"],
            f"{r['items']:,}",
            f"{r['rss_bytes'] / 2**30:.2f} GiB",
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB",
            f"{r['users_per_s']:,.1f}",
            f"{r['blend_fit_s']:.1f} s",
            codes,
        )
    Console().print(table)
