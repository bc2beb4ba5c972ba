"""The train worker with the ingest and inference workers on a real broker: feedback becomes stored
examples, a gated increment is promoted and announced, the inference worker serves it without losing
a user's final recommendation, the train worker stays responsive while it trains, and a SIGKILL
neither loses nor double-counts an example."""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from streamtest import Ends, send_raw, start_worker
from test_adapters import metric, recommendations
from test_infer import as_raw, wait_for_final
from walks import CATALOG_ITEMS, ITEMS, walk

from streamrec.events import DeadLetter
from streamrec.feedback_store import ExampleStore
from streamrec.generation import tiny_dir
from streamrec.kafka.broker import free_port
from streamrec.kafka.offsets import wait_caught_up
from streamrec.kafka.topics import create_topics, read_topic
from streamrec.lab.runner import stop_process
from streamrec.online import Cursor
from streamrec.registry import AdapterRegistry
from streamrec.settings import Settings, registry_root

pytestmark = [pytest.mark.kafka, pytest.mark.model, pytest.mark.slow]

T0 = datetime(2024, 6, 1, tzinfo=UTC)
CATALOG = CATALOG_ITEMS
LAG_BOUND_S = 2.0  # liveness, not performance: the loop must never wait on a training step


def click(user: str, n: int, item: str, seconds: float, kind: str = "click") -> dict[str, Any]:
    ts = T0 + timedelta(seconds=seconds)
    return {"event_id": f"{user}-{n}", "user_id": user, "item_id": item, "type": kind, "ts": ts.isoformat()}


def walks(users: int, steps: range, starts: dict[str, int], kinds: random.Random | None = None) -> list[dict[str, Any]]:
    """Step `steps` of each user's walk, interleaved across users and in event-time order."""
    out = []
    for step in steps:
        for u in range(users):
            user = f"user{u:02d}"
            kind = "purchase" if kinds is not None and step > 1 and kinds.random() < 0.2 else "click"
            out.append(click(user, step, f"i{(starts[user] + step) % ITEMS}", step * 60 + u, kind))
    return out


@dataclass
class Probe:
    """Polls a worker's /healthz and /metrics from a thread: when each answered, how long it took,
    and the event-loop lag gauge it reported."""

    port: int
    period: float = 0.25
    health: list[tuple[float, float | None]] = field(default_factory=list)  # (wall start, seconds or None)
    lag: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Probe:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started, t0 = time.time(), time.monotonic()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=LAG_BOUND_S * 2).close()
                self.health.append((started, time.monotonic() - t0))
                self.lag.append(metric(self.port, "streamrec_event_loop_lag_seconds"))
            except OSError:
                self.health.append((started, None))
            self._stop.wait(self.period)


def increments(settings: Settings) -> list[dict[str, Any]]:
    path = settings.data_dir / "increments.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(check: Any, what: str, timeout: float, procs: list[Any]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            assert proc.poll() is None, f"a worker died while waiting for {what}"
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def settled(read: Any, procs: list[Any], quiet_s: float = 3.0) -> Any:
    """`read()` once it has not changed for `quiet_s` (a purchase and the clicks before it come on
    two topics, so how many examples the traffic made is known only once the agent has read it all)."""
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.5)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        assert all(p.poll() is None for p in procs), "a worker died"
    return value


