"""The message contracts: what is accepted, what is refused and why, and the schema files."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from streamrec.errors import InvalidMessage
from streamrec.events import DeadLetter, Event, check_event_time, kafka_time, nesting_depth_exceeds, parse
from streamrec.schemas import render_schemas
from streamrec.settings import ContractSettings

GOOD = {
    "event_id": "e1",
    "user_id": "u1",
    "item_id": "i1",
    "type": "purchase",
    "ts": "2024-05-01T10:00:00+02:00",
}


def test_valid_event_is_normalised_to_utc() -> None:
    event = parse(Event, json.dumps(GOOD | {"quantity": 2, "price": 9.5, "extra": "ignored"}).encode())
    assert event.ts == datetime(2024, 5, 1, 8, tzinfo=UTC)
    assert (event.quantity, event.price) == (2, 9.5)


def test_naive_time_is_taken_as_utc() -> None:
    assert parse(Event, json.dumps(GOOD | {"ts": "2024-05-01T10:00:00"}).encode()).ts.tzinfo == UTC


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"{oops", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (None, "tombstone"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "item_id"}).encode(), "item_id: Field required"),
        (json.dumps(GOOD | {"type": "view"}).encode(), "type: Input should be 'click' or 'purchase'"),
        (json.dumps(GOOD | {"ts": "2024-02-30T00:00:00Z"}).encode(), "ts:"),
        (json.dumps(GOOD | {"ts": 1714550400}).encode(), "ts must be an ISO-8601 string"),
        (json.dumps(GOOD | {"user_id": 7}).encode(), "user_id: Input should be a valid string"),
        (json.dumps(GOOD | {"quantity": "2"}).encode(), "quantity"),
        (json.dumps(GOOD | {"event_id": ""}).encode(), "event_id"),
    ],
)
def test_bad_input_is_refused_with_a_readable_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=None) as info:
        parse(Event, raw)
    assert reason in str(info.value)


def test_dead_letter_keeps_the_raw_bytes() -> None:
    letter = DeadLetter.of(b"\x00\x01bad", b"u1", "not JSON", "streamrec.clicks", 3, 42)
    again = DeadLetter.model_validate_json(letter.model_dump_json())
    assert again.raw_bytes() == b"\x00\x01bad"
    assert (again.topic, again.partition, again.offset) == ("streamrec.clicks", 3, 42)


def test_schema_files_match_the_models() -> None:
    """Fails when schemas/ drifts from the pydantic models: run `streamrec schemas export`."""
    folder = Path(__file__).resolve().parents[2] / "schemas"
    expected = render_schemas()
    on_disk = {p.name: p.read_text() for p in folder.glob("*.schema.json")}
    assert on_disk == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 32"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nested deeper than 32"),
        (json.dumps(GOOD | {"ts": "0001-01-01T00:00:00+01:00"}).encode(), "no UTC equivalent"),
        (json.dumps(GOOD | {"ts": "9999-12-31T23:59:59-01:00"}).encode(), "no UTC equivalent"),
        (b'{"quantity": ' + b"9" * 5000 + b"}", "not JSON"),
        (json.dumps(GOOD | {"price": float("nan")}).encode(), "NaN is not a JSON number"),
        (json.dumps(GOOD | {"price": float("inf")}).encode(), "Infinity is not a JSON number"),
        (json.dumps(GOOD).replace('"price"', '"x"').encode()[:-1] + b', "price": 1e999}', "price"),
        (json.dumps(GOOD | {"user_id": "\ud800"}).encode(), "unpaired UTF-16 surrogate"),
        (json.dumps(GOOD).encode("utf-16"), "not JSON"),
        (json.dumps(GOOD | {"user_id": "u" * 500_000}).encode(), "exceeds the 262144-byte limit"),
        (json.dumps(GOOD | {"item_id": "i" * 300}).encode(), "item_id: String should have at most 256"),
    ],
)
def test_hostile_input_is_refused_before_it_costs_more_than_its_size(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse(Event, raw)
    assert reason in str(info.value)


def test_nesting_inside_strings_and_escapes_is_not_nesting() -> None:
    text = '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[ \\" {{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{'
    event = parse(Event, json.dumps(GOOD | {"session_id": text[:200]}).encode())
    assert event.session_id == text[:200]
    assert nesting_depth_exceeds(b'{"a": "\\\\", "b": [[[]]]}', 4) is False
    assert nesting_depth_exceeds(b'{"a": "\\\\", "b": [[[]]]}', 3) is True


def _nested(rng: random.Random, depth: int) -> object:
    """A JSON value whose deepest array or object is at `depth`, with brackets, quotes and
    backslashes inside its strings."""
    chars = '[]{}"\\ab' if rng.random() < 0.5 else "[]{}ab"  # with escapes, or without (the fast path)
    text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 6)))
    if depth == 0:
        return text
    side = [_nested(rng, rng.randint(0, min(2, depth - 1))) for _ in range(rng.randint(0, 2))]
    inner = [_nested(rng, depth - 1), *side]
    return {text: inner[0], "s": inner[1:]} if rng.random() < 0.5 and depth >= 2 else inner


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def test_nesting_depth_is_the_json_depth_whatever_the_strings_hold() -> None:
    rng = random.Random(5)
    for _ in range(300):
        value = _nested(rng, rng.randint(1, 40))
        raw, depth = json.dumps(value).encode(), _depth(value)
        for limit in (depth - 1, depth, 32):
            assert nesting_depth_exceeds(raw, limit) is (depth > limit), (raw[:200], limit)
    # An unterminated string runs to the end: its brackets are not nesting.
    for tail in (b"", b"\\n"):
        assert nesting_depth_exceeds(b'{"a": [1], "b": "' + tail + b"[" * 100, 3) is False


def test_event_time_range_is_checked_at_the_edge() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    limits = ContractSettings(ts_max_ahead_s=3600)
    event = parse(Event, json.dumps(GOOD | {"ts": "2100-01-01T00:00:00Z"}).encode())  # a valid time...
    with pytest.raises(InvalidMessage, match="ahead of now"):
        check_event_time(event, limits, now)  # ...but not one the worker accepts
    with pytest.raises(InvalidMessage, match="before 1970"):
        check_event_time(parse(Event, json.dumps(GOOD | {"ts": "1969-12-31T23:59:59Z"}).encode()), limits, now)
    check_event_time(parse(Event, json.dumps(GOOD | {"ts": "2026-01-01T00:59:00Z"}).encode()), limits, now)


def test_kafka_timestamps_are_read_defensively() -> None:
    assert kafka_time(253_402_300_800.0 * 40) is None  # past the year 9999
    assert kafka_time(float("nan")) is None
    assert kafka_time(None) is None
    assert kafka_time(1_700_000_000.0) == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)


def test_a_dead_letter_too_large_to_send_is_cut_and_says_so() -> None:
    value, key = b"v" * 1_048_576, b"k" * 600_000
    letter = DeadLetter.of(value, key, "x" * 10_000, "streamrec.clicks", 1, 7, max_raw=262_144)
    assert len(letter.model_dump_json()) < 1_000_000  # the producer's default request limit is 1 MiB
    assert letter.truncated and (letter.size, letter.key_size) == (1_048_576, 600_000)
    assert letter.raw_bytes() == value[:262_144]
    assert "value 1048576 bytes, key 600000 bytes" in letter.error
    assert (letter.topic, letter.partition, letter.offset) == ("streamrec.clicks", 1, 7)
    small = DeadLetter.of(b"bad", b"u1", "not JSON", "t", 0, 0)
    assert not small.truncated and small.error == "not JSON" and small.key_bytes == b"u1"
