"""The ingest worker against a real broker and a real RocksDB: exact histories, an exact DLQ, and
no loss or double counting across a SIGKILL, with or without the local state directory."""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
import time
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from streamtest import Ends, send_raw, start_worker

from streamrec.broker import create_topics, read_topic
from streamrec.events import DeadLetter
from streamrec.runner import committed_offsets, stop_process, wait_caught_up
from streamrec.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

MAX_EVENTS = 50
BASE = datetime(2024, 3, 1, tzinfo=UTC)


def make_events(count: int, users: int, seed: int) -> list[dict[str, Any]]:
    """Valid events with timestamps jittered so arrival order is not event-time order, some equal
    timestamps (the event_id breaks the tie), and several ISO-8601 spellings of UTC."""
    rng = random.Random(seed)
    events = []
    for i in range(count):
        ts = BASE + timedelta(seconds=10 * i + rng.randint(-900, 900))
        if rng.random() < 0.05:
            ts = BASE + timedelta(seconds=10 * (i // 50) * 50)  # collisions
        spelled = rng.choice([ts.strftime("%Y-%m-%dT%H:%M:%SZ"), ts.isoformat(), ts.astimezone().isoformat()])
        kind = "purchase" if rng.random() < 0.15 else "click"
        event: dict[str, Any] = {
            "event_id": f"ev-{seed}-{i}",
            "user_id": f"user-{rng.randrange(users)}",
            "item_id": f"item-{rng.randrange(400)}",
            "type": kind,
            "ts": spelled,
            "session_id": f"s-{i // 20}",
        }
        if kind == "purchase":
            event |= {"quantity": rng.randint(1, 3), "price": round(rng.uniform(1, 99), 2)}
        events.append(event)
    return events


def malformed(rng: random.Random, valid: dict[str, Any], kind: str) -> bytes:
    bad = dict(valid, event_id=f"bad-{rng.getrandbits(48)}")
    if kind == "not_json":
        return b"\x00{not json" + str(rng.random()).encode()
    if kind == "missing_field":
        del bad[rng.choice(["event_id", "item_id", "type", "ts"])]
    elif kind == "unknown_type":
        bad["type"] = rng.choice(["view", "refund", "", "CLICK"])
    elif kind == "bad_timestamp":
        bad["ts"] = rng.choice(["yesterday", "2024-02-30T10:00:00Z", "2024-13-01T00:00:00Z", 1709251200])
    elif kind == "wrong_json_type":
        field, value = rng.choice([("item_id", 1234), ("quantity", "two"), ("event_id", ["a"]), (None, None)])
        if field is None:
            return json.dumps([bad]).encode()
        bad[field] = value
    return json.dumps(bad).encode()


def oracle(events: list[dict[str, Any]]) -> dict[str, list[tuple[str, str, str, datetime]]]:
    """Each user's newest MAX_EVENTS unique events in event-time order, computed from scratch."""
    unique = {e["event_id"]: e for e in events}
    per_user: dict[str, list[tuple[str, str, str, datetime]]] = defaultdict(list)
    for e in unique.values():
        ts = datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).astimezone(UTC)
        per_user[e["user_id"]].append((e["event_id"], e["item_id"], e["type"], ts))
    return {u: sorted(evs, key=lambda x: (x[3], x[0]))[-MAX_EVENTS:] for u, evs in per_user.items()}


def send(
    settings: Settings, messages: list[tuple[str, str, bytes]], rate: float | None = None, ends: Ends | None = None
) -> Ends:
    """messages: (topic field, key, value)."""
    return send_raw(settings, [(getattr(settings.topics, f), k, v) for f, k, v in messages], rate, ends)


def as_message(event: dict[str, Any]) -> tuple[str, str, bytes]:
    field = "clicks" if event["type"] == "click" else "purchases"
    return field, event["user_id"], json.dumps(event).encode()


def fetch_history(settings: Settings, user: str) -> list[tuple[str, str, str, datetime]]:
    url = f"http://127.0.0.1:{settings.web_port}/users/{user}/history"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["user_id"] == user
    return [
        (e["event_id"], e["item_id"], e["type"], datetime.fromisoformat(e["ts"].replace("Z", "+00:00")))
        for e in body["events"]
    ]


def assert_histories(settings: Settings, expected: dict[str, list[tuple[str, str, str, datetime]]]) -> None:
    mismatched = [u for u, evs in expected.items() if fetch_history(settings, u) != evs]
    assert not mismatched, f"{len(mismatched)} of {len(expected)} users differ, e.g. {mismatched[:3]}"


def caught_up(settings: Settings, proc: Any, ends: Ends) -> None:
    wait_caught_up(settings.kafka, settings.app_id, ends, timeout=180, proc=proc)


def test_history_and_dlq_after_10k_events_with_duplicates_and_malformed(make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings()
    create_topics(settings.kafka, settings.topics)
    rng = random.Random(11)
    valid = make_events(9_300, users=120, seed=11)

    messages = [as_message(e) for e in valid]
    # 5% duplicates: exact re-sends, some right after the original, some thousands of messages later.
    for _ in range(500):
        i = rng.randrange(len(valid))
        messages.insert(min(len(messages), i + rng.choice([1, 5, 2_000, 6_000])), as_message(valid[i]))
    # 2% malformed, 40 of each kind, on both topics, keyed like real events.
    bad: list[tuple[str, bytes]] = []
    for kind in ("not_json", "missing_field", "unknown_type", "bad_timestamp", "wrong_json_type"):
        for _ in range(40):
            source = rng.choice(valid)
            field = rng.choice(["clicks", "purchases"])
            value = malformed(rng, source, kind)
            bad.append((getattr(settings.topics, field), value))
            messages.insert(rng.randrange(len(messages)), (field, source["user_id"], value))
    assert len(messages) == 10_000

    proc = start_worker("ingest", settings, tmp_path / "worker.log")
    try:
        caught_up(settings, proc, send(settings, messages))
        assert_histories(settings, oracle(valid))
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/users/nobody/history") as r:
            pytest.fail(f"unknown user answered {r.status}")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    finally:
        stop_process(proc)

    letters = [DeadLetter.model_validate_json(r.value) for r in read_topic(settings.kafka, settings.topics.dlq)]
    assert sorted((d.topic, d.raw_bytes()) for d in letters) == sorted(bad)
    assert all(d.error and d.offset >= 0 and 0 <= d.partition < 4 for d in letters)
    reasons = " ".join(d.error for d in letters)
    for word in ("not JSON", "Field required", "type", "ts", "valid"):
        assert word in reasons


@pytest.mark.parametrize("keep_state", [True, False], ids=["local-rocksdb", "rebuilt-from-changelog"])
def test_sigkill_mid_stream_loses_nothing_and_counts_nothing_twice(
    make_settings: Any, tmp_path: Path, keep_state: bool
) -> None:
    settings = make_settings()
    create_topics(settings.kafka, settings.topics)
    valid = make_events(6_000, users=60, seed=23 if keep_state else 29)
    first, second = valid[:4_000], valid[4_000:]

    proc = start_worker("ingest", settings, tmp_path / "worker-1.log")
    inputs = [settings.topics.clicks, settings.topics.purchases]

    def wait_committed(count: int) -> None:
        deadline = time.monotonic() + 60
        while sum(committed_offsets(settings.kafka, settings.app_id, inputs).values()) < count:
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.1)

    try:
        # The worker answers HTTP before it has joined its group: stream only once it consumes, so
        # that the paced sender is still running when the kill lands, however slow the start was.
        ends = send(settings, [as_message(e) for e in first[:100]])
        wait_committed(100)
        sender = threading.Thread(target=send, args=(settings, [as_message(e) for e in first[100:]], 500.0, ends))
        sender.start()
        wait_committed(400)
        assert sender.is_alive(), "the kill must land mid-stream"
    except BaseException:
        stop_process(proc)
        raise
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    if not keep_state:
        shutil.rmtree(settings.data_dir)
    # Restart at once, as a supervisor would: the killed member is still in the group when the new
    # one joins, and leaves it only when its session times out.
    proc = start_worker("ingest", settings, tmp_path / "worker-2.log")
    try:
        sender.join()
        # Old events re-sent after the restart, mixed with new ones: all must be recognised.
        rng = random.Random(5)
        resent = [as_message(e) for e in rng.sample(first, 400)]
        fresh = [as_message(e) for e in second]
        send(settings, fresh[:1_000] + resent + fresh[1_000:], ends=ends)
        caught_up(settings, proc, ends)
        assert_histories(settings, oracle(valid))
    finally:
        stop_process(proc)

    # What was committed and stored survives a clean restart too. A re-sent event tells when the
    # new worker consumes again (it changes nothing).
    proc = start_worker("ingest", settings, tmp_path / "worker-3.log")
    try:
        send(settings, [as_message(second[-1])], ends=ends)
        caught_up(settings, proc, ends)
        assert_histories(settings, oracle(valid))
    finally:
        stop_process(proc)
