"""Inference throughput: the same model on the same histories, batched and one user at a time,
measured side by side in one run, for the tiny T5 and for a random-weight Flan-T5-small shape.
Random weights are enough: speed does not depend on what the weights are. Times no training."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from streamrec.catalog import Catalog, ScoredItem
from streamrec.events import Event
from streamrec.instructions import Instructions, RecRequest
from streamrec.lab.bench import machine, write_report
from streamrec.lab.simulate import SimConfig, generate_events, make_catalog
from streamrec.model.flan import FLAN_T5_SMALL, build_flan_checkpoint
from streamrec.model.recommender import Recommender

K = 10
HISTORY = 20  # events per user history: each user's last ones


def make_requests(users: int, items: int = 500, seed: int = 1) -> tuple[Catalog, list[RecRequest]]:
    """A simulated catalog and one request per user: that user's last `HISTORY` events."""
    cfg = SimConfig(users=users, items=items, seed=seed)
    by_user: dict[str, list[Event]] = defaultdict(list)
    count = users * 30
    # Activity is heavy-tailed: a short stream can leave a few users without any event.
    while len(by_user) < users and count <= users * 2_000:
        by_user.clear()
        for event in generate_events(cfg, count):
            by_user[event.user_id].append(event)
        count *= 4
    requests = [RecRequest.from_events(evs[-HISTORY:]) for _, evs in sorted(by_user.items())]
    return Catalog(make_catalog(cfg)), requests[:users]


def build_tiny(catalog: Catalog, device: str) -> tuple[Recommender, dict[str, Any]]:
    rec = Recommender.build_tiny(catalog, device=device, scheme="item_token")
    return rec, {"built": "Recommender.build_tiny(catalog) with the default TinyConfig, random weights"}


def build_flan_shape(catalog: Catalog, device: str) -> tuple[Recommender, dict[str, Any]]:
    """A Flan-T5-small-shaped checkpoint (T5 v1.1 at flan-t5-small's dimensions, random weights, a
    SentencePiece-style Unigram tokenizer trained on the catalog text) written to a temporary
    directory and loaded by path, as `google/flan-t5-small` would be, under the `title` scheme."""
    instructions = Instructions.load()
    texts = [f"{i.title} {i.category or ''} {i.description or ''}" for i in catalog]
    texts += [t.text for ts in instructions.templates.values() for t in ts]
    # The words the renderer adds ("<title> purchase", "nothing yet"), which Flan's vocabulary has.
    texts += ["click purchase nothing yet unknown"]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_flan_checkpoint(Path(tmp) / "flan-t5-small-shape", texts, config=FLAN_T5_SMALL)
        rec = Recommender.load(str(path), device, scheme="title", catalog=catalog)
    titles = [len(rec.trie.path(i)) for i in rec.trie.items]
    return rec, {
        "built": "build_flan_checkpoint(config=FLAN_T5_SMALL): T5 v1.1 with random weights, loaded by path",
        "config": {k: v for k, v in FLAN_T5_SMALL.items() if not k.endswith("_token_id")},
        "parameters": sum(p.numel() for p in rec.model.parameters()),
        "tokenizer": f"Unigram trained on the catalog and templates ({len(rec.tokenizer)} tokens, T5's "
        f"conventions); the embedding and output layers are {FLAN_T5_SMALL['vocab_size']} wide",
        "identifier_tokens": {"mean": statistics.fmean(titles), "max": max(titles)},
    }


