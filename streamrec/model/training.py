"""The training loop, top to bottom, one for the bootstrap and the online increment (`fit`): shuffled
batches of instruction examples, AdamW with warmup and cosine decay planned for an epoch budget (a
time cap only cuts it short, and says so), a progress bar on a terminal or a log line per epoch
elsewhere, and, when there is a validation set, NDCG@10 after each epoch, early stopping on it and
the best weights kept. A
bootstrap run (`train`) trains the whole model (from scratch for `tiny`) on sliding-window examples
from every user's history; a LoRA run trains a peft increment on top of an existing model directory
and saves only the adapter."""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.catalog import Catalog, SchemeName
from streamrec.codes import Code, SemanticIds, code_source, fit_semantic_ids
from streamrec.datasets import Split
from streamrec.instructions import Instructions, RecRequest, TrainingPair, item_texts, training_pairs
from streamrec.model.blend import pair_weights
from streamrec.model.recommender import Recommender, TinyConfig, Trainer, dtype_name, seed_everything
from streamrec.ranking import rank_metrics
from streamrec.settings import TrainSettings


@dataclass
class TrainReport:
    """What a bootstrap run did, with everything needed to run it again: the settings (seed
    included), the device, and whether the time cap rather than the epoch budget ended it."""

    out_dir: str
    seed: int = 0
    device: str = ""
    dtype: str = ""  # what the model computed in (its weights trained in fp32)
    scheme: str = ""
    best_val_ndcg10: float = 0.0
    best_epoch: int = 0
    epochs: int = 0
    planned_epochs: int = 0
    steps: int = 0
    examples_per_epoch: int = 0
    seconds: float = 0.0
    stopped: str = ""
    capped: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Fit:
    """What one run of the loop did."""

    examples_per_epoch: int = 0
    steps: int = 0
    epochs: int = 0
    losses: list[float] = field(default_factory=list)  # every step's
    history: list[dict[str, float]] = field(default_factory=list)  # per validated epoch: loss and metrics
    best: float = -1.0  # the best validation NDCG@10
    best_epoch: int = 0
    stopped: str = ""
    capped: bool = False  # the time cap shortened the schedule or ended training


def fit(
    rec: Recommender,
    examples: Callable[[int], list[TrainingPair]],
    rng: random.Random,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup: Callable[[int], int],
    validate: Callable[[], dict[str, float]] | None = None,
    patience: int = 1,
    max_minutes: float | None = None,
    started: float | None = None,
    label_smoothing: float = 0.0,
    progress: bool = False,
    log_every_s: float = 60.0,
    log: Callable[[str], None] = print,
) -> Fit:
    """Train `rec` for at most `epochs` passes. `examples(epoch)` gives each epoch's examples (the
    list is shuffled in place: hand back the same list to reshuffle it); `warmup(planned steps)` is
    the number of warmup steps. With `validate` (NDCG@10 among its metrics), each epoch is scored,
    training stops after `patience` epochs without a better one and the best epoch's weights are
    kept. `max_minutes` from `started` caps the wall clock: when the planned epochs will not fit, the
    decay is replanned to the steps that do, and the result says the cap bound (`capped`).

    `progress` draws a bar on a terminal; elsewhere (a log file, a pod) the loop writes one line per
    epoch and one every `log_every_s` seconds within a long epoch."""
    from tqdm.auto import tqdm

    started = time.monotonic() if started is None else started
    deadline = None if max_minutes is None else started + max_minutes * 60
    first = examples(1)
    total = max(1, math.ceil(len(first) / batch_size)) * epochs
    trainer = Trainer(
        rec,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup(total),
        total_steps=total,
        label_smoothing=label_smoothing,
    )
    result = Fit(examples_per_epoch=len(first))
    bar_on = progress and sys.stderr.isatty()
    best_state: dict[str, Any] | None = None
    waited = 0

    for epoch in range(1, epochs + 1):
        batch = first if epoch == 1 else examples(epoch)
        rng.shuffle(batch)
        inputs = rec.tokenize_inputs([e.instruction for e in batch])
        labels = rec.target_ids([e.target for e in batch])
        trainer.train_mode(True)
        bar = tqdm(
            range(0, len(batch), batch_size), desc=f"epoch {epoch}", disable=not bar_on, leave=False, unit="batch"
        )
        running = 0.0
        epoch_started = last_line = time.monotonic()
        for n, b in enumerate(bar):
            loss = trainer.step(inputs[b : b + batch_size], labels[b : b + batch_size])
            result.steps += 1
            result.losses.append(loss)
            if deadline is not None and result.steps == 30:
                # Plan the decay for the steps the time budget allows (8% kept for validation):
                # a cosine that never gets to decay leaves the model at its noisiest.
                per_step = (time.monotonic() - epoch_started) / (n + 1)
                affordable = result.steps + int(0.92 * (deadline - time.monotonic()) / per_step)
                if affordable < total:
                    trainer.total_steps = max(affordable, result.steps + 1)
                    trainer.warmup_steps = max(result.steps, warmup(trainer.total_steps))
                    result.capped = True
                    log(
                        f"time cap: about {affordable:,} of the {total:,} planned steps fit in {max_minutes} "
                        "minutes; the learning-rate decay is planned for those, and training will stop early"
                    )
            running = 0.98 * running + 0.02 * loss if n else loss
            bar.set_postfix(loss=f"{running:.3f}")
            now = time.monotonic()
            if not bar_on and progress and now - last_line >= log_every_s:
                last_line = now
                log(f"epoch {epoch}: {n + 1}/{len(bar)} batches, loss {running:.3f} ({now - started:.0f}s)")
            if deadline is not None and now > deadline:
                result.capped = True
                break
        bar.close()
        result.epochs = epoch
        if validate is None:
            log(f"epoch {epoch}: loss {running:.3f} ({time.monotonic() - started:.0f}s)")
        else:
            # Validation NDCG@10 decides what is kept and when to stop.
            trainer.train_mode(False)
            metrics = validate()
            result.history.append({"epoch": epoch, "loss": running, **metrics})
            log(
                f"epoch {epoch}: loss {running:.3f}, val HR@10 {metrics['HR@10']:.4f}, "
                f"NDCG@10 {metrics['NDCG@10']:.4f} ({time.monotonic() - started:.0f}s)"
            )
            if metrics["NDCG@10"] > result.best:
                result.best, waited, result.best_epoch = metrics["NDCG@10"], 0, epoch
                best_state = rec.snapshot()
            else:
                waited += 1
            if waited >= patience:
                result.stopped = f"no better validation NDCG@10 for {patience} epochs"
                break
        if deadline is not None and time.monotonic() > deadline:
            result.capped = True
            result.stopped = f"time cap of {max_minutes} minutes reached after epoch {epoch} of {epochs}"
            log(f"stopped by the time cap ({max_minutes} minutes) after epoch {epoch} of {epochs}")
            break
    else:
        result.stopped = f"all {epochs} epochs"

    if best_state is not None:
        rec.restore(best_state)
    trainer.train_mode(False)
    return result


