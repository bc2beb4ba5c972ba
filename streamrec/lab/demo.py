"""`streamrec demo`: the whole pipeline on one machine. Starts the embedded broker (unless
STREAMREC_KAFKA__BOOTSTRAP_SERVERS is set), creates the topics, gets a model, runs the ingest,
inference and train workers as child processes, drives simulated traffic into them and shows a live
view (recommendations, and the adapters the trainer promotes and the inference worker swaps in)
until --duration or Ctrl-C. Nothing is left running when it returns."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from streamrec.events import Event, Recommendation
from streamrec.kafka.clients import consumer
from streamrec.lab.runner import local_stack, running_workers
from streamrec.lab.simulate import SimConfig, generate_events, make_catalog
from streamrec.lab.traffic import SendStats, send_catalog, send_events
from streamrec.online import increments_path
from streamrec.settings import Settings

TRAIN_EVENTS = 15_000  # simulated history the tiny model learns from before the live stream
# The train worker, scaled to a demo: look every 15 s, train on the newest 1,000 examples (a few
# seconds of traffic) and gate on the 300 after them. An increment of the tiny T5 then takes seconds
# of CPU, so adapters are promoted and swapped in within the first minutes even on a busy 2-core
# machine. STREAMREC_ONLINE__* variables that are set win over these.
DEMO_ONLINE: dict[str, Any] = {
    "interval_s": 15.0,
    "min_new_examples": 500,
    "holdout": 300,
    "gate_min_examples": 200,
    "max_train_examples": 1000,
    "capacity": 10_000,
}
_WAITING = re.compile(r"trainer: (\d+) new examples \(need (\d+) \+ (\d+) held out\)")


@dataclass
class Watch:
    """What the demo has seen on the output topics, updated by a consumer thread."""

    recommendations: int = 0
    dead_letters: int = 0
    latest: dict[str, Recommendation] = field(default_factory=dict)
    freshness: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    marks: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=10))
    model: str = "-"  # base and adapter of the newest recommendation
    served: Counter[str] = field(default_factory=Counter)  # recommendations per adapter version
    first_served: dict[str, datetime] = field(default_factory=dict)  # adapter -> first recommendation with it

    def rate(self) -> float:
        if len(self.marks) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def percentile(self, q: float) -> float | None:
        values = sorted(self.freshness)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None


def _watch(settings: Settings, watch: Watch, sent: SendStats, stop: threading.Event) -> None:
    reader = consumer(settings.kafka, auto_offset_reset="earliest", enable_auto_commit=False)
    reader.subscribe([settings.topics.recommendations, settings.topics.dlq])
    try:
        while not stop.is_set():
            for tp, records in reader.poll(timeout_ms=300).items():
                for record in records:
                    if tp.topic == settings.topics.dlq:
                        watch.dead_letters += 1
                        continue
                    rec = Recommendation.model_validate_json(record.value)
                    watch.recommendations += 1
                    watch.latest[rec.user_id] = rec
                    adapter = rec.model.adapter or "-"
                    watch.model = f"{rec.model.base} adapter {adapter}"
                    watch.served[adapter] += 1
                    watch.first_served.setdefault(adapter, datetime.now().astimezone())
                    appended = sent.appended.get(rec.trigger_event_id or "")
                    if appended is not None:
                        watch.freshness.append(record.timestamp / 1000 - appended)
    finally:
        reader.close()


@dataclass
class Trainer:
    """What the train worker has done, read from the files it writes: one line per increment in
    DATA_DIR/increments.jsonl, and its progress toward the next one in its log."""

    increments_log: Path
    worker_log: Path
    increments: list[dict[str, Any]] = field(default_factory=list)
    waiting: str = ""
    _read: int = 0

    def refresh(self) -> None:
        with contextlib.suppress(FileNotFoundError), self.increments_log.open("rb") as f:
            f.seek(self._read)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # being written: read it next time
                self._read += len(line)
                with contextlib.suppress(ValueError):
                    self.increments.append(json.loads(line))
        with contextlib.suppress(OSError):
            with self.worker_log.open("rb") as f:
                f.seek(max(0, f.seek(0, 2) - 20_000))
                said = [line for line in f.read().decode(errors="replace").splitlines() if "trainer: " in line]
            # Only while its newest word is that it waits: after an increment that line is stale.
            waiting = _WAITING.search(said[-1]) if said else None
            self.waiting = ""
            if waiting:
                fresh, need, held = map(int, waiting.groups())
                self.waiting = f"{fresh:,} new examples of {need + held:,} needed"

    @property
    def promoted(self) -> list[dict[str, Any]]:
        return [i for i in self.increments if i.get("version")]


def _metric(record: dict[str, Any], side: str, name: str = "HR@10") -> str:
    value = record.get("decision", {}).get(side, {}).get(name)
    return "-" if value is None else f"{value:.3f}"


def _online_view(trainer: Trainer, watch: Watch, max_train: int) -> Table:
    refused = len(trainer.increments) - len(trainer.promoted)
    status = (
        f"{len(trainer.increments)} increments, {len(trainer.promoted)} promoted, {refused} refused"
        if trainer.increments
        else "waiting for the first increment"
    )
    if trainer.waiting:
        status += f" (next: {trainer.waiting})"
    table = Table(
        title=f"online learning: {status}",
        caption=f"examples: new / replayed (at most {max_train:,} trained on); HR@10: in service → candidate on "
        "held-out feedback; in service: first recommendation made with it",
        expand=True,
    )
    for column in ("#", "gate", "adapter", "parent", "examples", "HR@10", "took", "in service"):
        table.add_column(column, no_wrap=True)
    for n, record in list(enumerate(trainer.increments, 1))[-6:]:
        version = record.get("version")
        accepted = record.get("decision", {}).get("accepted", False)
        served_at = watch.first_served.get(version or "")
        try:
            lag = (served_at - datetime.fromisoformat(record["at"])).total_seconds() if served_at else None
        except (KeyError, ValueError):
            lag = None
        table.add_row(
            str(n),
            "[green]accepted[/]" if accepted else "[red]refused[/]",
            version or "-",
            record.get("parent") or "base",
            f"{record.get('fresh', 0):,}/{record.get('replay', 0):,}",
            f"{_metric(record, 'current')}→{_metric(record, 'candidate')}",
            f"{record.get('seconds', 0):.0f}s",
            "-" if version is None else ("waiting" if lag is None else f"+{max(lag, 0):.1f}s"),
        )
    return table


def _view(
    watch: Watch,
    sent: SendStats,
    started: float,
    titles: dict[str, str],
    followed: list[str],
    trainer: Trainer,
    max_train: int,
) -> Group:
    now = time.monotonic()
    p50, p99 = watch.percentile(0.5), watch.percentile(0.99)
    stats = Table.grid(padding=(0, 3))
    stats.add_row(
        f"[bold]running[/] {now - started:4.0f}s",
        f"[bold]events[/] {sent.sent:,} ({sent.sent / max(now - started, 1e-6):,.0f}/s)",
        f"[bold]recommendations[/] {watch.recommendations:,} ({watch.rate():,.0f}/s)",
    )
    stats.add_row(
        f"[bold]dead letters[/] {watch.dead_letters}",
        "[bold]freshness[/] " + (f"p50 {p50 * 1000:,.0f} ms  p99 {p99 * 1000:,.0f} ms" if p50 and p99 else "-"),
        f"[bold]model[/] {watch.model}",
    )
    served = ", ".join(f"{version} {n:,}" for version, n in sorted(watch.served.items()))
    by_adapter = f"[bold]recommendations by adapter[/] {served or '-'}"
    users = Table(title="latest recommendations", expand=True)
    users.add_column("user")
    users.add_column("task")
    users.add_column("top items (why)")
    for user in followed:
        rec = watch.latest.get(user)
        if rec is not None:
            top = ", ".join(f"{titles.get(i.item_id, i.item_id)} ({i.explanation or i.reason})" for i in rec.items[:3])
            users.add_row(user, rec.task or "trending", escape(top))
    return Group(
        Panel(Group(stats, by_adapter), title="streamrec demo"), users, _online_view(trainer, watch, max_train)
    )


def prepare_model(settings: Settings, cfg: SimConfig, history: list[Event], console: Console) -> str:
    """The model the inference worker will serve: the configured checkpoint when it is available
    here; otherwise the tiny T5, trained now on simulated history."""
    from streamrec.generation import TINY, tiny_dir

    base = settings.model.base
    if base != TINY and (Path(base).is_dir() or _in_hub_cache(base)):
        console.print(f"model: {base}")
        return base
    if base != TINY:
        console.print(f"[yellow]model {base!r} is not available offline: training the tiny T5 instead[/]")
    from streamrec.datasets import LogEvent, leave_one_out
    from streamrec.model.recommender import resolve_device
    from streamrec.model.training import train
    from streamrec.settings import TrainSettings

    log = [LogEvent(e.user_id, e.item_id, e.ts.timestamp(), e.type.value, n) for n, e in enumerate(history)]
    budget = TrainSettings(epochs=6, max_minutes=1.0, eval_users=200, patience=2)
    console.print(
        f"training the tiny T5 on {len(history):,} simulated events "
        f"({resolve_device(settings.model.device)}, at most {budget.max_minutes:g} min)"
    )
    _, report = train(
        leave_one_out(log),
        _catalog(cfg),
        tiny_dir(settings),
        budget,
        base=TINY,
        device=settings.model.device,
        log=lambda msg: console.print(f"  {msg}"),
    )
    console.print(f"tiny T5 ready: validation NDCG@10 {report.best_val_ndcg10:.3f} after {report.seconds:.0f}s")
    return TINY


def _catalog(cfg: SimConfig) -> Any:
    from streamrec.catalog import Catalog

    return Catalog(make_catalog(cfg))


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _in_hub_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:
        return False


def run(duration: float | None, rate: float, users: int, items: int, seed: int) -> int:
    console = Console()
    base = Settings()
    with contextlib.ExitStack() as stack:
        settings = stack.enter_context(local_stack(base, console.print))
        cfg = SimConfig(users=users, items=items, seed=seed)
        catalog = make_catalog(cfg)
        send_catalog(settings, catalog)
        titles = {item.item_id: item.title for item in catalog}
        # One long stream: its start is the history the model learns from, the rest goes live.
        stream: Iterator[Event] = generate_events(cfg, 10_000_000)
        history = list(itertools.islice(stream, TRAIN_EVENTS))
        model = prepare_model(settings, cfg, history, console)
        online = {k: v for k, v in DEMO_ONLINE.items() if k not in base.online.model_fields_set}
        settings = settings.model_copy(
            update={
                "model": settings.model.model_copy(update={"base": model}),
                "online": settings.online.model_copy(update=online),
            }
        )
        o = settings.online
        console.print(
            f"train worker: every {o.interval_s:g}s, an increment once {o.min_new_examples:,} new examples "
            f"(+{o.holdout:,} held out for the gate) have arrived"
        )
        # Three busy workers share the cores. A torch process with as many threads as the machine
        # has cores spends most of its time waiting on threads the others have pushed off the CPU
        # (on a busy 2-core machine an increment ran five times slower with 2 threads than with 1).
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _usable_cpus() // 3)))
        workers = stack.enter_context(running_workers(settings, ("ingest", "infer", "train"), console.print))
        trainer = Trainer(increments_path(settings), settings.data_dir / "logs" / "train.log")

        stop = threading.Event()
        stack.callback(stop.set)
        sent = SendStats()
        watch = Watch()
        threading.Thread(target=_watch, args=(settings, watch, sent, stop), daemon=True).start()
        sender = threading.Thread(
            target=send_events,
            kwargs={"settings": settings, "events": stream, "rate": rate, "stats": sent, "stop": stop},
            daemon=True,
        )
        sender.start()

        started = time.monotonic()
        followed: list[str] = []
        interrupted = False

        def on_sigterm(*_: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_sigterm)
        try:
            with Live(console=console, refresh_per_second=2) as live:
                while duration is None or time.monotonic() - started < duration:
                    for role, proc in workers.items():
                        if proc.poll() is not None:
                            console.print(f"[red]the {role} worker stopped (code {proc.returncode}); see its log[/]")
                            return 1
                    watch.marks.append((time.monotonic(), watch.recommendations))
                    if len(followed) < 5:
                        followed += [u for u in list(watch.latest) if u not in followed][: 5 - len(followed)]
                    trainer.refresh()
                    live.update(_view(watch, sent, started, titles, followed, trainer, o.max_train_examples))
                    time.sleep(0.5)
        except KeyboardInterrupt:
            interrupted = True
        stop.set()
        sender.join(timeout=10)
        p50, p99 = watch.percentile(0.5), watch.percentile(0.99)
        trainer.refresh()
        promoted = ", ".join(i["version"] for i in trainer.promoted) or "none"
        console.print(
            f"{'interrupted' if interrupted else 'done'}: {sent.sent:,} events, {watch.recommendations:,} "
            f"recommendations, freshness p50 {1000 * (p50 or 0):.0f} ms p99 {1000 * (p99 or 0):.0f} ms; "
            f"{len(trainer.increments)} increments, adapters promoted: {promoted}, served: "
            f"{', '.join(f'{v} {n:,}' for v, n in sorted(watch.served.items())) or '-'}; "
            "stopping the workers and the broker"
        )
    return 0
