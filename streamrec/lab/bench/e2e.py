"""End-to-end freshness of the served configuration: simulated events at a fixed rate through the
real broker, the ingest worker and the inference worker serving a trained tiny T5 with its blend,
trending and cold start; for each recommendation, the time from its trigger event's arrival in
Kafka to the recommendation's arrival in Kafka (both broker-side record timestamps set by the
producers on this machine). `sweep` runs stages of rising rates on the same workers and finds the
highest rate whose freshness p99 stays under a bound; each stage reports the consumer lag of both
groups at its end, which says which worker was the bottleneck."""

from __future__ import annotations

import contextlib
import itertools
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamrec.events import Event
from streamrec.kafka.clients import consumer
from streamrec.kafka.offsets import end_offsets, group_lag
from streamrec.lab.bench import machine, write_report
from streamrec.lab.runner import local_stack, running_workers
from streamrec.lab.simulate import SimConfig, generate_events, make_catalog
from streamrec.lab.traffic import SendStats, send_catalog, send_events
from streamrec.settings import Settings

TRAIN_EVENTS = 15_000  # the start of the simulated stream, which the tiny model learns from
BEHIND_S = 2.0  # lag (in seconds of input) beyond which a group is behind: commits go every second


def _collect(settings: Settings, out: list[tuple[float, str]], stop: threading.Event) -> None:
    """(publish time, trigger event id) of every recommendation, as it arrives. json, not the
    pydantic model: at thousands of recommendations a second the reader shares the cores."""
    reader = consumer(settings.kafka, auto_offset_reset="earliest", enable_auto_commit=False)
    reader.subscribe([settings.topics.recommendations])
    try:
        while not stop.is_set():
            for records in reader.poll(timeout_ms=200).values():
                for record in records:
                    trigger = json.loads(record.value).get("trigger_event_id") or ""
                    out.append((record.timestamp / 1000, trigger))
    finally:
        reader.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def served_model(cfg: SimConfig, history: list[Event], out_dir: Path, log: Callable[[str], None]) -> Path:
    """Train the tiny T5 on `history` (a minute at most) and fit its blend (item-kNN, Markov) on the
    same split, as `streamrec eval` does: the directory the inference worker then serves."""
    from streamrec.catalog import Catalog
    from streamrec.datasets import LogEvent, leave_one_out
    from streamrec.lab.offline import compare
    from streamrec.model.training import train
    from streamrec.settings import TrainSettings

    events = [LogEvent(e.user_id, e.item_id, e.ts.timestamp(), e.type.value, n) for n, e in enumerate(history)]
    split, catalog = leave_one_out(events), Catalog(make_catalog(cfg))
    budget = TrainSettings(epochs=6, max_minutes=1.0, eval_users=200, patience=2)
    rec, report = train(split, catalog, out_dir, budget, base="tiny", progress=False, log=log)
    compare(rec, split, catalog, save_blend=out_dir, log=log)
    log(f"served model: tiny T5 with its blend in {out_dir} (validation NDCG@10 {report.best_val_ndcg10:.3f})")
    return out_dir


@dataclass
class Stage:
    rate: float
    report: dict[str, Any]

    @property
    def p99(self) -> float:
        return float(self.report["freshness_s"]["p99"]) if self.report["freshness_s"] else float("inf")


