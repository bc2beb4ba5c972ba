"""What online learning can add under the prequential protocol, lever by lever, in process.

`streamrec replay` measures the real stack, with every lever pulled at once and the pacing, the
gate's noise and the trainer's lag in the way. This measures the levers one at a time, cheaply, on
the same plan and the same scoring (each event against the list computed from its user's history
before their step, seen items excluded): the bootstrap model's T5 distribution for every replayed
request is computed once, and the served mixture is rebuilt as the stream goes by:

- frozen: the bootstrap's blend, never changed (what the frozen replay serves);
- refit: the blend's item-kNN / Markov statistics refitted every `every` events on everything seen;
- refit+weights: also the blend's weights chosen again before each refit, on the newest `tune`
  events, with statistics fitted without them and the T5 in use (nothing sees its own targets);
- retrained-t5+refit+weights (`retrain_minutes` > 0): the same, with the T5 fine-tuned at the
  stream's midpoint on everything seen so far serving the second half: a generous bound on what
  relearning the T5 (the LoRA increments' job) can add there, since an increment trains a small
  adapter for seconds.

The T5 is otherwise frozen here: the first three rows are what the blend alone can learn online."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.datasets import Dataset, LogEvent
from streamrec.instructions import HistoryItem, RecRequest, excluded
from streamrec.lab.bench import machine, write_report
from streamrec.lab.prequential import K, Outcome, Plan, plan, report
from streamrec.model.blend import Blend, top_k, weights_on

CHUNK = 500  # events scored between two looks at the refit schedule
HISTORY = 50  # the newest history items a request carries, as the inference worker's


def befores(the_plan: Plan) -> list[list[HistoryItem]]:
    """Per replayed event, its user's history before their step (a step: the user's consecutive
    events at the same instant and of the same type, which all meet the same list)."""
    hist: dict[str, list[HistoryItem]] = {}
    for e in the_plan.bootstrap:
        hist.setdefault(e.user_id, []).append(HistoryItem(e.item_id, e.type))
    out: list[list[HistoryItem]] = []
    last: dict[str, tuple[LogEvent, list[HistoryItem]]] = {}
    for e in the_plan.replayed:
        prev = last.get(e.user_id)
        same_step = prev is not None and prev[0].ts == e.ts and prev[0].type == e.type
        before = prev[1] if prev is not None and same_step else list(hist.get(e.user_id, []))
        last[e.user_id] = (e, before)
        out.append(before)
        hist.setdefault(e.user_id, []).append(HistoryItem(e.item_id, e.type))
    return out


def sequences(events: Sequence[LogEvent]) -> dict[str, list[HistoryItem]]:
    seqs: dict[str, list[HistoryItem]] = {}
    for e in events:
        seqs.setdefault(e.user_id, []).append(HistoryItem(e.item_id, e.type))
    return seqs


class Stream:
    """The replayed events, their requests and the frozen T5's item distribution for each."""

    def __init__(self, dataset: Dataset, the_plan: Plan, rec: Any) -> None:
        self.dataset, self.plan = dataset, the_plan
        self.events = the_plan.replayed
        self.all = [*the_plan.bootstrap, *self.events]
        self.befores = befores(the_plan)
        self.items: list[str] = rec.single_token_items
        self.col = {item: c for c, item in enumerate(self.items)}
        self.todo = [i for i, b in enumerate(self.befores) if b]  # no history, no list in force
        self.row = {i: r for r, i in enumerate(self.todo)}
        self.p_model = self.model_probs(rec, self.todo)

    def request(self, i: int) -> RecRequest:
        recent = self.befores[i][-HISTORY:]
        return RecRequest(tuple(recent), excluded(recent, True))

    def model_probs(self, rec: Any, rows: Sequence[int]) -> np.ndarray:
        log_probs: np.ndarray = rec.item_log_probs([self.request(i) for i in rows])
        probs: np.ndarray = np.exp(log_probs).astype(np.float32)
        return probs

    def banned(self, i: int) -> list[int]:
        return [self.col[x] for x in self.request(i).exclude if x in self.col]


def choose_weights(stream: Stream, p_model: np.ndarray, blend: Blend, rows: Sequence[int]) -> tuple[float, float]:
    """The blend weights with the best NDCG@10 on replayed events `rows` (targets the model can name)."""
    rows = [i for i in rows if i in stream.row and stream.events[i].item_id in stream.col]
    w_knn, w_markov, _ = weights_on(
        p_model[[stream.row[i] for i in rows]],
        blend,
        stream.items,
        [stream.request(i) for i in rows],
        [stream.events[i].item_id for i in rows],
    )
    return w_knn, w_markov


def ranked(stream: Stream, blend: Blend, p_model: np.ndarray, i: int) -> tuple[str, ...]:
    """The top-K list for replayed event `i`, ranked as the inference worker ranks it."""
    request = stream.request(i)
    scores = blend.log_probs(p_model[stream.row[i]], [h.item_id for h in request.history], stream.items)
    return tuple(stream.items[t] for t in top_k(scores, stream.banned(i), K))


