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
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition
from streamtest import Ends, send_raw, start_worker

from streamrec.events import DeadLetter
from streamrec.kafka.clients import producer
from streamrec.kafka.offsets import committed_offsets, wait_caught_up
from streamrec.kafka.topics import create_topics, read_topic
from streamrec.lab.runner import stop_process
from streamrec.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

MAX_EVENTS = 50
WHOLE = 1_000  # max_events where a test compares whole histories
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


def oracle(
    events: list[dict[str, Any]], max_events: int = MAX_EVENTS
) -> dict[str, list[tuple[str, str, str, datetime]]]:
    """Each user's newest `max_events` unique events in event-time order, computed from scratch."""
    unique = {e["event_id"]: e for e in events}
    per_user: dict[str, list[tuple[str, str, str, datetime]]] = defaultdict(list)
    for e in unique.values():
        ts = datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).astimezone(UTC)
        per_user[e["user_id"]].append((e["event_id"], e["item_id"], e["type"], ts))
    return {u: sorted(evs, key=lambda x: (x[3], x[0]))[-max_events:] for u, evs in per_user.items()}


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
    # Whole histories: every user keeps every event (about 100 each), so each event sent before,
    # around and after the kill is compared, not only the newest ones.
    settings = make_settings(history={"max_events": WHOLE})
    create_topics(settings.kafka, settings.topics)
    valid = make_events(6_000, users=60, seed=23 if keep_state else 29)
    first, second = valid[:4_000], valid[4_000:]
    assert max(Counter(e["user_id"] for e in valid).values()) < WHOLE

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
        assert_histories(settings, oracle(valid, max_events=WHOLE))
    finally:
        stop_process(proc)

    # What was committed and stored survives a clean restart too. A re-sent event tells when the
    # new worker consumes again (it changes nothing).
    proc = start_worker("ingest", settings, tmp_path / "worker-3.log")
    try:
        send(settings, [as_message(second[-1])], ends=ends)
        caught_up(settings, proc, ends)
        assert_histories(settings, oracle(valid, max_events=WHOLE))
    finally:
        stop_process(proc)


# ---- the fuzz: every kind of hostile message, interleaved with valid events on the same partitions

Hostile = tuple[bytes | None, bytes | None]  # (key, value)


