"""The Flan-shaped checkpoint the tests share (streamrec.model.flan, small dimensions), built from the
walk catalog's text (tests/walks.py), and its bootstrap on the walk pattern with titles."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from walks import ITEMS, cycle_log

from streamrec.catalog import Catalog
from streamrec.datasets import LogEvent
from streamrec.settings import TrainSettings

# The Unigram tokenizer asked for 600 tokens; the walk catalog fills about 280 of them, so the model
# (384 rows, a multiple of 128 like Flan's 32,128) is wider than its tokenizer, as Flan's is.
VOCAB = 600
# Enough for the small Flan shape to learn the walk (title scheme) in about 6 s on one core.
BOOTSTRAP = TrainSettings(
    epochs=10,
    batch_size=16,
    finetune_lr=1e-2,
    lora_lr=1e-2,
    warmup=0.1,
    cold_start_share=0.0,
    eval_users=30,
    patience=10,
)


def walk_log(users: int = 60, length: int = 8) -> tuple[Catalog, list[LogEvent]]:
    """The walk catalog (item k is "thing k") and users walking it."""
    return cycle_log(users, ITEMS, length)


def corpus(catalog: Catalog) -> list[str]:
    """What a Flan tokenizer would know: the catalog's text and the packaged instructions."""
    from streamrec.instructions import Instructions

    templates = Instructions.load().templates
    return [
        *(f"{i.title} {i.category or ''}" for i in catalog),
        *(t.text for ts in templates.values() for t in ts),
        "click purchase nothing yet",
    ]


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: for models this small a second thread costs more in synchronisation than
    it saves, and far more on a machine whose cores other processes are using."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_flan(out: Path) -> Path:
    """A plain Flan-shaped hub directory (random weights) over the walk catalog's text."""
    from streamrec.model.flan import build_flan_checkpoint

    catalog, _ = walk_log()
    return build_flan_checkpoint(out, corpus(catalog), vocab_size=VOCAB)


def bootstrap(base: Path, out: Path, epochs: int = BOOTSTRAP.epochs, **options: Any) -> tuple[Path, Any]:
    """`streamrec train --base BASE` (options: scheme, lora) on the walk log: (directory, report)."""
    from streamrec.datasets import leave_one_out
    from streamrec.model.training import train

    catalog, events = walk_log()
    cfg = BOOTSTRAP.model_copy(update={"epochs": epochs})
    with one_thread():
        _, report = train(
            leave_one_out(events), catalog, out, cfg, base=str(base), device="cpu", progress=False, **options
        )
    return out, report
