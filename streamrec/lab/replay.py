"""`streamrec replay`: the prequential protocol through the real stack. The model is bootstrapped on
the first part of a log; then, for a frozen model and for the online-learning one (the same stack
plus the train worker), the whole log is sent as events to an embedded broker with real ingest and
inference workers: the bootstrap part as a warm-up (histories, trending, the feedback store's
replay pool), the rest one event in flight per user, each scored against the recommendation in
force when it was sent."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamrec.catalog import Catalog
from streamrec.datasets import Dataset, LogEvent
from streamrec.events import Event, EventType, Recommendation
from streamrec.lab.prequential import PROTOCOL, Outcome, Plan, plan, report, user_steps
from streamrec.online import Cursor, increments_path, read_increments
from streamrec.settings import Settings

Log = Callable[[str], None]
MODES = ("frozen", "online")
IN_FLIGHT_TIMEOUT_S = 120.0
WARM_QUIET_S = 5.0


def to_event(e: LogEvent, n: int) -> Event:
    # Zero-padded stream positions: ties in time are broken by event_id, i.e. by the log's order.
    return Event(
        event_id=f"r{n:07d}",
        user_id=e.user_id,
        item_id=e.item_id,
        type=EventType(e.type),
        ts=datetime.fromtimestamp(e.ts, UTC),
    )


def known_by_then(the_plan: Plan, catalog: Catalog) -> Catalog:
    """The catalog as the bootstrap knew it: the items of its part of the log. The others are
    published on the catalog topic as the replay first reaches them, as a live catalog grows."""
    seen = {e.item_id for e in the_plan.bootstrap}
    return Catalog(item for item in catalog if item.item_id in seen)


def bootstrap(
    the_plan: Plan, catalog: Catalog, out_dir: Path, train_minutes: float, log: Log
) -> tuple[dict[str, Any], float]:
    """Train the model on the bootstrap part (offline protocol inside it), fit and save its blend;
    returns the offline metrics of that part and the training seconds."""
    from streamrec.datasets import leave_one_out
    from streamrec.lab.offline import compare
    from streamrec.model.training import train
    from streamrec.settings import load_settings

    split = leave_one_out(the_plan.bootstrap)
    settings = load_settings()
    cfg = settings.train.model_copy(update={"max_minutes": train_minutes})
    started = time.monotonic()
    catalog = known_by_then(the_plan, catalog)
    rec, _ = train(split, catalog, out_dir, cfg, log=log)
    seconds = time.monotonic() - started
    models = compare(
        rec,
        split,
        catalog,
        save_blend=out_dir,
        blend_window=settings.model.blend_window,
        blend_decay=settings.model.blend_decay,
        log=log,
    )
    return models, seconds


class RecWatcher:
    """Every recommendation on the topic as it arrives: the newest per user (by trigger position)
    and the set of triggers answered."""

    def __init__(self, settings: Settings) -> None:
        from kafka import TopicPartition

        from streamrec.kafka.clients import consumer

        self.consumer: Any = consumer(settings.kafka, enable_auto_commit=False, fetch_max_wait_ms=20)
        topic = settings.topics.recommendations
        parts = None
        deadline = time.monotonic() + 30
        while not parts and time.monotonic() < deadline:
            parts = self.consumer.partitions_for_topic(topic)
            if not parts:
                time.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(parts or [])]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.latest: dict[str, Recommendation] = {}
        self.answered: set[str] = set()
        self.count = 0

    def poll(self, timeout_ms: int = 20) -> list[Recommendation]:
        got: list[Recommendation] = []
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            for record in records:
                rec = Recommendation.model_validate_json(record.value)
                self.count += 1
                trigger = rec.trigger_event_id or ""
                self.answered.add(trigger)
                old = self.latest.get(rec.user_id)
                if old is None or (old.trigger_event_id or "") <= trigger:
                    self.latest[rec.user_id] = rec
                got.append(rec)
        return got

    def close(self) -> None:
        self.consumer.close()


class Pace:
    """Time compression with a trainer in the loop. A replay sends in minutes what took months, so
    unpaced it would outrun the trainer and measure little but its speed. At the real event rate
    the trainer keeps up: the replay waits while more than `lead` sent events that make a training
    example (every event but a user's first) are not yet consumed by the trainer (its cursor's
    `fresh_total`), at most `patience_s` per wait."""

    def __init__(self, settings: Settings, lead: int, log: Log, patience_s: float = 900.0) -> None:
        self.cursor = Cursor(settings)
        self.lead, self.log, self.patience_s = lead, log, patience_s
        self.examples = 0  # sent events that make a training example
        self.open = True
        self.waiting_since: float | None = None
        self.checked = 0.0
        self.waited = 0.0

    def sent(self, makes_example: bool) -> None:
        self.examples += makes_example

    def ahead(self) -> int:
        return self.examples - self.cursor.get().fresh_total

    def may_send(self, in_flight: int) -> bool:
        """Whether new steps may go now (checked at most every 0.2 s; the cursor is a file)."""
        now = time.monotonic()
        if now - self.checked < 0.2:
            return self.open
        self.checked = now
        self.open = self.ahead() + in_flight < self.lead
        if self.open:
            if self.waiting_since is not None:
                self.waited += now - self.waiting_since
                self.waiting_since = None
        elif self.waiting_since is None:
            self.waiting_since = now
        elif now - self.waiting_since > self.patience_s:
            self.log(f"the trainer has not moved for {self.patience_s:.0f}s: replaying on without it")
            self.lead = self.examples + 10**9
            self.open = True
        return self.open


def mode_settings(base: Settings, mode: str, model_dir: Path, since: datetime, online: dict[str, Any]) -> Settings:
    from streamrec.kafka.topics import tagged_topics

    tag = f"{mode}-{uuid.uuid4().hex[:6]}"
    return base.model_copy(
        update={
            "app_id": f"streamrec-replay-{tag}",
            "data_dir": base.data_dir / f"replay-{tag}",
            "topics": tagged_topics(base.topics, f"replay-{tag}"),
            # Three workers and the replay share the cores: one torch thread each, or they thrash.
            "model": base.model.model_copy(update={"base": str(model_dir.resolve()), "top_k": 10, "threads": 1}),
            "serve": base.serve.model_copy(update={"exclude_seen": True, "batch_within_s": 0.02}),
            "ingest": base.ingest.model_copy(update={"batch_within_s": 0.02}),
            "kafka": base.kafka.model_copy(update={"fetch_max_wait_ms": 20}),
            "online": base.online.model_copy(update={"since": since, "horizon_s": 1e9, **online}),
        }
    )


def run_mode(
    mode: str,
    the_plan: Plan,
    catalog: Catalog,
    model_dir: Path,
    online: dict[str, Any],
    log: Log,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Replay the whole log through a fresh stack; the online mode adds the train worker."""
    from tqdm.auto import tqdm

    from streamrec.kafka.clients import producer
    from streamrec.kafka.offsets import committed_offsets, wait_caught_up
    from streamrec.kafka.topics import create_topics
    from streamrec.lab.runner import local_stack, running_workers
    from streamrec.lab.traffic import event_topic, send_catalog, send_events

    since = datetime.fromtimestamp(the_plan.bootstrap[-1].ts, UTC)
    started = time.monotonic()
    with local_stack(Settings(), say=log) as stack:
        settings = mode_settings(stack, mode, model_dir, since, online)
        create_topics(settings.kafka, settings.topics)
        roles = ["ingest", "infer"] + (["train"] if mode == "online" else [])
        with running_workers(settings, roles, say=log) as procs:
            published = set(send_catalog(settings, known_by_then(the_plan, catalog)))
            watcher = RecWatcher(settings)
            prod = producer(settings.kafka, linger_ms=5)

            def send(event: Event) -> None:
                prod.send(
                    event_topic(settings, event), key=event.user_id.encode(), value=event.model_dump_json().encode()
                )

            def check_alive() -> None:
                for role, proc in procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"the {role} worker exited (log under {settings.data_dir / 'logs'})")

            # 1. Warm-up: the bootstrap part in bulk. Done when the ingest worker has committed every
            # event, every user has a recommendation, and the inference worker has been idle for a
            # while (clicks and purchases come from two topics, so a user's final trigger is not
            # certain: see the ingest agent; quiet is the only safe signal).
            users = {e.user_id for e in the_plan.bootstrap}
            stats = send_events(settings, (to_event(e, n) for n, e in enumerate(the_plan.bootstrap)))
            log(f"{mode}: {stats.sent:,} warm-up events sent; waiting for the workers")
            wait_caught_up(settings.kafka, settings.app_id, stats.ends, timeout=1800, proc=procs["ingest"])
            infer_group = settings.app_id + "-infer"
            quiet_since, last_seen, committed = time.monotonic(), watcher.count, None
            while True:
                watcher.poll(500)
                now_committed = committed_offsets(settings.kafka, infer_group, [settings.topics.history_updates])
                if watcher.count != last_seen or now_committed != committed:
                    quiet_since, last_seen, committed = time.monotonic(), watcher.count, now_committed
                if users <= set(watcher.latest) and time.monotonic() - quiet_since > WARM_QUIET_S:
                    break
                check_alive()
            warmed = time.monotonic()

            # 2. The replay, window by window; inside a window one event in flight per user.
            outcomes: list[Outcome] = []
            missing = 0
            offset = len(the_plan.bootstrap)
            index = 0
            lead = 2 * (settings.online.min_new_examples + settings.online.holdout)
            pace = Pace(settings, lead=lead, log=log) if mode == "online" else None
            active = set(users)  # users with an event sent so far
            bar = tqdm(total=len(the_plan.replayed), desc=f"{mode}: replay", unit="event", leave=False)
            for w, window in enumerate(the_plan.windows):
                events = [to_event(e, offset + index + n) for n, e in enumerate(window)]
                queues = {u: deque(steps) for u, steps in user_steps(window).items()}
                index += len(window)
                in_flight: dict[str, tuple[str, int, float]] = {}  # user -> (last event id, size, sent at)
                while queues or in_flight:
                    if pace is not None and queues and not pace.may_send(len(in_flight)):
                        watcher.poll(200)  # answers still come in while the trainer catches up
                    for user in [u for u in queues if u not in in_flight and (pace is None or pace.open)]:
                        step = queues[user].popleft()
                        if not queues[user]:
                            del queues[user]
                        rec = watcher.latest.get(user)
                        listed = None if rec is None else tuple(x.item_id for x in rec.items)
                        for n in step:
                            outcomes.append(
                                Outcome(
                                    index=index - len(window) + n,
                                    window=w,
                                    target=events[n].item_id,
                                    recommended=listed,
                                    adapter=None if rec is None else rec.model.adapter,
                                )
                            )
                            if (item := catalog.get(events[n].item_id)) is not None and item.item_id not in published:
                                # An item new since the bootstrap enters the catalog just before its first event.
                                published.add(item.item_id)
                                prod.send(
                                    settings.topics.catalog,
                                    key=item.item_id.encode(),
                                    value=item.model_dump_json().encode(),
                                )
                            send(events[n])
                            if pace is not None:
                                pace.sent(user in active)  # a user's first event makes no example
                            active.add(user)
                        in_flight[user] = (events[step[-1]].event_id, len(step), time.monotonic())
                    prod.flush()
                    watcher.poll(20)
                    now = time.monotonic()
                    for user, (eid, size, sent_at) in list(in_flight.items()):
                        if eid in watcher.answered or now - sent_at > IN_FLIGHT_TIMEOUT_S:
                            missing += eid not in watcher.answered
                            del in_flight[user]
                            bar.update(size)
                    if in_flight:
                        check_alive()
            bar.close()
            prod.close()
            watcher.close()
            replay_seconds = time.monotonic() - warmed
        increments = read_increments(settings)
        if keep is not None:
            # The stack's data dir may be temporary: keep the workers' logs and the trainer's record.
            shutil.copytree(settings.data_dir / "logs", keep, dirs_exist_ok=True)
            if increments_path(settings).is_file():
                shutil.copy(increments_path(settings), keep)
    result = report(outcomes, len(the_plan.windows), {e.item_id for e in the_plan.bootstrap})
    result |= {
        "seconds": round(time.monotonic() - started, 1),
        "waited_for_trainer_s": round(pace.waited, 1) if pace is not None else 0.0,
        "replay_seconds": round(replay_seconds, 1),
        "missing_recommendations": missing,
    }
    if mode == "online":
        result["increments"] = increments
    return result


