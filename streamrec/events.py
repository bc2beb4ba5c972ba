"""The message contracts other services code against: pydantic v2 models are the source of truth,
schemas/ holds the JSON Schema exported from them (`streamrec schemas export`)."""

from __future__ import annotations

import base64
import json
import math
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from streamrec.errors import InvalidMessage
from streamrec.settings import ContractSettings

Id = Annotated[str, StringConstraints(min_length=1, max_length=256, strict=True)]
LIMITS = ContractSettings()  # the contract's default bounds


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Contract(BaseModel):
    # Unknown fields are ignored so producers can add fields without breaking consumers.
    model_config = ConfigDict(frozen=True, extra="ignore")


class EventType(StrEnum):
    CLICK = "click"
    PURCHASE = "purchase"


class Event(_Contract):
    """One user interaction. Kafka key: the user id."""

    event_id: Id = Field(description="Unique id; a repeated id is a duplicate and is dropped.")
    user_id: Id
    item_id: Id
    type: EventType
    ts: datetime = Field(description="Event time, ISO-8601; stored in UTC (a naive time is taken as UTC).")
    session_id: Id | None = None
    rec_id: Id | None = Field(default=None, description="The recommendation that led to this event.")
    quantity: Annotated[int, Field(ge=1, strict=True)] | None = None
    price: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None

    @field_validator("ts")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        try:
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError:  # "0001-01-01T00:00:00+01:00" is a valid time with no UTC form
            raise ValueError("ts has no UTC equivalent (out of range once converted)") from None

    @field_validator("ts", mode="before")
    @classmethod
    def _ts_is_text(cls, value: Any) -> Any:
        # pydantic would read a bare number as epoch seconds; the contract says ISO-8601 text.
        if not isinstance(value, str | datetime):
            raise ValueError("ts must be an ISO-8601 string")
        return value


class CatalogItem(_Contract):
    """Item metadata. Kafka key: the item id; the catalog topic is compacted."""

    item_id: Id
    title: Annotated[str, StringConstraints(min_length=1, strict=True)]
    category: str | None = None
    description: str | None = None
    available: bool = True


class RecommendedItem(_Contract):
    item_id: Id
    score: float
    reason: str | None = Field(default=None, description="What placed it: model, trending or model+trending.")
    explanation: str | None = Field(
        default=None,
        description="Why, in words: the history item that supports it most, by title (because you clicked "
        "<title>, or bought when the user bought it), or 'trending now'.",
    )
    explained_by: str | None = Field(
        default=None,
        description="The signal behind `explanation`: knn (an item-kNN neighbour of the history item), markov (the "
        "last item's transition), recent (the most recent item, no signal links them) or trending.",
    )
    explanation_item_id: Id | None = Field(
        default=None, description="The history item `explanation` names (None for trending items)."
    )


class ModelVersion(_Contract):
    base: str = Field(description="Base model: hub id, directory or 'tiny'.")
    adapter: str | None = Field(default=None, description="Adapter version in service, if any.")


class Recommendation(_Contract):
    """A ranked list for one user. Kafka key: the user id."""

    rec_id: Id
    user_id: Id
    items: list[RecommendedItem]
    model: ModelVersion
    task: str | None = Field(
        default=None,
        description="The instruction task the model was asked: next_click, next_purchase or cold_start (None: the "
        "model was not asked, trending items only).",
    )
    template: str | None = Field(default=None, description="The id of the instruction template that served it.")
    trigger_event_id: Id | None = None
    event_ts: datetime | None = None
    generated_at: datetime = Field(default_factory=utcnow)


MAX_KEY_BYTES = 4096  # of a dead letter's key; event keys are user ids of at most 256 characters
MAX_ERROR_CHARS = 2000