def cooccurrence_embeddings(
    sequences: dict[str, list[Any]], items: list[str], dim: int, window: int = 5, seed: int = 0
) -> np.ndarray:
    """Item vectors from the training log: a truncated SVD of the positive PMI of items seen within
    `window` steps of each other. A from-scratch model starts with these as its item-token
    embeddings; learning item similarity from random vectors would take it many more epochs. The
    PMI is kept sparse (the pairs the log has), never an items x items matrix."""
    index = {item: n for n, item in enumerate(items)}
    n = len(items)
    seqs = list(sequences.values())
    raw = np.fromiter((index.get(h.item_id, -1) for seq in seqs for h in seq), dtype=np.int64)
    owner = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    known = raw >= 0
    lengths = np.bincount(owner[known], minlength=len(seqs)).astype(np.int64)
    lo, hi, w = pair_weights(raw[known], lengths, n, window, by_distance=True, self_pairs=True)
    # The symmetric matrix counts a pair both ways: an item with itself twice, on the diagonal.
    diag = lo == hi
    rows = np.concatenate([lo[~diag], hi[~diag], lo[diag]])
    cols = np.concatenate([hi[~diag], lo[~diag], lo[diag]])
    vals = np.concatenate([w[~diag], w[~diag], 2 * w[diag]])
    total = float(vals.sum()) or 1.0
    row = np.bincount(rows, weights=vals, minlength=n) + 1e-9
    pmi = np.log(np.maximum(vals * total / row[rows] / row[cols], 1.0))
    keep = pmi > 0  # positive PMI: the other pairs are zeros of the matrix
    rows, cols, pmi = rows[keep], cols[keep], pmi[keep]
    order = np.argsort(rows, kind="stable")
    rows, cols, pmi = rows[order], cols[order], pmi[order]

    def times(x: np.ndarray) -> np.ndarray:
        """pmi @ x (pmi is symmetric, so pmi.T @ x too), in chunks of entries."""
        out = np.zeros((n, x.shape[1]), dtype=np.float64)
        step = max(1, (1 << 24) // max(x.shape[1], 1))
        for s in range(0, len(rows), step):
            r = rows[s : s + step]
            starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
            out[r[starts]] += np.add.reduceat(pmi[s : s + step, None] * x[cols[s : s + step]], starts, axis=0)
        return out

    # Randomised SVD (a few power iterations): exact SVD is cubic in the catalog size.
    rng = np.random.default_rng(seed)
    k = min(dim, n)
    q, _ = np.linalg.qr(times(rng.standard_normal((n, k + 8)).astype(np.float32)))
    for _ in range(2):
        q, _ = np.linalg.qr(times(times(q)))
    u, sv, _ = np.linalg.svd(times(q).T, full_matrices=False)
    vecs = (q @ u[:, :k]) * np.sqrt(sv[:k])[None, :]
    vecs /= vecs.std() + 1e-9
    out = np.zeros((n, dim), dtype=np.float32)
    out[:, :k] = vecs
    return out


def semantic_ids(
    split: Split, catalog: Catalog, *, seed: int = 0, dim: int = 32
) -> tuple[SemanticIds, dict[str, Code]]:
    """The `semantic` scheme's codebook and codes for `catalog`, from each item's text and its
    co-occurrence vector in `split.train` (zero for items the log never shows)."""
    ids = catalog.ids
    texts = item_texts(catalog)
    cooc = cooccurrence_embeddings(split.train, ids, dim, seed=seed)
    return fit_semantic_ids(ids, [code_source(texts, i) for i in ids], cooc, seed=seed)


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
    scheme: SchemeName | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Recommender, TrainReport]:
    """Train on `split.train`, early-stop on `split.valid`, save the best model (or adapter) to
    `out_dir` and return it ready to recommend. `scheme`: the item identifiers (None: `item_token`
    for tiny, else what the base directory says, `title` for a plain hub checkpoint); a LoRA
    increment always keeps its base's. `dtype`: what the model computes in (STREAMREC_MODEL__DTYPE;
    autocast on CUDA, the weights stay fp32)."""
    started = time.monotonic()
    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed)
    out = Path(out_dir)

    # 1. The model: tiny from scratch, a pretrained checkpoint to fine-tune, or LoRA on a model dir.
    semantic = None
    if scheme == "semantic" and not lora:
        # Codes from the items' text and their co-occurrence in the training log.
        semantic = semantic_ids(split, catalog, seed=cfg.seed)
    if base == "tiny" and not lora:
        instructions = instructions or Instructions.load()
        tiny = TinyConfig.from_settings(cfg)
        rec = Recommender.build_tiny(
            catalog,
            instructions,
            config=tiny,
            device=device,
            seed=cfg.seed,
            scheme=scheme or "item_token",
            dtype=dtype,
            train=True,
            semantic=semantic,
        )
        lr = cfg.lr
    else:
        # An absolute path: a LoRA adapter records its base's path and must load from anywhere.
        where = str(Path(base).resolve()) if Path(base).is_dir() else base
        rec = Recommender.load(
            where,
            device,
            scheme=None if lora else scheme,
            instructions=instructions,
            catalog=catalog,
            dtype=dtype,
            train=True,
        )
        lr = cfg.lora_lr if lora else cfg.finetune_lr
        if semantic is not None and rec.semantic is None:
            rec.use_semantic(*semantic)
    if base == "tiny" and not lora and rec.scheme == "item_token":
        ids = rec.trie_items
        rec.set_item_embeddings(ids, cooccurrence_embeddings(split.train, ids, rec.d_model, seed=cfg.seed))
    if lora:
        rec.add_lora(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    log(
        f"model: {base}{' + LoRA' if lora else ''}, scheme {rec.scheme}, {rec.trainable_parameters:,} trainable "
        f"parameters, {len(catalog):,} items, device {rec.device}, {dtype_name(rec.dtype)}"
    )

    # 2. Validation users: a fixed sample, so epochs are compared on the same people.
    val_users = sorted(split.valid)
    if len(val_users) > cfg.eval_users:
        val_users = sorted(random.Random(cfg.seed).sample(val_users, cfg.eval_users))

    # 3. Examples: fresh template samples each epoch (instruction diversity).
    def examples(_epoch: int) -> list[TrainingPair]:
        return training_pairs(
            split.train,
            rec.instructions,
            rec.names,
            rec.texts,
            rng,
            cold_start_share=cfg.cold_start_share,
            targets=rec.trie_items,
        )

    # 4. The loop: the schedule planned for all epochs, early stopping on validation NDCG@10.
    done = fit(
        rec,
        examples,
        rng,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=lr,
        weight_decay=cfg.weight_decay,
        warmup=lambda planned: int(cfg.warmup * planned),
        validate=lambda: validation_ndcg(rec, split, val_users),
        patience=cfg.patience,
        max_minutes=cfg.max_minutes,
        started=started,
        label_smoothing=cfg.label_smoothing,
        progress=progress,
        log=log,
    )
    report = TrainReport(
        out_dir=str(out),
        seed=cfg.seed,
        device=str(rec.device),
        dtype=dtype_name(rec.dtype),
        scheme=rec.scheme,
        best_val_ndcg10=done.best,
        best_epoch=done.best_epoch,
        epochs=done.epochs,
        planned_epochs=cfg.epochs,
        steps=done.steps,
        examples_per_epoch=done.examples_per_epoch,
        stopped=done.stopped,
        capped=done.capped,
        settings=cfg.model_dump(mode="json"),
        history=done.history,
    )

    # 5. Save the best epoch's weights (the loop has put them back).
    if lora:
        rec.save_adapter(out)
    else:
        rec.save(out)
    report.seconds = time.monotonic() - started
    log(
        f"best validation NDCG@10 {done.best:.4f} at epoch {report.best_epoch} of {report.epochs} (seed "
        f"{cfg.seed}); {report.stopped}{' (the time cap bound)' if done.capped else ''}; "
        f"{report.seconds:.0f}s; saved to {out}"
    )
    return rec, report
