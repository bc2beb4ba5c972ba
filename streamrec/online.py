"""One online increment, top to bottom: split the feedback into fresh, replay and held-out examples;
load the base model with the adapter in service (trainable, so the increment continues it) and the
blend served with it; score it on the held-out examples; train; refit the blend's item-kNN / Markov
statistics on the feedback store (the held-out examples excepted); score the candidate, adapter and
blend together, on the same examples; let the gate decide; register and promote the candidate (its
blend inside the adapter directory, under the manifest's sha256) when it passes. Runs in the train
worker's training thread, never on the event loop; announcing a promotion on Kafka is the caller's job."""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from streamrec.catalog import Catalog
from streamrec.errors import ModelError
from streamrec.feedback import FeedbackExample, Mark, example_order, split_fresh_replay, user_sequences
from streamrec.gate import GateDecision, decide, holdout_metrics
from streamrec.instructions import RecRequest, TrainingPair, excluded, task_for
from streamrec.registry import BLEND, AdapterRegistry, Manifest
from streamrec.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Increment:
    """What one increment did. `manifest` is set when the candidate was promoted."""

    decision: GateDecision
    fresh: int
    replay: int
    holdout: int
    through: datetime | None  # the newest event time trained on
    parent: str | None
    consumed: int = 0  # the leading arrivals this increment used up (all but the held-out ones)
    consumed_fresh: int = 0  # the fresh ones among them
    manifest: Manifest | None = None
    seconds: float = 0.0
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision.as_dict(),
            "fresh": self.fresh,
            "replay": self.replay,
            "holdout": self.holdout,
            "consumed_fresh": self.consumed_fresh,
            "through": None if self.through is None else self.through.isoformat(),
            "parent": self.parent,
            "version": None if self.manifest is None else self.manifest.version,
            "seconds": round(self.seconds, 2),
            "train_seconds": round(self.train_seconds, 2),
        }


INCREMENTS_LOG = "increments.jsonl"
CURSOR_FILE = "trainer.json"


def increments_path(settings: Settings) -> Path:
    """One JSON line per increment (gate decision, sizes, version), for operators, the demo and `replay`."""
    return settings.data_dir / INCREMENTS_LOG


def append_increment(settings: Settings, result: Increment) -> None:
    record = {"at": datetime.now().astimezone().isoformat(), **result.as_dict()}
    with increments_path(settings).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_increments(settings: Settings) -> list[dict[str, Any]]:
    path = increments_path(settings)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Cursor:
    """How far the trainer has consumed the feedback store (a `Mark`), kept on disk: after a restart
    the trainer goes on from there instead of treating every stored example as fresh. Files written
    before arrival numbers hold only `through`; the first increment after an upgrade then goes by
    event time, once."""

    def __init__(self, settings: Settings) -> None:
        self.path = settings.data_dir / CURSOR_FILE

    def get(self) -> Mark:
        try:
            stored = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return Mark()
        through = stored.get("through")
        return Mark(
            arrival=stored.get("arrival"),
            through=None if through is None else datetime.fromisoformat(through),
            fresh_total=int(stored.get("fresh_total", 0)),
        )

    def set(self, mark: Mark) -> None:
        tmp = self.path.with_suffix(".tmp")
        record = {
            "arrival": mark.arrival,
            "through": None if mark.through is None else mark.through.isoformat(),
            "fresh_total": mark.fresh_total,
        }
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)


def advance(mark: Mark, arrived: Sequence[int], result: Increment) -> Mark:
    """The mark after `result`: through the last arrival it consumed (the held-out ones stay fresh
    for the next increment). `arrived` are the arrival numbers of the examples it was given."""
    last = arrived[result.consumed - 1] if result.consumed else None
    through = max((t for t in (mark.through, result.through) if t is not None), default=None)
    return Mark(
        arrival=max(last, mark.arrival or 0) if last is not None else mark.arrival,
        through=through,
        fresh_total=mark.fresh_total + result.consumed_fresh,
    )