class DeadLetter(_Contract):
    """A message that could not be processed, kept whole so it can be inspected and replayed, or cut
    to a size the producer can send (then `truncated`, with the original sizes): topic, partition and
    offset still find the original."""

    raw: str = Field(description="The message value, base64 (its first `dead_letter_raw_bytes` when truncated).")
    key: str | None = Field(default=None, description="The message key, base64 (its first 4096 bytes when truncated).")
    error: str
    topic: str
    partition: int
    offset: int
    size: int = Field(default=0, description="Bytes in the original value.")
    key_size: int | None = Field(default=None, description="Bytes in the original key.")
    truncated: bool = Field(default=False, description="The value or the key was cut; the rest is in the topic.")
    received_at: datetime = Field(default_factory=utcnow)

    @classmethod
    def of(
        cls,
        value: bytes | None,
        key: bytes | None,
        error: str,
        topic: str,
        partition: int,
        offset: int,
        max_raw: int = LIMITS.dead_letter_raw_bytes,
    ) -> DeadLetter:
        value = value or b""
        truncated = len(value) > max_raw or (key is not None and len(key) > MAX_KEY_BYTES)
        if len(error) > MAX_ERROR_CHARS:
            error = error[: MAX_ERROR_CHARS - 1] + "…"
        if truncated:
            error = f"{error} [dead letter cut: value {len(value)} bytes, key {len(key or b'')} bytes]"
        return cls(
            raw=base64.b64encode(value[:max_raw]).decode(),
            key=None if key is None else base64.b64encode(key[:MAX_KEY_BYTES]).decode(),
            error=error,
            topic=topic,
            partition=partition,
            offset=offset,
            size=len(value),
            key_size=None if key is None else len(key),
            truncated=truncated,
        )

    @property
    def key_bytes(self) -> bytes | None:
        """The letter's own Kafka key: the source key, cut like `key`."""
        return None if self.key is None else base64.b64decode(self.key)

    def raw_bytes(self) -> bytes:
        return base64.b64decode(self.raw)