def test_trainer_promotes_an_adapter_the_inference_worker_serves_while_staying_responsive(
    make_settings: Any, tmp_path: Path, walk_model: Path
) -> None:
    online = {
        "interval_s": 2.0,
        "min_new_examples": 40,
        "holdout": 20,
        "gate_min_examples": 10,
        "gate_tolerance": 0.05,
        "horizon_s": 1e7,
        "batch_size": 16,
        "epochs": 2,
    }
    settings = make_settings(
        model={"base": "tiny", "top_k": 5, "device": "cpu"}, serve={"batch_within_s": 0.05}, online=online
    )
    shutil.copytree(walk_model, tiny_dir(settings))
    create_topics(settings.kafka, settings.topics)
    infer_settings = settings.model_copy(update={"web_port": free_port()})
    train_settings = settings.model_copy(update={"web_port": free_port()})
    workers = []
    probe = Probe(train_settings.web_port)
    try:
        workers.append(start_worker("ingest", settings, tmp_path / "ingest.log"))
        workers.append(infer := start_worker("infer", infer_settings, tmp_path / "infer.log"))
        workers.append(start_worker("train", train_settings, tmp_path / "train.log"))
        probe.start()
        send_raw(settings, [(settings.topics.catalog, i.item_id, i.model_dump_json().encode()) for i in CATALOG])

        users = 24
        rng = random.Random(7)
        starts = {f"user{u:02d}": rng.randrange(ITEMS) for u in range(users)}
        kinds = random.Random(8)
        traffic = walks(users, range(7), starts, kinds)
        send_raw(settings, [as_raw(settings, e) for e in traffic], rate=100)

        # Examples are stored, then an increment is gated, registered, promoted and announced.
        port = train_settings.web_port
        wait_until(lambda: metric(port, "streamrec_feedback_store_examples") >= 60, "examples", 120, workers)
        registry = AdapterRegistry(registry_root(settings))
        wait_until(registry.current_version, "a promoted adapter", 300, workers)
        accepted_metric = 'streamrec_gate_decisions_total{decision="accepted"}'
        wait_until(lambda: metric(port, accepted_metric) >= 1, "the gate decision metric", 30, workers)
        accepted = [r for r in increments(settings) if r["decision"]["accepted"]]
        assert accepted and accepted[0]["parent"] is None and accepted[0]["version"] == "v0001"
        assert registry.get("v0001").parent is None and registry.verify(registry.get("v0001"))
        assert metric(port, "streamrec_feedback_examples_total") >= 60

        # More traffic until the inference worker has swapped the adapter in, then every user's
        # final click: each gets its recommendation, from a promoted adapter.
        step = 7
        while metric(infer_settings.web_port, "streamrec_adapter_swaps_total") < 1:
            assert step < 30, "the inference worker never put the promoted adapter in service"
            more = walks(users, range(step, step + 1), starts)
            send_raw(settings, [as_raw(settings, e) for e in more])
            step += 1
            time.sleep(2)
        finals = walks(users, range(step, step + 1), starts)
        send_raw(settings, [as_raw(settings, e) for e in finals])
        recs = wait_for_final(settings, {e["user_id"]: e["event_id"] for e in finals}, infer)
        promoted = {m.version for m in registry.versions()}
        last = {e["user_id"]: e["event_id"] for e in finals}
        final_recs = [r for r in recs if r.trigger_event_id == last.get(r.user_id)]
        assert {r.user_id for r in final_recs} == set(last)
        assert {r.model.adapter for r in final_recs} <= promoted, "final recommendations from no promoted adapter"
        assert {r.model.adapter for r in recommendations(settings)} <= promoted | {None}
        chain = {m.version: m.parent for m in registry.versions()}
        assert all(parent is None or parent in chain for parent in chain.values())

        # Late events (older than everything trained on) are fresh when they arrive. The trainer
        # ends up having consumed more examples than all on-time traffic made: once 60 are pending
        # it consumes all but the 20 newest arrivals. Going by event time it could never count a
        # late one.
        cursor = Cursor(train_settings)
        on_time = settled(lambda: metric(port, "streamrec_feedback_store_examples"), workers)
        late = [click(f"late{u:02d}", n, f"i{(u + n) % ITEMS}", n * 60 + u) for n in range(4) for u in range(users)]
        assert max(e["ts"] for e in late) < cursor.get().through.isoformat()  # type: ignore[union-attr]
        send_raw(settings, [as_raw(settings, e) for e in late])
        stored = on_time + len(late) - users  # all clicks: every event but a late user's first
        wait_until(lambda: metric(port, "streamrec_feedback_store_examples") >= stored, "late examples", 60, workers)
        wait_until(lambda: cursor.get().fresh_total > on_time, "an increment on late examples", 300, workers)

        # The train worker answered throughout, its event loop never stalled on training.
        probe.stop()
        windows = [
            (datetime.fromisoformat(r["at"]).timestamp() - r["seconds"], datetime.fromisoformat(r["at"]).timestamp())
            for r in increments(settings)
        ]
        during = [(t, took) for t, took in probe.health if any(a <= t <= b for a, b in windows)]
        assert during, f"no health check landed while an increment ran: {windows}"
        assert all(took is not None and took < LAG_BOUND_S for _, took in during), during
        assert all(took is not None for _, took in probe.health), "the train worker stopped answering"
        assert probe.lag and max(probe.lag) < LAG_BOUND_S, f"event loop lag up to {max(probe.lag):.2f}s"
        assert all(w.poll() is None for w in workers)
    finally:
        probe.stop()
        for proc in reversed(workers):
            stop_process(proc)