def run_lever(
    stream: Stream, start: Blend, *, every: int = 0, tune: int = 0, p_model: np.ndarray | None = None
) -> dict[str, Any]:
    """Score the stream with `start`'s blend; `every` > 0 refits its statistics every `every` events
    on all events seen, `tune` > 0 also chooses its weights again first (see the module)."""
    p_model = stream.p_model if p_model is None else p_model
    catalog, n_boot = stream.dataset.catalog.ids, len(stream.plan.bootstrap)
    blend, outcomes, last_fit = start, [], 0
    started = time.monotonic()
    chunk = min(CHUNK, every) if every else CHUNK
    for c in range(0, len(stream.events), chunk):
        for i in range(c, min(c + chunk, len(stream.events))):
            listed = ranked(stream, blend, p_model, i) if i in stream.row else None
            window = min(len(stream.plan.windows) - 1, i * len(stream.plan.windows) // len(stream.events))
            outcomes.append(Outcome(index=i, window=window, target=stream.events[i].item_id, recommended=listed))
        done = min(c + chunk, len(stream.events))
        if every and done - last_fit >= every:
            last_fit = done
            weights = None
            if tune and done > tune:
                stats = blend.refit(sequences(stream.all[: n_boot + done - tune]), catalog)
                weights = choose_weights(stream, p_model, stats, range(done - tune, done))
            blend = blend.refit(sequences(stream.all[: n_boot + done]), catalog, weights)
    result = report(outcomes, len(stream.plan.windows), {e.item_id for e in stream.plan.bootstrap})
    result["weights"] = {"itemknn": blend.w_knn, "markov": blend.w_markov}
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def retrained_probs(stream: Stream, model_dir: Path, minutes: float, log: Any) -> np.ndarray:
    """The T5 fine-tuned on bootstrap + first half of the replay, for the second half's requests
    (the first half keeps the frozen model's)."""
    from streamrec.datasets import leave_one_out
    from streamrec.model.training import train
    from streamrec.settings import load_settings

    half = len(stream.events) // 2
    split = leave_one_out([*stream.plan.bootstrap, *stream.events[:half]])
    cfg = load_settings().train.model_copy(update={"max_minutes": minutes})
    with tempfile.TemporaryDirectory(prefix="streamrec-levers-") as tmp:
        rec, _ = train(split, stream.dataset.catalog, tmp, cfg, base=str(model_dir), progress=False, log=log)
        assert rec.single_token_items == stream.items
        rows = [i for i in stream.todo if i >= half]
        probs = stream.p_model.copy()
        probs[[stream.row[i] for i in rows]] = stream.model_probs(rec, rows)
    return probs


def run(
    dataset: Dataset,
    model_dir: Path,
    out: Path,
    *,
    bootstrap_share: float = 0.5,
    windows: int = 5,
    every: int = 2000,
    tune: int = 2000,
    retrain_minutes: float = 0.0,
    log: Any = print,
) -> dict[str, Any]:
    from streamrec.model.recommender import Recommender

    the_plan = plan(dataset.events, bootstrap_share, windows)
    rec = Recommender.load(str(model_dir), "cpu", catalog=dataset.catalog)
    if rec.blend is None:
        raise ValueError(f"{model_dir} has no blend.npz: the levers are the blend's")
    started = time.monotonic()
    stream = Stream(dataset, the_plan, rec)
    log(f"T5 distributions for {len(stream.todo):,} requests in {time.monotonic() - started:.0f}s")
    runs: dict[str, dict[str, Any]] = {}
    runs["frozen"] = run_lever(stream, rec.blend)
    runs["refit"] = run_lever(stream, rec.blend, every=every)
    runs["refit+weights"] = run_lever(stream, rec.blend, every=every, tune=tune)
    if retrain_minutes > 0:
        probs = retrained_probs(stream, model_dir, retrain_minutes, log)
        runs["retrained-t5+refit+weights"] = run_lever(stream, rec.blend, every=every, tune=tune, p_model=probs)
    base = runs["frozen"]["second_half"]["HR@10"]
    ratios = {name: round(r["second_half"]["HR@10"] / base, 4) if base else None for name, r in runs.items()}
    result = {
        "dataset": dataset.name,
        "model_dir": str(model_dir),
        "events": {"bootstrap": len(the_plan.bootstrap), "replayed": len(stream.events)},
        "every": every,
        "tune": tune,
        "retrain_minutes": retrain_minutes,
        "machine": machine(),
        "runs": runs,
        "second_half_HR@10_vs_frozen": ratios,
    }
    rows = [
        (name, f"{r['second_half']['HR@10']:.4f} ({ratios[name]:.3f}x), NDCG@10 {r['second_half']['NDCG@10']:.4f}")
        for name, r in runs.items()
    ]
    write_report(result, out, rows, f"{dataset.name}: second-half HR@10 by online lever (in process)")
    return result