ADAPTER_KEY = b"current"  # the adapters topic is compacted: the newest announcement is the one in force


Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class AdapterAnnouncement(_Contract):
    """A promoted LoRA adapter. Kafka key: 'current' on the compacted adapters topic."""

    version: Id = Field(description="The version's directory name in the adapter registry.")
    uri: str = Field(
        description="The version's directory in the registry (absolute path); a worker refuses any other place."
    )
    sha256: Sha256 = Field(description="sha256 of adapter_model.safetensors (also in `files`).")
    blend_sha256: Sha256 | None = Field(
        default=None,
        description="sha256 of the blend.npz refitted with the adapter, served with it; None: the base model's blend.",
    )
    files: dict[Annotated[str, StringConstraints(min_length=1, max_length=1024)], Sha256] | None = Field(
        default=None,
        description="sha256 of every file of the version but manifest.json, by path relative to its directory; "
        "a worker refuses a missing, changed or unlisted file, and an announcement without this mapping.",
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    parent: str | None = None
    base: str | None = Field(default=None, description="The base model the adapter was trained on.")
    created_at: datetime = Field(default_factory=utcnow)
    signature: Sha256 | None = Field(
        default=None,
        description="HMAC-SHA256 (hex) under STREAMREC_ADAPTER_KEY of the announcement without this field, as "
        "sorted-key compact JSON; a worker with a key refuses an announcement without a valid one.",
    )


class HistoryUpdate(_Contract):
    """Internal: a user's history after an accepted event. Kafka key: the user id."""

    user_id: Id
    events: list[Event]
    trigger_event_id: Id
    event_ts: datetime
    trigger_appended_at: datetime | None = Field(
        default=None, description="Kafka timestamp of the trigger event's message: the start of freshness."
    )


class TrendingSnapshot(_Contract):
    """Internal: one input partition's most popular items. Kafka key: the partition number."""

    partition: int
    items: dict[str, float]
    as_of: datetime


M = TypeVar("M", bound=BaseModel)

CONTRACTS: dict[str, type[BaseModel]] = {
    "event": Event,
    "catalog_item": CatalogItem,
    "recommendation": Recommendation,
    "dead_letter": DeadLetter,
    "adapter_announcement": AdapterAnnouncement,
    "history_update": HistoryUpdate,
    "trending_snapshot": TrendingSnapshot,
}


# A complete JSON string (escapes included: an escaped quote never ends one). UTF-8 continuation
# bytes are never ASCII, so bytes are safe to scan.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def nesting_depth_exceeds(raw: bytes, limit: int) -> bool:
    """True when the JSON text nests arrays and objects deeper than `limit`. Checked before parsing:
    json.loads recurses once per level and would raise RecursionError on 100,000 brackets."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # most messages: too few brackets to nest deeper
        return False
    # Strings removed (an unterminated one runs to the end), then only the brackets are left to walk:
    # split, the regex and translate run in C, the loop sees brackets only.
    if b"\\" in raw:
        outside = _STRING.sub(b"", raw)
        outside = outside[: outside.find(b'"')] if b'"' in outside else outside
    else:  # no escapes (the usual case): every other piece between quotes is outside the strings
        pieces = raw.split(b'"')
        outside = b"".join(pieces[0 : len(pieces) if len(pieces) % 2 else len(pieces) - 1 : 2])
    depth = 0
    for byte in outside.translate(None, _NOT_BRACKETS):
        if byte in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _lone_surrogate(value: Any) -> bool:
    """True when a string anywhere in `value` holds half a surrogate pair ("\\ud800" is valid JSON,
    but no UTF-8 can carry it: the id could never be encoded as a key or written back out)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


def parse(model: type[M], raw: bytes | None, limits: ContractSettings = LIMITS) -> M:
    """Decode and validate one message value, or raise InvalidMessage with a readable reason. Bounded:
    size and nesting are checked before the JSON parser runs, and nothing else it raises escapes."""
    if raw is None:
        raise InvalidMessage("empty message value (tombstone)")
    if len(raw) > limits.max_message_bytes:
        raise InvalidMessage(f"message of {len(raw)} bytes exceeds the {limits.max_message_bytes}-byte limit")
    if nesting_depth_exceeds(raw, limits.max_depth):
        raise InvalidMessage(f"JSON nested deeper than {limits.max_depth} levels")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"not JSON (JSON is UTF-8): {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, NaN, a number of over 4,300 digits
        raise InvalidMessage(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidMessage(f"expected a JSON object, got {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(text) and _lone_surrogate(data):
        raise InvalidMessage("a string holds an unpaired UTF-16 surrogate escape")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors())
        raise InvalidMessage(f"invalid {model.__name__}: {reasons}") from None


def check_event_time(event: Event, limits: ContractSettings = LIMITS, now: datetime | None = None) -> None:
    """Raise InvalidMessage when the event's time is outside the accepted range: at the edge only
    (ingest and feedback), so stored events are never judged again by a clock that has moved."""
    if event.ts < limits.ts_min:
        raise InvalidMessage(f"ts {event.ts.isoformat()} is before {limits.ts_min.isoformat()}")
    ahead = (event.ts - (now or utcnow())).total_seconds()
    if ahead > limits.ts_max_ahead_s:
        raise InvalidMessage(
            f"ts {event.ts.isoformat()} is {ahead:.0f} s ahead of now (at most {limits.ts_max_ahead_s:.0f})"
        )


def kafka_time(timestamp: float | None) -> datetime | None:
    """A Kafka record timestamp (seconds) as a UTC datetime, None when absent or out of range: the
    producer sets it, and a year-10000 timestamp must not fail the event it came with."""
    if timestamp is None or not math.isfinite(timestamp):
        return None
    try:
        return datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every contract, by file stem."""
    return {name: model.model_json_schema(mode="serialization") for name, model in CONTRACTS.items()}
