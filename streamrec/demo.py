"""`streamrec demo`: the whole pipeline on one machine. Starts the embedded broker (unless
STREAMREC_KAFKA__BOOTSTRAP_SERVERS is set), creates the topics, runs the workers as child processes,
drives simulated traffic into them and shows a live view until --duration or Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from streamrec.broker import EmbeddedBroker, create_topics
from streamrec.events import HistoryUpdate
from streamrec.runner import spawn_worker, stop_process, wait_http
from streamrec.settings import KafkaSettings, Settings, client_config
from streamrec.simulate import SimConfig, generate_events, make_catalog
from streamrec.traffic import SendStats, send_catalog, send_events


@dataclass
class Watch:
    """What the demo has seen on the output topics, updated by a consumer thread."""

    updates: int = 0
    dead_letters: int = 0
    latest: dict[str, HistoryUpdate] = field(default_factory=dict)
    rate_marks: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=10))

    def rate(self) -> float:
        if len(self.rate_marks) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.rate_marks[0], self.rate_marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def _watch(settings: Settings, watch: Watch, stop: threading.Event) -> None:
    from kafka import KafkaConsumer

    consumer: Any = KafkaConsumer(
        **client_config(settings.kafka), auto_offset_reset="earliest", enable_auto_commit=False
    )
    consumer.subscribe([settings.topics.history_updates, settings.topics.dlq])
    try:
        while not stop.is_set():
            for tp, records in consumer.poll(timeout_ms=300).items():
                for record in records:
                    if tp.topic == settings.topics.dlq:
                        watch.dead_letters += 1
                        continue
                    update = HistoryUpdate.model_validate_json(record.value)
                    watch.updates += 1
                    watch.latest[update.user_id] = update
    finally:
        consumer.close()


def _view(
    watch: Watch, sent: SendStats, started: float, titles: dict[str, str], followed: list[str]
) -> Group:
    now = time.monotonic()
    stats = Table.grid(padding=(0, 3))
    stats.add_row(
        f"[bold]running[/] {now - started:5.0f}s",
        f"[bold]events sent[/] {sent.sent:,} ({sent.sent / max(now - started, 1e-6):,.0f}/s)",
        f"[bold]history updates[/] {watch.updates:,} ({watch.rate():,.0f}/s)",
        f"[bold]dead letters[/] {watch.dead_letters}",
    )
    users = Table(title="latest histories (newest last)", expand=True)
    users.add_column("user")
    users.add_column("events", justify="right")
    users.add_column("last items")
    for user in followed:
        update = watch.latest.get(user)
        if update is None:
            continue
        last = ", ".join(
            f"{'$' if e.type == 'purchase' else ''}{titles.get(e.item_id, e.item_id)}"
            for e in update.events[-3:]
        )
        users.add_row(user, str(len(update.events)), last)
    return Group(Panel(stats, title="streamrec demo"), users)


def run(duration: float | None, rate: float, users: int, items: int, seed: int) -> int:
    console = Console()
    base = Settings()
    with contextlib.ExitStack() as stack:
        if "STREAMREC_KAFKA__BOOTSTRAP_SERVERS" in os.environ:
            kafka = base.kafka
            data_dir = base.data_dir
        else:
            broker = stack.enter_context(EmbeddedBroker())
            console.print(f"embedded broker on {broker.bootstrap_servers} (memory storage)")
            kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
            # A fresh broker has no changelogs: local state from an earlier run would not match it.
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streamrec-demo-")))
        settings = base.model_copy(update={"kafka": kafka, "data_dir": data_dir, "rebalance_timeout_s": 3.0})
        created = create_topics(kafka, settings.topics)
        console.print(f"topics ready ({len(created)} created)")

        cfg = SimConfig(users=users, items=items, seed=seed)
        catalog = make_catalog(cfg)
        send_catalog(settings, catalog)
        titles = {item.item_id: item.title for item in catalog}

        logs = data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        console.print(f"starting the ingest worker (log: {logs / 'ingest.log'})")
        ingest = spawn_worker("ingest", settings, log=logs / "ingest.log")
        stack.callback(stop_process, ingest)
        wait_http(f"http://127.0.0.1:{settings.web_port}/healthz", timeout=120, proc=ingest)

        stop = threading.Event()
        stack.callback(stop.set)
        watch = Watch()
        threading.Thread(target=_watch, args=(settings, watch, stop), daemon=True).start()
        sent = SendStats()
        sender = threading.Thread(
            target=send_events,
            kwargs={
                "settings": settings,
                "events": generate_events(cfg, 10_000_000),
                "rate": rate,
                "stats": sent,
                "stop": stop,
            },
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
                    if ingest.poll() is not None:
                        console.print(
                            f"[red]the ingest worker stopped (code {ingest.returncode}); see its log[/]"
                        )
                        return 1
                    watch.rate_marks.append((time.monotonic(), watch.updates))
                    if len(followed) < 5:
                        followed += [u for u in list(watch.latest) if u not in followed][: 5 - len(followed)]
                    live.update(_view(watch, sent, started, titles, followed))
                    time.sleep(0.5)
        except KeyboardInterrupt:
            interrupted = True
        stop.set()
        sender.join(timeout=10)
        console.print(("interrupted" if interrupted else "done") + ": stopping the workers and the broker")
    return 0