class Pipeline:
    """Both workers on one broker, fed by one simulated stream that each stage continues."""

    def __init__(self, settings: Settings, stream: Iterator[Event]) -> None:
        self.settings, self.stream = settings, stream
        self.sent = SendStats()
        self.recs: list[tuple[float, str]] = []
        self.groups = {
            "ingest": (settings.app_id, [settings.topics.clicks, settings.topics.purchases]),
            "infer": (settings.app_id + "-infer", [settings.topics.history_updates]),
        }

    def lags(self) -> dict[str, int]:
        """Messages each worker's group has not committed yet (commits go every second)."""
        kafka = self.settings.kafka
        out = {}
        for role, (group, topics) in self.groups.items():
            ends = end_offsets(kafka, topics)
            if role == "ingest":  # the producer's acknowledgements are ahead of the broker's report
                with self.sent.lock:
                    ends = {tp: max(end, self.sent.ends.get(tp, 0)) for tp, end in ends.items()}
            out[role] = group_lag(kafka, group, ends)
        return out

    def drain(self, timeout: float) -> bool:
        """Wait until both groups have caught up (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(self.lags().values()):
                return True
            time.sleep(0.5)
        return False

    def warm_up(self, rate: float, timeout: float = 300.0) -> float:
        """Send at `rate` until the first recommendation arrives (group joins, catalog, model load),
        then let both groups drain; returns the seconds it took. Stages start from a quiet pipeline."""
        started, stop = time.monotonic(), threading.Event()
        sender = threading.Thread(
            target=send_events,
            kwargs={"settings": self.settings, "events": self.stream, "rate": rate, "stats": self.sent, "stop": stop},
            daemon=True,
        )
        sender.start()
        while not self.recs and time.monotonic() - started < timeout:
            time.sleep(0.5)
        time.sleep(5.0)  # a few seconds of steady traffic past the first answer
        stop.set()
        sender.join(timeout=30)
        if not self.recs:
            raise RuntimeError(f"no recommendation within {timeout:.0f}s; see the worker logs")
        self.drain(timeout=120.0)
        return time.monotonic() - started

    def stage(self, rate: float, duration: float, warmup: float, bound_s: float) -> Stage:
        stop = threading.Event()
        sender = threading.Thread(
            target=send_events,
            kwargs={
                "settings": self.settings,
                "events": self.stream,
                "rate": rate,
                "stats": self.sent,
                "stop": stop,
            },
            daemon=True,
        )
        sender.start()
        time.sleep(warmup)
        window_start, sent_before = time.time(), self.sent.sent
        time.sleep(duration)
        window_end, sent_in_window = time.time(), self.sent.sent - sent_before
        lag_at_end = self.lags()
        stop.set()
        sender.join(timeout=30)
        drained = self.drain(timeout=max(60.0, 3 * duration))
        time.sleep(1.0)  # the last recommendations reach the collector
        freshness = [
            published - self.sent.appended[trigger]
            for published, trigger in list(self.recs)
            if trigger in self.sent.appended and window_start <= self.sent.appended[trigger] <= window_end
        ]
        f = (
            {
                "p50": statistics.median(freshness),
                "p90": percentile(freshness, 0.9),
                "p99": percentile(freshness, 0.99),
                "max": max(freshness),
            }
            if freshness
            else {}
        )
        rate_sent = sent_in_window / (window_end - window_start)
        # The bottleneck: the group furthest behind, in seconds of its input at the rate sent. Up to
        # BEHIND_S is the commit interval and a batch in flight, not a backlog: then neither is, and
        # the latency is each message's own (scheduling, fetch waits), not a worker falling behind.
        behind = {role: lag / max(rate_sent, 1.0) for role, lag in lag_at_end.items()}
        late = (not f or f["p99"] >= bound_s) and max(behind.values()) > BEHIND_S
        report = {
            "rate_target": rate,
            "rate_sent": rate_sent,
            "duration_s": window_end - window_start,
            "events_in_window": sent_in_window,
            "recommendations_in_window": len(freshness),
            "freshness_s": f,
            "consumer_lag_at_end": lag_at_end,
            "behind_s": behind,
            "bottleneck": max(behind, key=lambda r: behind[r]) if late else None,
            "drained_after": drained,
        }
        return Stage(rate, report)


def _ms(f: dict[str, float], q: str) -> str:
    return f"{f[q] * 1000:,.0f} ms" if q in f else "-"


def _summary(stage: dict[str, Any]) -> str:
    f, lag = stage["freshness_s"], stage["consumer_lag_at_end"]
    return f"p50 {_ms(f, 'p50')}, p99 {_ms(f, 'p99')}, lag ingest {lag['ingest']:,} / infer {lag['infer']:,}"


def sweep_rates(
    measure: Callable[[float], Stage], start: float, bound_s: float, max_rate: float, steps: int, min_rate: float = 25.0
) -> tuple[float | None, list[Stage]]:
    """Double the rate from `start` while freshness p99 < `bound_s` (or halve it, down to `min_rate`,
    while it is not), then bisect `steps` times between the highest rate that held and the lowest
    that did not. Returns (highest rate that held, every stage in the order run)."""
    stages: list[Stage] = []
    good: float | None = None
    bad: float | None = None
    rate = start
    while min_rate <= rate <= max_rate:
        stage = measure(rate)
        stages.append(stage)
        if stage.p99 < bound_s:
            good = rate
            if bad is not None:
                break
            rate *= 2
        else:
            bad = rate
            if good is not None:
                break
            rate /= 2
    if good is None or bad is None:
        return good, stages
    for _ in range(steps):
        mid = round((good + bad) / 2, -1)
        if mid in (good, bad):
            break
        stage = measure(mid)
        stages.append(stage)
        good, bad = (mid, bad) if stage.p99 < bound_s else (good, mid)
    return good, stages


def run(
    rate: float,
    duration: float,
    out: Path,
    *,
    model: str | None = None,
    sweep: bool = False,
    bound_s: float = 1.0,
    max_rate: float = 16_000.0,
    steps: int = 3,
    warmup: float = 3.0,
    users: int = 2_000,
    items: int = 1_000,
    profile: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """After a warm-up (until the first recommendation, then drained), one stage at `rate` for
    `duration` seconds after `warmup` seconds of ramp, or with `sweep`, stages from `rate` (see
    sweep_rates). `model`: a model directory to serve (with its blend.npz); None trains one first.
    `profile`: a directory for the workers' cProfile statistics."""
    base = Settings()
    cfg = SimConfig(users=users, items=items, seed=3)
    stream = generate_events(cfg, 100_000_000)
    history = list(itertools.islice(stream, TRAIN_EVENTS))
    trained = model is None
    # One torch thread unless told otherwise: the broker, both workers and this process share the cores.
    threads = base.model.threads if "threads" in base.model.model_fields_set else 1
    with contextlib.ExitStack() as stack:
        if model is None:
            built = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streamrec-e2e-model-")))
            model = str(served_model(cfg, history, built, log))
        served = base.model.model_copy(update={"base": model, "threads": threads})
        settings = stack.enter_context(local_stack(base.model_copy(update={"model": served}), log))
        send_catalog(settings, make_catalog(cfg))
        stack.enter_context(running_workers(settings, ("ingest", "infer"), log, profile=profile))
        pipeline = Pipeline(settings, stream)
        done = threading.Event()
        stack.callback(done.set)
        collector = threading.Thread(target=_collect, args=(settings, pipeline.recs, done), daemon=True)
        collector.start()
        log(f"warming up at {rate:g} events/s until the first recommendation")
        warmed_s = pipeline.warm_up(rate)

        def measure(r: float) -> Stage:
            stage = pipeline.stage(r, duration, warmup, bound_s)
            log(f"{r:,.0f} events/s: {_summary(stage.report)}, bottleneck {stage.report['bottleneck']}")
            return stage

        if sweep:
            best, stages = sweep_rates(measure, rate, bound_s, max_rate, steps)
        else:
            stages = [measure(rate)]
            best = rate if stages[0].p99 < bound_s else None

    report: dict[str, Any] = {
        "benchmark": "e2e",
        "model": f"tiny T5 trained on the simulated stream's first {TRAIN_EVENTS:,} events, with its blend"
        if trained
        else model,
        "serving": {
            "trending": True,
            "cold_start_task": settings.serve.cold_start_task,
            "cold_start_full_at": settings.serve.cold_start_full_at,
            "batch_size": settings.serve.batch_size,
            "torch_threads": threads,
        },
        "stages": [s.report for s in stages],
        "freshness_bound_s": bound_s,
        "highest_rate_under_bound": best,
        "duration_s": duration,
        "warm_up_s": warmed_s,
        "note": "one recommendation per user per micro-batch: events of the same user within a batch share one; "
        "consumer lag is of committed offsets (committed every second)",
        "users": users,
        "items": items,
        "machine": machine(),
    }
    rows = [(f"{s.report['rate_sent']:,.0f} events/s", _summary(s.report)) for s in stages]
    rows.append((f"highest rate with p99 < {bound_s:g} s", "none" if best is None else f"{best:,.0f} events/s"))
    write_report(report, out, rows, title="end-to-end freshness (served tiny model)")
    return report
