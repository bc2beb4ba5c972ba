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
import math
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
from streamrec.feedback import FeedbackExample, example_order, split_fresh_replay, user_sequences
from streamrec.gate import GateDecision, decide, holdout_metrics
from streamrec.instructions import RecRequest, excluded, task_for
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
    through: datetime | None  # the newest example trained on: the next increment's `since`
    parent: str | None
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
    """The newest example time the last increment trained on, kept on disk: after a restart the
    trainer goes on from there instead of treating every stored example as fresh."""

    def __init__(self, settings: Settings) -> None:
        self.path = settings.data_dir / CURSOR_FILE
        self.floor = settings.online.since

    def get(self) -> datetime | None:
        try:
            stored = json.loads(self.path.read_text())["through"]
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            return self.floor
        value = None if stored is None else datetime.fromisoformat(stored)
        if value is None or (self.floor is not None and value < self.floor):
            return self.floor
        return value

    def set(self, value: datetime | None) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"through": None if value is None else value.isoformat()}))
        tmp.replace(self.path)


def score(rec: Any, examples: Sequence[FeedbackExample], exclude_seen: bool) -> dict[str, float]:
    """HR/NDCG@5/10, MRR, coverage of `rec` (as served: its task, its blend) on `examples`."""
    requests = [RecRequest(e.history, excluded(e.history, exclude_seen)) for e in examples]
    lists = rec.recommend(requests, k=10)
    ranked = {e.event_id: [s.item_id for s in lst] for e, lst in zip(examples, lists, strict=True)}
    return holdout_metrics(ranked, examples, max(1, len(rec.catalog)))


def cap(
    train: Sequence[FeedbackExample], since: datetime | None, most: int, replay_share: float, rng: random.Random
) -> list[FeedbackExample]:
    """At most `most` training examples with the replay share kept: the newest fresh ones, and a
    sample of the replayed (older) ones in proportion. Time order."""
    if len(train) <= most:
        return list(train)
    fresh = [e for e in train if since is None or e.ts > since]
    old = [e for e in train if since is not None and e.ts <= since]
    # Replay takes its share when there is enough of it; fresh examples fill the rest.
    keep_old = rng.sample(old, min(len(old), round(most * replay_share)))
    keep_fresh = fresh[len(fresh) - min(len(fresh), most - len(keep_old)) :]
    return sorted([*keep_old, *keep_fresh], key=example_order)


def run_increment(
    settings: Settings,
    catalog: Catalog,
    examples: Sequence[FeedbackExample],
    since: datetime | None,
    registry: AdapterRegistry,
    *,
    seed: int = 0,
    target_transform: Callable[[list[FeedbackExample]], list[FeedbackExample]] | None = None,
) -> Increment:
    """Train, gate and (when it passes) register and promote one adapter. `target_transform` lets a
    drill corrupt the training examples (a deliberately bad adapter must be refused)."""
    from streamrec.generation import adapter_blend, load_recommender
    from streamrec.model import Trainer, seed_everything

    started = time.monotonic()
    cfg = settings.online
    rng = random.Random(seed)
    seed_everything(seed)
    split = split_fresh_replay(examples, since, cfg.replay_share, rng, holdout=cfg.holdout)
    train = cap(split.train, since, cfg.max_train_examples, cfg.replay_share, rng)
    fresh_n = sum(1 for e in train if since is None or e.ts > since)
    if target_transform is not None:
        train = target_transform(list(train))
    through = max((e.ts for e in split.train), default=since)

    # The base model plus the adapter in service, trainable: the increment continues from it.
    rec = load_recommender(settings, catalog)
    current = registry.current()
    if current is not None and registry.verify(current):
        folder = registry.path(current.version)
        own = adapter_blend(settings, folder, current.blend_sha256)
        rec.continue_adapter(str(folder), current.version, blend=own)
    elif current is not None:
        raise ModelError(f"adapter in service {current.version} fails its sha256 check; roll back first")
    else:
        rec.add_lora(
            settings.train.lora_r, settings.train.lora_alpha, settings.train.lora_dropout, train_items=cfg.train_items
        )
    parent = current.version if current is not None else None
    exclude_seen = settings.serve.exclude_seen
    rec.model.eval()
    before = score(rec, split.holdout, exclude_seen)

    # Training pairs: the same templates as the bootstrap, sampled per example; targets the model
    # cannot name (unavailable or unknown items) are skipped.
    nameable = set(rec.trie_items)
    pairs = [
        (rec.instructions.sample(e.history, task_for(e.target_item), rec.names, rec.texts, rng), e.target)
        for e in train
        if e.target in nameable
    ]
    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    trainer = Trainer(
        rec,
        lr=cfg.lr,
        weight_decay=settings.train.weight_decay,
        warmup_steps=max(1, steps_per_epoch // 10),
        total_steps=max(1, steps_per_epoch * cfg.epochs),
    )
    losses: list[float] = []
    train_started = time.monotonic()
    for _ in range(cfg.epochs if pairs else 0):
        rng.shuffle(pairs)
        inputs = rec.tokenize_inputs([p[0] for p in pairs])
        labels = rec.target_ids([p[1] for p in pairs])
        trainer.train_mode(True)
        for b in range(0, len(pairs), cfg.batch_size):
            losses.append(trainer.step(inputs[b : b + cfg.batch_size], labels[b : b + cfg.batch_size]))
    trainer.train_mode(False)
    train_seconds = time.monotonic() - train_started
    # The blend follows the stream too: its statistics, refitted on every stored example but the
    # held-out ones, with the weights chosen at bootstrap.
    blend = None
    if cfg.refit_blend and rec.blend is not None:
        held = {e.event_id for e in split.holdout}
        blend = rec.blend.refit(user_sequences(e for e in examples if e.event_id not in held), catalog.ids)
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
