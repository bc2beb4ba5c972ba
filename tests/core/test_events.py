"""The message contracts: what is accepted, what is refused and why, and the schema files."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from streamrec.errors import InvalidMessage
from streamrec.events import DeadLetter, Event, parse
from streamrec.schemas import render_schemas

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