def score(rec: Any, examples: Sequence[FeedbackExample], exclude_seen: bool) -> dict[str, float]:
    """HR/NDCG@5/10, MRR, coverage of `rec` (as served: its task, its blend) on `examples`."""
    requests = [RecRequest(e.history, excluded(e.history, exclude_seen)) for e in examples]
    lists = rec.recommend(requests, k=10)
    ranked = {e.event_id: [s.item_id for s in lst] for e, lst in zip(examples, lists, strict=True)}
    return holdout_metrics(ranked, examples, max(1, len(rec.catalog)))


def cap(
    train: Sequence[FeedbackExample],
    fresh: Callable[[FeedbackExample], bool] | None,
    most: int,
    replay_share: float,
    rng: random.Random,
) -> list[FeedbackExample]:
    """At most `most` training examples with the replay share kept: the newest fresh ones, and a
    sample of the replayed (older) ones in proportion. Time order."""
    if len(train) <= most:
        return list(train)
    new = [e for e in train if fresh is None or fresh(e)]
    old = [e for e in train if fresh is not None and not fresh(e)]
    # Replay takes its share when there is enough of it; fresh examples fill the rest.
    keep_old = rng.sample(old, min(len(old), round(most * replay_share)))
    keep_fresh = new[len(new) - min(len(new), most - len(keep_old)) :]
    return sorted([*keep_old, *keep_fresh], key=example_order)


def refit_weights(
    rec: Any,
    kept: Sequence[FeedbackExample],
    train: Sequence[FeedbackExample],
    fresh: Callable[[FeedbackExample], bool],
    nameable: set[str],
    settings: Settings,
) -> tuple[float, float] | None:
    """New (w_knn, w_markov) for the blend, or None to keep its weights. Chosen on the newest fresh
    examples (`tune`) by the model in service, which has not trained on them, mixed with statistics
    refitted on everything else in `kept` (the store but the hold-out): nothing sees its own targets,
    so the weights are what the next stretch of traffic will meet."""
    from streamrec.model.blend import blend_weights

    cfg = settings.online
    tune = [e for e in train if fresh(e) and e.target in nameable][-cfg.weights_examples :]
    if len(tune) < cfg.weights_examples // 5:
        return None
    skip = {e.event_id for e in tune}
    stats = rec.blend.refit(user_sequences(e for e in kept if e.event_id not in skip), rec.catalog.ids)
    requests = [RecRequest(e.history, excluded(e.history, settings.serve.exclude_seen)) for e in tune]
    w_knn, w_markov, ndcg = blend_weights(rec, stats, requests, [e.target for e in tune])
    log.info(
        "blend weights on %d fresh examples: item-kNN %s, Markov %s (NDCG@10 %.4f)", len(tune), w_knn, w_markov, ndcg
    )
    return w_knn, w_markov