def test_sigkill_mid_stream_loses_no_example_and_counts_none_twice(make_settings: Any, tmp_path: Path) -> None:
    """Only the train worker, no catalog (so no increment runs): every distinct valid event that has
    an earlier event before it ends up as exactly one example across a SIGKILL and a restart."""
    # No increment runs here, but the worker checks its base at start: tiny needs no model hub.
    settings = make_settings(online={"min_new_examples": 1_000_000, "horizon_s": 1e7}, model={"base": "tiny"})
    create_topics(settings.kafka, settings.topics)
    topics = settings.topics
    users = 40
    rng = random.Random(3)
    starts = {f"user{u:02d}": rng.randrange(ITEMS) for u in range(users)}
    # Every user's first click goes in before the stream, so every later event, whatever topic it
    # comes from and in whatever order the topics are read, has something before it.
    warmup = walks(users, range(1), starts)
    stream = walks(users, range(1, 51), starts, random.Random(4))
    first, second = stream[:1200], stream[1200:]
    bad = [(topics.clicks, "user00", b"{not json"), (topics.purchases, "user01", b'{"event_id": "x"}')]
    group = settings.app_id + "-train"
    inputs = {topics.clicks, topics.purchases}

    proc = start_worker("train", settings, tmp_path / "train-1.log")
    ends: Ends = {}
    send_raw(settings, [as_raw(settings, e) for e in warmup], ends=ends)
    wait_caught_up(settings.kafka, group, ends, timeout=120, proc=proc)
    messages = [as_raw(settings, e) for e in first]
    messages[300:300] = bad
    sender = threading.Thread(target=send_raw, args=(settings, messages, 150.0, ends))
    sender.start()
    try:
        deadline = time.monotonic() + 60
        while metric(settings.web_port, "streamrec_feedback_store_examples") < 200:
            assert time.monotonic() < deadline, "the worker stored no examples"
            time.sleep(0.1)
        assert sender.is_alive(), "the kill must land mid-stream"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        sender.join()

    proc = start_worker("train", settings, tmp_path / "train-2.log")
    try:
        # Old events re-sent after the restart, mixed with new ones: none may count again.
        resent = [as_raw(settings, e) for e in random.Random(5).sample(first, 200)]
        fresh = [as_raw(settings, e) for e in second]
        # Bad recommendations are dead-lettered here (only this worker reads them); bad events are
        # skipped and counted, since the ingest worker dead-letters those.
        bad_recs = [(topics.recommendations, "user02", b"[1, 2]"), (topics.recommendations, "user03", b"[" * 9999)]
        send_raw(settings, fresh[:300] + bad + bad_recs + resent + fresh[300:], ends=ends)
        inputs.add(topics.recommendations)
        wait_caught_up(settings.kafka, group, {tp: n for tp, n in ends.items() if tp.topic in inputs}, 240, proc)
        # The store's own count, restored from disk at the restart, agrees.
        assert metric(settings.web_port, "streamrec_feedback_store_examples") == len(stream)
        # (>=: the first run's bad events may be read again after the kill)
        assert metric(settings.web_port, "streamrec_feedback_skipped_total") >= len(bad)
    finally:
        stop_process(proc)
    letters = [DeadLetter.model_validate_json(r.value) for r in read_topic(settings.kafka, topics.dlq)]
    assert sorted((d.topic, d.raw_bytes()) for d in letters) == sorted((t, v) for t, _, v in bad_recs)

    store = ExampleStore(settings.data_dir / "feedback", settings.online.capacity)
    try:
        examples = list(store.examples())
    finally:
        store.close()
    expected = {e["event_id"] for e in stream}
    ids = [e.event_id for e in examples]
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert set(ids) == expected, (sorted(expected - set(ids))[:10], sorted(set(ids) - expected)[:10])
    # Each history is the newest of the user's earlier events (all that had arrived: the two topics
    # are read independently), oldest first, so a short one starts with the warm-up click.
    for ex in examples:
        step = int(ex.event_id.rsplit("-", 1)[1])
        earlier = walk(starts[ex.user_id], step + 1)
        got = [h.item_id for h in ex.history]
        assert ex.target == earlier[-1] and got and is_subsequence(got, earlier[:-1])
        if len(got) < 20:
            assert got[0] == earlier[0], ex


def is_subsequence(sub: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(x in it for x in sub)