def _kinds(now: datetime) -> dict[str, Any]:
    """Each kind: (rng, a valid event) -> (key, value) of a message the worker must dead-letter."""

    def field(**changes: Any) -> Any:
        return lambda rng, e: (e["user_id"].encode(), json.dumps(e | changes).encode())

    def without(name: str) -> Any:
        return lambda rng, e: (e["user_id"].encode(), json.dumps({k: v for k, v in e.items() if k != name}).encode())

    def raw(value: bytes) -> Any:
        return lambda rng, e: (e["user_id"].encode(), value + str(rng.random()).encode())

    def text(body: Any) -> Any:  # a value built from the event's JSON text
        return lambda rng, e: (e["user_id"].encode(), body(json.dumps(e)))

    return {
        "not_json": raw(b"\x00{not json "),
        "empty_value": lambda rng, e: (e["user_id"].encode(), b""),
        "tombstone": lambda rng, e: (e["user_id"].encode(), None),
        "json_array": text(lambda t: f"[{t}]".encode()),
        "json_string": text(lambda t: json.dumps(t).encode()),
        "json_number": raw(b"4"),
        "json_null": lambda rng, e: (e["user_id"].encode(), b"null"),
        "truncated_json": text(lambda t: t[: len(t) // 2].encode()),
        "trailing_garbage": text(lambda t: t.encode() + b"\x00}"),
        "missing_event_id": without("event_id"),
        "missing_user_id": without("user_id"),
        "missing_item_id": without("item_id"),
        "missing_type": without("type"),
        "missing_ts": without("ts"),
        "unknown_type": field(type="view"),
        "type_wrong_case": field(type="CLICK"),
        "duplicate_key_last_wins": text(lambda t: t[:-1].encode() + b', "type": "refund"}'),
        "ts_words": field(ts="yesterday"),
        "ts_impossible_date": field(ts="2024-02-30T10:00:00Z"),
        "ts_epoch_number": field(ts=1709251200),
        "ts_year_2100": field(ts="2100-01-01T00:00:00Z"),
        "ts_two_days_ahead": field(ts=(now + timedelta(days=2)).isoformat()),
        "ts_before_1970": field(ts="1969-12-31T23:59:59Z"),
        "ts_year_1_utc_overflow": field(ts="0001-01-01T00:00:00+01:00"),
        "ts_year_9999_utc_overflow": field(ts="9999-12-31T23:59:59-01:00"),
        "ts_offset_out_of_range": field(ts="2024-03-01T10:00:00+25:00"),
        "nested_100k_brackets": raw(b"[" * 100_000 + b"]" * 100_000),
        "nested_40_objects": raw(b'{"a":' * 40 + b"1" + b"}" * 40),
        "message_300kb": field(padding="p" * 300_000),
        "user_id_500kb": lambda rng, e: (b"u" * 500_000, json.dumps(e | {"user_id": "u" * 500_000}).encode()),
        "item_id_1mb": field(item_id="i" * 1_000_000),
        "user_id_257_chars": lambda rng, e: (b"u" * 257, json.dumps(e | {"user_id": "u" * 257}).encode()),
        "empty_event_id": field(event_id=""),
        "item_id_number": field(item_id=1234),
        "user_id_list": field(user_id=["a"]),
        "event_id_object": field(event_id={"id": 1}),
        "session_id_too_long": field(session_id="s" * 300),
        "rec_id_number": field(rec_id=7),
        "quantity_text": field(quantity="two"),
        "quantity_zero": field(quantity=0),
        "quantity_fraction": field(quantity=1.5),
        "price_negative": field(price=-1.0),
        "price_nan": text(lambda t: t[:-1].encode() + b', "price": NaN}'),
        "price_infinity": text(lambda t: t[:-1].encode() + b', "price": Infinity}'),
        "price_1e999": text(lambda t: t[:-1].encode() + b', "price": 1e999}'),
        "int_5000_digits": text(lambda t: t[:-1].encode() + b', "quantity": ' + b"9" * 5000 + b"}"),
        "lone_surrogate_user": lambda rng, e: (e["user_id"].encode(), json.dumps(e | {"user_id": "\ud800"}).encode()),
        "utf16_json": text(lambda t: t.encode("utf-16")),
        "utf8_bom": text(lambda t: b"\xef\xbb\xbf" + t.encode()),
        "invalid_utf8_in_string": text(
            lambda t: t.replace('"click"', '"cl\\u0069ck"').encode()[:-1] + b', "x": "\xc3\x28"}'
        ),
        "key_other_user": lambda rng, e: (
            b"user-" + str(rng.randrange(10_000, 20_000)).encode(),
            json.dumps(e).encode(),
        ),
        "key_missing": lambda rng, e: (None, json.dumps(e).encode()),
        "key_not_utf8_collides": lambda rng, e: (b"\xff", json.dumps(e | {"user_id": "\ufffd"}).encode()),
        "key_trailing_space": lambda rng, e: (e["user_id"].encode() + b" ", json.dumps(e).encode()),
    }


BIG_KINDS = {"message_300kb", "user_id_500kb", "item_id_1mb", "nested_100k_brackets"}


def _catalog_kinds() -> dict[str, Any]:
    """Hostile messages on the catalog topic: (rng, n) -> (key, value)."""

    def item(n: int, **changes: Any) -> tuple[bytes, bytes]:
        value = {"item_id": f"item-{n}", "title": f"thing {n}"} | changes
        return str(value["item_id"]).encode() if isinstance(value["item_id"], str) else b"k", json.dumps(value).encode()

    return {
        "catalog_not_json": lambda rng, n: (f"item-{n}".encode(), b"{title" + str(rng.random()).encode()),
        "catalog_nested": lambda rng, n: (f"item-{n}".encode(), b"[" * 50_000 + b"]" * 50_000),
        "catalog_too_big": lambda rng, n: item(n, description="d" * 300_000),
        "catalog_missing_title": lambda rng, n: (f"item-{n}".encode(), json.dumps({"item_id": f"item-{n}"}).encode()),
        "catalog_empty_title": lambda rng, n: item(n, title=""),
        "catalog_title_number": lambda rng, n: item(n, title=7),
        "catalog_key_mismatch": lambda rng, n: (b"other", item(n)[1]),
        "catalog_lone_surrogate": lambda rng, n: item(n, title="\udfff"),
        "catalog_item_id_too_long": lambda rng, n: item(n, item_id="i" * 300),
        "catalog_keyless_empty": lambda rng, n: (None, b""),
    }


def test_fuzz_every_valid_event_kept_once_every_bad_message_dead_lettered_once(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings(history={"max_events": WHOLE})
    create_topics(settings.kafka, settings.topics)
    rng = random.Random(97)
    now = datetime.now(UTC)
    valid = make_events(2_400, users=60, seed=97)
    # Valid events that look hostile and must be kept: ids beyond ASCII, the earliest time allowed,
    # unknown fields, and (below) a Kafka timestamp in the year 10000.
    for i, event in enumerate(valid[:40]):
        event |= {"item_id": f"ítem-🎬-{i % 7}", "session_id": "séance-ü"} if i % 2 else {"ts": "1970-01-01T00:00:00Z"}
        event["extra"] = {"nested": [1, [2, [3]]]}
    far_future_stamp = {e["event_id"] for e in valid[40:60]}

    messages: list[tuple[str, str, bytes | None, bytes | None]] = [  # (kind, topic, key, value)
        ("valid", "clicks" if e["type"] == "click" else "purchases", e["user_id"].encode(), json.dumps(e).encode())
        for e in valid
    ]
    kinds = _kinds(now)
    for kind, make in kinds.items():
        for _ in range(3 if kind in BIG_KINDS else 20):
            key, value = make(rng, dict(rng.choice(valid)))
            messages.insert(rng.randrange(len(messages) + 1), (kind, rng.choice(["clicks", "purchases"]), key, value))
    catalog_kinds = _catalog_kinds()
    for kind, make_item in catalog_kinds.items():
        for n in range(5):
            key, value = make_item(rng, n)
            messages.insert(rng.randrange(len(messages) + 1), (kind, "catalog", key, value))
    kinds |= catalog_kinds
    assert len(kinds) >= 60

    prod = producer(settings.kafka, max_request_size=2_000_000, linger_ms=20)
    futures = []
    for kind, field_name, key, value in messages:
        stamp = None
        if kind == "valid" and json.loads(value or b"{}")["event_id"] in far_future_stamp:
            stamp = 253_402_300_800_000 * 2  # milliseconds: the year 10000 and beyond
        futures.append(prod.send(getattr(settings.topics, field_name), key=key, value=value, timestamp_ms=stamp))
    prod.flush()
    ends: Ends = {}
    for future in futures:
        meta = future.get(timeout=60)
        tp = TopicPartition(meta.topic, meta.partition)
        ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    prod.close()

    proc = start_worker("ingest", settings, tmp_path / "worker.log")
    try:
        caught_up(settings, proc, ends)
        assert_histories(settings, oracle(valid, max_events=WHOLE))
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/healthz", timeout=10) as resp:
            health = json.load(resp)
        assert health == {"status": "ok", "previous_crash": None}
        assert proc.poll() is None, "the worker must still run"
    finally:
        stop_process(proc)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "crashed" not in log.lower() and "Restarting" not in log

    letters = [
        DeadLetter.model_validate_json(r.value) for r in read_topic(settings.kafka, settings.topics.dlq, timeout=60)
    ]
    assert len({(d.topic, d.partition, d.offset) for d in letters}) == len(letters), "a message was dead-lettered twice"
    got = sorted((d.topic, d.raw_bytes(), d.size) for d in letters)
    cut = settings.contract.dead_letter_raw_bytes
    sent_bad = [(k, getattr(settings.topics, f), v or b"") for k, f, _, v in messages if k != "valid"]
    assert got == sorted((topic, value[:cut], len(value)) for _, topic, value in sent_bad)
    assert all(d.truncated == (d.size > cut) for d in letters)

    # The figures: for each kind, how many were sent, dead-lettered and kept.
    in_dlq = {(d.topic, d.raw_bytes()) for d in letters}
    report = {
        kind: {
            "sent": sum(1 for k, *_ in sent_bad if k == kind),
            "in_dlq": sum(1 for k, t, v in sent_bad if k == kind and (t, v[:cut]) in in_dlq),
            "kept": 0,
        }
        for kind in kinds
    }
    report["valid"] = {"sent": len(valid), "in_dlq": 0, "kept": len(valid)}  # assert_histories: all, once
    (tmp_path / "fuzz-report.json").write_text(json.dumps(report, indent=1))
    print(
        "\n"
        + "\n".join(
            f"{k:28s} sent {v['sent']:5d}  dlq {v['in_dlq']:5d}  kept {v['kept']:5d}" for k, v in report.items()
        )
    )
    assert all(v["in_dlq"] == v["sent"] for k, v in report.items() if k != "valid")