def run(
    dataset: Dataset,
    out: Path,
    *,
    bootstrap_share: float = 0.5,
    windows: int = 5,
    train_minutes: float = 10.0,
    model: Path | None = None,
    modes: tuple[str, ...] = MODES,
    online: dict[str, Any] | None = None,
    log: Log = print,
) -> dict[str, Any]:
    from streamrec.lab.bench import machine

    the_plan = plan(dataset.events, bootstrap_share, windows)
    log(
        f"{dataset.name}: {len(the_plan.bootstrap):,} bootstrap events, {len(the_plan.replayed):,} replayed "
        f"in {windows} windows"
    )
    report_: dict[str, Any] = {
        "dataset": dataset.name,
        "protocol": PROTOCOL,
        "events": {"bootstrap": len(the_plan.bootstrap), "replayed": len(the_plan.replayed)},
        "users": dataset.users,
        "items": len(dataset.catalog),
        "machine": machine(),
    }
    if model is None:
        model = out.with_name(out.stem + "-model")
        offline, seconds = bootstrap(the_plan, dataset.catalog, model, train_minutes, log)
        report_["bootstrap"] = {"model_dir": str(model), "train_seconds": round(seconds, 1), "offline": offline}
    else:
        report_["bootstrap"] = {"model_dir": str(model)}
    online_cfg = {
        "interval_s": 5.0,
        "min_new_examples": 2500,
        "holdout": 300,
        "gate_min_examples": 100,
        # The store keeps the whole log: the online run's training replay and its refitted blend see
        # everything it has seen, as the frozen model saw all of the bootstrap part.
        "capacity": max(100, len(dataset.events)),
        **(online or {}),
    }
    report_["online_settings"] = online_cfg
    for mode in modes:
        log(f"--- {mode} run")
        keep = out.with_name(f"{out.stem}-{mode}-logs")
        report_[mode] = run_mode(mode, the_plan, dataset.catalog, model, online_cfg, log, keep=keep)
        log(f"{mode}: all {report_[mode]['all']}, second half {report_[mode]['second_half']}")
    if "online" in report_:
        incs = report_["online"].get("increments", [])
        report_["adapters"] = {
            "promoted": sum(1 for i in incs if i.get("version")),
            "refused": sum(1 for i in incs if not i.get("version")),
        }
    if "online" in report_ and "frozen" in report_:
        ratios = {}
        for part in ("first_half", "second_half", "all"):
            for metric in ("HR@10", "NDCG@10"):
                f, o = report_["frozen"][part][metric], report_["online"][part][metric]
                ratios[f"{part} {metric}"] = round(o / f, 4) if f else None
        report_["online_vs_frozen"] = ratios
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report_, indent=2, default=str) + "\n")
    plot(report_, out.with_suffix(".png"))
    return report_


def plot(report_: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in MODES:
        if mode in report_:
            values = [w["HR@10"] for w in report_[mode]["windows"]]
            ax.plot(range(1, len(values) + 1), values, marker="o", label=mode)
    ax.set_xlabel("replay window (time order)")
    ax.set_ylabel("HR@10 of the recommendation in force")
    ax.set_title(f"{report_['dataset']}: prequential HR@10, online vs frozen")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
