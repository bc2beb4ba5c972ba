"""The walk pattern the online tests share (after item k comes item k+1, around a 30-item catalog)
and the tiny model trained on it."""

from __future__ import annotations

import random
from pathlib import Path

from streamrec.catalog import Catalog
from streamrec.datasets import LogEvent
from streamrec.events import CatalogItem

ITEMS = 30
CATALOG_ITEMS = [CatalogItem(item_id=f"i{k}", title=f"thing {k}", category="stuff") for k in range(ITEMS)]


def walk(start: int, length: int) -> list[str]:
    """The learnable pattern: after item k comes item k+1 (around the catalog)."""
    return [f"i{(start + t) % ITEMS}" for t in range(length)]


def cycle_log(users: int, items: int, length: int, seed: int = 0) -> tuple[Catalog, list[LogEvent]]:
    """Users walk a fixed route through an `items`-item catalog (item k, then k+1, ...) from random
    starts: (catalog, events)."""
    rng = random.Random(seed)
    catalog = Catalog(CatalogItem(item_id=f"i{k}", title=f"thing {k}", category="stuff") for k in range(items))
    events = []
    for u in range(users):
        start = rng.randrange(items)
        for t in range(length):
            events.append(LogEvent(f"u{u}", f"i{(start + t) % items}", float(t), "click", len(events)))
    return catalog, events


def train_walk_model(out: Path, scheme: str = "item_token") -> Path:
    """A tiny model that knows the pattern, saved like a hub checkpoint (about 20 s on 2 cores)."""
    from streamrec.datasets import leave_one_out
    from streamrec.model.training import train
    from streamrec.settings import TrainSettings

    rng = random.Random(0)
    events: list[LogEvent] = []
    for u in range(100):
        for t, item in enumerate(walk(rng.randrange(ITEMS), 8)):
            events.append(LogEvent(f"u{u}", item, float(t), "click", len(events)))
    cfg = TrainSettings(
        epochs=4 if scheme == "item_token" else 8,
        batch_size=16,
        lr=3e-3,
        d_model=32,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        text_vocab=300,
        warmup=0.1,
        dropout=0.0,
        cold_start_share=0.0,
        eval_users=60,
    )
    split, catalog = leave_one_out(events), Catalog(CATALOG_ITEMS)
    _, report = train(split, catalog, out, cfg, device="cpu", progress=False, log=print, scheme=scheme)  # type: ignore[arg-type]
    assert report.best_val_ndcg10 > 0.7, report.history
    return out