def run_increment(
    settings: Settings,
    catalog: Catalog,
    examples: Sequence[FeedbackExample],
    fresh: Callable[[FeedbackExample], bool] | None,
    registry: AdapterRegistry,
    *,
    seed: int = 0,
    target_transform: Callable[[list[FeedbackExample]], list[FeedbackExample]] | None = None,
) -> Increment:
    """Train, gate and (when it passes) register and promote one adapter. `examples` are the store's,
    in arrival order; `fresh` says which are new since the last increment (None: all of them).
    `target_transform` lets a drill corrupt the training examples (a deliberately bad adapter must be
    refused)."""
    from streamrec.generation import adapter_blend, load_recommender
    from streamrec.model.recommender import seed_everything
    from streamrec.model.training import fit

    started = time.monotonic()
    cfg = settings.online
    rng = random.Random(seed)
    seed_everything(seed)
    is_new = fresh or (lambda _: True)
    split = split_fresh_replay(examples, is_new, cfg.replay_share, rng, holdout=cfg.holdout)
    consumed_fresh = sum(1 for e in split.train if is_new(e))
    train = cap(split.train, is_new, cfg.max_train_examples, cfg.replay_share, rng)
    fresh_n = sum(1 for e in train if is_new(e))
    if target_transform is not None:
        train = target_transform(list(train))
    through = max((e.ts for e in split.train), default=None)

    # The base model plus the adapter in service, trainable: the increment continues from it, with its
    # item mapping, extended by the items new since (the next ids, rows from their text, saved with
    # the adapter), whose rows the grown adapter trains too.
    rec = load_recommender(settings, catalog, extend_items=False)
    current = registry.current()
    if current is not None and registry.verify(current):
        folder = registry.path(current.version)
        own = adapter_blend(settings, folder, current.blend_sha256)
        rec.continue_adapter(str(folder), current.version, blend=own, extend=True)
    elif current is not None:
        raise ModelError(f"adapter in service {current.version} fails its sha256 check; roll back first")
    else:
        rec.set_catalog(catalog, extend=True)
        rec.add_lora(
            settings.train.lora_r, settings.train.lora_alpha, settings.train.lora_dropout, train_items=cfg.train_items
        )
    parent = current.version if current is not None else None
    exclude_seen = settings.serve.exclude_seen
    rec.model.eval()
    before = score(rec, split.holdout, exclude_seen)
    nameable = set(rec.trie_items)
    held = {e.event_id for e in split.holdout}
    kept = [e for e in examples if e.event_id not in held]  # what the blend is refitted on
    weights = None
    if cfg.refit_blend and cfg.refit_weights and rec.blend is not None:
        weights = refit_weights(rec, kept, split.train, is_new, nameable, settings)

    # Training pairs: the same templates as the bootstrap, sampled per example; targets the model
    # cannot name (unavailable or unknown items) are skipped.
    pairs = [
        TrainingPair(rec.instructions.sample(e.history, task_for(e.target_item), rec.names, rec.texts, rng), e.target)
        for e in train
        if e.target in nameable
    ]
    # The bootstrap's loop, without validation: the same pairs reshuffled each epoch, a tenth of one
    # epoch's steps spent warming up.
    train_started = time.monotonic()
    fitted = fit(
        rec,
        lambda _epoch: pairs,
        rng,
        epochs=cfg.epochs if pairs else 0,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=settings.train.weight_decay,
        warmup=lambda planned: planned // cfg.epochs // 10,
        label_smoothing=settings.train.label_smoothing,
        log=log.info,
    )
    losses = fitted.losses
    train_seconds = time.monotonic() - train_started
    # The blend follows the stream too: its statistics, refitted on every stored example but the
    # held-out ones, with the weights chosen above (or kept).
    blend = None
    if cfg.refit_blend and rec.blend is not None:
        blend = rec.blend.refit(user_sequences(kept), catalog.ids, weights)
        rec.set_adapter_blend(blend)
    after = score(rec, split.holdout, exclude_seen)

    decision = decide(after, before, cfg.gate_tolerance, cfg.gate_min_examples, len(split.holdout))
    if not pairs:
        decision = GateDecision(False, "nothing to train on: no example names an item the model knows", after, before)
    result = Increment(
        decision=decision,
        fresh=fresh_n,
        replay=len(train) - fresh_n,
        holdout=len(split.holdout),
        through=through,
        consumed=len(examples) - len(split.holdout),
        consumed_fresh=consumed_fresh,
        parent=parent,
        train_seconds=train_seconds,
        losses=losses,
    )
    if decision.accepted:
        with tempfile.TemporaryDirectory(prefix="streamrec-adapter-") as tmp:
            rec.save_adapter(tmp)
            if blend is not None:
                blend.save(str(Path(tmp) / BLEND))
            manifest = registry.register(tmp, parent=parent, metrics=after, base=rec.base)
        result.manifest = registry.promote(manifest.version)
    result.seconds = time.monotonic() - started
    return result