def _timed(fn: Callable[[], list[list[ScoredItem]]]) -> tuple[float, list[list[ScoredItem]]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def exhaustive_agreement(rec: Recommender, requests: Sequence[RecRequest], lists: Sequence[list[ScoredItem]]) -> float:
    """The share of `requests` whose list equals the exhaustive constrained search's."""
    exact = rec.exhaustive(requests, K)
    return sum([s.item_id for s in lst] == e for lst, e in zip(lists, exact, strict=True)) / max(len(requests), 1)


def measure(
    rec: Recommender,
    requests: Sequence[RecRequest],
    single_users: int,
    repeats: int,
    batch_size: int,
    exact_users: int = 0,
) -> dict[str, Any]:
    """Median users/s of one batched call over all `requests` and of one call per user over the
    first `single_users`, alternating so both see the same machine load; with `exact_users`, how
    many of the first ones get the exhaustive search's list (untimed)."""
    subset = list(requests[:single_users])
    # Warm-up: first calls pay for allocator growth, thread pools and lazy initialisation.
    rec.recommend(list(requests[:batch_size]), k=K, batch_size=batch_size)
    rec.recommend(subset[:1], k=K)
    batched_s: list[float] = []
    single_s: list[float] = []
    batched: list[list[ScoredItem]] = []
    single: list[list[ScoredItem]] = []
    for _ in range(repeats):
        seconds, batched = _timed(lambda: rec.recommend(list(requests), k=K, batch_size=batch_size))
        batched_s.append(seconds)
        seconds, single = _timed(lambda: [rec.recommend([r], k=K)[0] for r in subset])
        single_s.append(seconds)
    batched_rate = len(requests) / statistics.median(batched_s)
    single_rate = len(subset) / statistics.median(single_s)
    same_top = [bool(b) and bool(s) and b[0].item_id == s[0].item_id for b, s in zip(batched, single, strict=False)]
    return {
        "batched": {
            "users": len(requests),
            "batch_size": batch_size,
            "users_per_s": batched_rate,
            "seconds": batched_s,
        },
        "single": {"users": len(subset), "users_per_s": single_rate, "seconds": single_s},
        "speedup": batched_rate / single_rate,
        "top_item_agreement": sum(same_top) / len(same_top),
        **(
            {
                "exhaustive": {
                    "users": min(exact_users, len(batched)),
                    "same_lists": exhaustive_agreement(rec, requests[:exact_users], batched[:exact_users]),
                }
            }
            if exact_users
            else {}
        ),
    }


def run(
    out: Path,
    users: int = 256,
    repeats: int = 3,
    *,
    flan: bool = True,
    flan_users: int = 64,
    flan_single_users: int = 8,
    exact_users: int = 16,
    bf16: bool = True,
    items: int = 500,
    batch_size: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
    """The tiny model, and with `flan` the Flan-T5-small shape in fp32 and (with `bf16`) again with
    its weights in bf16; `exact_users` users of each are checked against the exhaustive search."""
    catalog, requests = make_requests(users, items)
    shapes: dict[str, Callable[[Catalog, str], tuple[Recommender, dict[str, Any]]]] = {"tiny": build_tiny}
    if flan:
        shapes["flan-t5-small shape"] = build_flan_shape
    results: dict[str, Any] = {}
    rows: list[tuple[str, str]] = []
    used_device = ""
    for name, build in shapes.items():
        rec, about = build(catalog, device)
        used_device = str(rec.device)
        # The Flan shape runs ~100x slower than tiny on a CPU: it is measured on the first users only
        # (batched still in full batches of `batch_size` when flan_users allows, so the batched rate holds).
        shape_users = requests if name == "tiny" else requests[:flan_users]
        single_users = len(shape_users) if name == "tiny" else min(flan_single_users, len(shape_users))
        runs = [(name, torch.float32)]
        if name != "tiny" and bf16:
            runs.append((f"{name} bf16", torch.bfloat16))
        reference: list[list[str]] = []
        for label, dtype in runs:
            rec.model.to(dtype)
            figures = measure(rec, shape_users, single_users, repeats, batch_size, min(exact_users, len(shape_users)))
            results[label] = {"scheme": rec.scheme, "dtype": str(dtype).removeprefix("torch."), **about, **figures}
            lists = [[s.item_id for s in lst] for lst in rec.recommend(list(shape_users), k=K)]
            if dtype == torch.float32:
                reference = lists
            else:
                same = sum(a == b for a, b in zip(lists, reference, strict=True)) / len(lists)
                results[label]["same_lists_as_float32"] = same
            if len(shape_users) < len(requests):
                results[label]["batched"]["note"] = (
                    f"over the first {len(shape_users)} users only, to keep the run short"
                )
            if single_users < len(requests):
                results[label]["single"]["note"] = (
                    f"one user at a time over the first {single_users} users only, to keep the run short"
                )
            rows += [
                (f"{label} batched users/s", f"{figures['batched']['users_per_s']:,.1f}"),
                (f"{label} single users/s", f"{figures['single']['users_per_s']:,.1f}"),
                (f"{label} speedup", f"{figures['speedup']:.1f}x"),
            ]
            if "exhaustive" in figures:
                rows.append((f"{label} lists = exhaustive search", f"{figures['exhaustive']['same_lists']:.0%}"))
        del rec
    report = {
        "benchmark": "infer",
        "users": len(requests),
        "history_events": HISTORY,
        "catalog_items": len(catalog),
        "k": K,
        "repeats": repeats,
        "statistic": "median of the repeats; batched and single runs alternate within one process",
        "models": results,
        "device": used_device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": machine(),
    }
    write_report(report, out, rows, title=f"inference benchmark ({used_device}, {torch.get_num_threads()} threads)")
    return report
