"""The training loop, top to bottom: sliding-window instruction examples from every user's history,
AdamW with warmup and cosine decay, validation NDCG@10 after each epoch, early stopping on it, the
best weights kept. A bootstrap run trains the whole model (from scratch for `tiny`); a LoRA run
trains a peft increment on top of an existing model directory and saves only the adapter."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.catalog import Catalog, SchemeName
from streamrec.datasets import Split
from streamrec.instructions import Instructions, RecRequest, training_pairs
from streamrec.model.recommender import Recommender, TinyConfig, Trainer, seed_everything
from streamrec.ranking import rank_metrics
from streamrec.settings import TrainSettings


@dataclass
class TrainReport:
    out_dir: str
    best_val_ndcg10: float = 0.0
    best_epoch: int = 0
    epochs: int = 0
    steps: int = 0
    examples_per_epoch: int = 0
    seconds: float = 0.0
    stopped: str = ""
    history: list[dict[str, float]] = field(default_factory=list)


def cooccurrence_embeddings(
    sequences: dict[str, list[Any]], items: list[str], dim: int, window: int = 5, seed: int = 0
) -> np.ndarray:
    """Item vectors from the training log: a truncated SVD of the positive PMI of items seen within
    `window` steps of each other. A from-scratch model starts with these as its item-token
    embeddings; learning item similarity from random vectors would take it many more epochs."""
    index = {item: n for n, item in enumerate(items)}
    n = len(items)
    co = np.zeros((n, n), dtype=np.float32)
    for seq in sequences.values():
        ids = np.array([index[h.item_id] for h in seq if h.item_id in index], dtype=np.int64)
        for lag in range(1, window + 1):
            if len(ids) > lag:
                np.add.at(co, (ids[:-lag], ids[lag:]), 1.0 / lag)
    co += co.T
    total = float(co.sum()) or 1.0
    row = co.sum(axis=1) + 1e-9
    # Positive PMI, computed in place: a 12k-item catalog makes this matrix 0.6 GB.
    co *= total
    co /= row[:, None]
    co /= row[None, :]
    np.maximum(co, 1.0, out=co)
    pmi = np.log(co, out=co)
    # Randomised SVD (a few power iterations): exact SVD is cubic in the catalog size.
    rng = np.random.default_rng(seed)
    k = min(dim, n)
    q, _ = np.linalg.qr(pmi @ rng.standard_normal((n, k + 8)).astype(np.float32))
    for _ in range(2):
        q, _ = np.linalg.qr(pmi @ (pmi.T @ q))
    u, sv, _ = np.linalg.svd(q.T @ pmi, full_matrices=False)
    vecs = (q @ u[:, :k]) * np.sqrt(sv[:k])[None, :]
    vecs /= vecs.std() + 1e-9
    out = np.zeros((n, dim), dtype=np.float32)
    out[:, :k] = vecs
    return out


def validation_ndcg(rec: Recommender, split: Split, users: list[str]) -> dict[str, float]:
    """HR/NDCG@10 on the validation items of `users`, history items excluded (the eval protocol)."""
    requests = [RecRequest(tuple(split.train[u]), frozenset(h.item_id for h in split.train[u]), None) for u in users]
    lists = rec.recommend(requests, k=10)
    ranked = {u: [s.item_id for s in lst] for u, lst in zip(users, lists, strict=True)}
    return rank_metrics(ranked, {u: split.valid[u].item_id for u in users}, len(rec.catalog), cutoffs=(10,))


def train(
    split: Split,
    catalog: Catalog,
    out_dir: str | Path,
    cfg: TrainSettings = TrainSettings(),
    *,
    base: str = "tiny",
    lora: bool = False,
    instructions: Instructions | None = None,
    scheme: SchemeName = "item_token",
    device: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Recommender, TrainReport]:
    """Train on `split.train`, early-stop on `split.valid`, save the best model (or adapter) to
    `out_dir` and return it ready to recommend."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed)
    out = Path(out_dir)

    # 1. The model: tiny from scratch, a pretrained checkpoint to fine-tune, or LoRA on a model dir.
    if base == "tiny" and not lora:
        instructions = instructions or Instructions.load()
        tiny = TinyConfig(
            d_model=cfg.d_model,
            d_ff=cfg.d_ff,
            num_layers=cfg.num_layers,
            num_decoder_layers=cfg.num_decoder_layers,
            num_heads=cfg.num_heads,
            dropout=cfg.dropout,
            text_vocab=cfg.text_vocab,
        )
        rec = Recommender.build_tiny(catalog, instructions, config=tiny, device=device, seed=cfg.seed, scheme=scheme)
        lr = cfg.lr
    else:
        # An absolute path: a LoRA adapter records its base's path and must load from anywhere.
        where = str(Path(base).resolve()) if Path(base).is_dir() else base
        rec = Recommender.load(where, device, instructions=instructions, catalog=catalog)
        lr = cfg.lora_lr if lora else cfg.finetune_lr
    if base == "tiny" and not lora and rec.scheme == "item_token":
        ids = rec.trie_items
        rec.set_item_embeddings(ids, cooccurrence_embeddings(split.train, ids, rec.d_model, seed=cfg.seed))
    if lora:
        rec.add_lora(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    log(
        f"model: {base}{' + LoRA' if lora else ''}, scheme {rec.scheme}, {rec.trainable_parameters:,} trainable "
        f"parameters, {len(catalog):,} items, device {rec.device}"
    )

    # 2. Validation users: a fixed sample, so epochs are compared on the same people.
    val_users = sorted(split.valid)
    if len(val_users) > cfg.eval_users:
        val_users = sorted(random.Random(cfg.seed).sample(val_users, cfg.eval_users))

    # 3. Optimiser and schedule, planned for all epochs; early stopping may end sooner.
    examples = training_pairs(
        split.train,
        rec.instructions,
        rec.names,
        rec.texts,
        rng,
        cold_start_share=cfg.cold_start_share,
        targets=rec.trie_items,
    )
    steps_per_epoch = max(1, math.ceil(len(examples) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    trainer = Trainer(
        rec, lr=lr, weight_decay=cfg.weight_decay, warmup_steps=int(cfg.warmup * total), total_steps=total
    )
    report = TrainReport(out_dir=str(out), examples_per_epoch=len(examples))
    best_state: dict[str, Any] | None = None
    best = -1.0
    waited = 0
    deadline = started + cfg.max_minutes * 60

    # 4. Epochs: fresh template samples each time (instruction diversity), shuffled batches.
    for epoch in range(1, cfg.epochs + 1):
        if epoch > 1:
            examples = training_pairs(
                split.train,
                rec.instructions,
                rec.names,
                rec.texts,
                rng,
                cold_start_share=cfg.cold_start_share,
                targets=rec.trie_items,
            )
        rng.shuffle(examples)
        inputs = rec.tokenize_inputs([e.instruction for e in examples])
        labels = rec.target_ids([e.target for e in examples])
        trainer.train_mode(True)
        bar = tqdm(
            range(0, len(examples), cfg.batch_size),
            desc=f"epoch {epoch}",
            disable=not progress,
            leave=False,
            unit="batch",
        )
        running = 0.0
        epoch_started = time.monotonic()
        for n, b in enumerate(bar):
            loss = trainer.step(inputs[b : b + cfg.batch_size], labels[b : b + cfg.batch_size])
            report.steps += 1
            if report.steps == 30:
                # Plan the decay for the steps the time budget allows (8% kept for validation):
                # a cosine that never gets to decay leaves the model at its noisiest.
                per_step = (time.monotonic() - epoch_started) / (n + 1)
                affordable = report.steps + int(0.92 * (deadline - time.monotonic()) / per_step)
                if affordable < total:
                    trainer.total_steps = max(affordable, report.steps + 1)
                    trainer.warmup_steps = max(report.steps, int(cfg.warmup * trainer.total_steps))
            running = 0.98 * running + 0.02 * loss if n else loss
            bar.set_postfix(loss=f"{running:.3f}")
            if time.monotonic() > deadline:
                break
        bar.close()

        # 5. Validation NDCG@10 decides what is kept and when to stop.
        trainer.train_mode(False)
        metrics = validation_ndcg(rec, split, val_users)
        report.epochs = epoch
        report.history.append({"epoch": epoch, "loss": running, **metrics})
        log(
            f"epoch {epoch}: loss {running:.3f}, val HR@10 {metrics['HR@10']:.4f}, "
            f"NDCG@10 {metrics['NDCG@10']:.4f} ({time.monotonic() - started:.0f}s)"
        )
        if metrics["NDCG@10"] > best:
            best, waited, report.best_epoch = metrics["NDCG@10"], 0, epoch
            best_state = rec.snapshot()
        else:
            waited += 1
        if waited >= cfg.patience:
            report.stopped = f"no better validation NDCG@10 for {cfg.patience} epochs"
            break
        if time.monotonic() > deadline:
            report.stopped = f"time budget of {cfg.max_minutes} minutes reached"
            break
    else:
        report.stopped = f"all {cfg.epochs} epochs"

    # 6. Keep the best epoch's weights and save them.
    if best_state is not None:
        rec.restore(best_state)
    trainer.train_mode(False)
    report.best_val_ndcg10 = best
    if lora:
        rec.save_adapter(out)
    else:
        rec.save(out)
    report.seconds = time.monotonic() - started
    log(
        f"best validation NDCG@10 {best:.4f} at epoch {report.best_epoch}; {report.stopped}; "
        f"{report.seconds:.0f}s; saved to {out}"
    )
    return rec, report
