"""Inference throughput: the same model on the same histories, batched and one user at a time,
measured side by side in one run, for the tiny T5 and for a random-weight Flan-T5-small shape.
Random weights are enough: speed does not depend on what the weights are. Times no training."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import T5Config, T5ForConditionalGeneration

from streamrec.catalog import Catalog, ScoredItem
from streamrec.events import Event
from streamrec.instructions import RecRequest
from streamrec.lab.bench import machine, write_report
from streamrec.lab.simulate import SimConfig, generate_events, make_catalog
from streamrec.model.recommender import Recommender, TinyConfig

K = 10
HISTORY = 20  # events per user history: each user's last ones

# google/flan-t5-small's config.json, the dimensions that decide speed.
FLAN_T5_SMALL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 1024,
    "num_layers": 8,
    "num_decoder_layers": 8,
    "num_heads": 6,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "tie_word_embeddings": False,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


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
    """Flan-T5-small's dimensions with random weights under the `title` scheme. The tokenizer is
    the one build_tiny trains on the catalog (Flan's SentencePiece is not available offline), so
    titles may split into a different number of tokens than with the real model."""
    # A throwaway tiny model just for its tokenizer and templates; the T5 itself is built below.
    donor = Recommender.build_tiny(
        catalog,
        config=TinyConfig(d_model=16, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=1),
        device=device,
        scheme="title",
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**FLAN_T5_SMALL))
    rec = Recommender(
        model,
        donor.tokenizer,
        scheme="title",
        instructions=donor.instructions,
        device=donor.device,
        base="flan-t5-small-shape",
        max_input_tokens=512,
    )
    rec.set_catalog(catalog)
    titles = [len(rec.trie.path(i)) for i in rec.trie.items]
    return rec, {
        "built": "T5ForConditionalGeneration(T5Config(flan-t5-small dims)) with random weights",
        "config": {k: v for k, v in FLAN_T5_SMALL.items() if not k.endswith("_token_id")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": f"BPE trained on the catalog by build_tiny ({len(rec.tokenizer)} tokens), not Flan's "
        "SentencePiece; the embedding and output layers are still 32128 wide",
        "identifier_tokens": {"mean": statistics.fmean(titles), "max": max(titles)},
    }


def _timed(fn: Callable[[], list[list[ScoredItem]]]) -> tuple[float, list[list[ScoredItem]]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(
    rec: Recommender, requests: Sequence[RecRequest], single_users: int, repeats: int, batch_size: int
) -> dict[str, Any]:
    """Median users/s of one batched call over all `requests` and of one call per user over the
    first `single_users`, alternating so both see the same machine load."""
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
    }


def run(
    out: Path,
    users: int = 256,
    repeats: int = 3,
    *,
    flan: bool = True,
    flan_users: int = 64,
    flan_single_users: int = 8,
    items: int = 500,
    batch_size: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
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
        figures = measure(rec, shape_users, single_users, repeats, batch_size)
        results[name] = {"scheme": rec.scheme, **about, **figures}
        if len(shape_users) < len(requests):
            results[name]["batched"]["note"] = f"over the first {len(shape_users)} users only, to keep the run short"
        if single_users < len(requests):
            results[name]["single"]["note"] = (
                f"one user at a time over the first {single_users} users only, to keep the run short"
            )
        rows += [
            (f"{name} batched users/s", f"{figures['batched']['users_per_s']:,.1f}"),
            (f"{name} single users/s", f"{figures['single']['users_per_s']:,.1f}"),
            (f"{name} speedup", f"{figures['speedup']:.1f}x"),
            (f"{name} same top item", f"{figures['top_item_agreement']:.0%}"),
        ]
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
