"""The message contracts other services code against: pydantic v2 models are the source of truth,
schemas/ holds the JSON Schema exported from them (`streamrec schemas export`)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from streamrec.errors import InvalidMessage

Id = Annotated[str, StringConstraints(min_length=1, max_length=256, strict=True)]


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
    price: Annotated[float, Field(ge=0)] | None = None

    @field_validator("ts")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

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
    reason: str | None = None


class ModelVersion(_Contract):
    base: str = Field(description="Base model: hub id, directory or 'tiny'.")
    adapter: str | None = Field(default=None, description="Adapter version in service, if any.")


class Recommendation(_Contract):
    """A ranked list for one user. Kafka key: the user id."""

    rec_id: Id
    user_id: Id
    items: list[RecommendedItem]
    model: ModelVersion
    trigger_event_id: Id | None = None
    event_ts: datetime | None = None
    generated_at: datetime = Field(default_factory=utcnow)


class DeadLetter(_Contract):
    """A message that could not be processed, kept whole so it can be inspected and replayed."""

    raw: str = Field(description="The message value, base64.")
    key: str | None = Field(default=None, description="The message key, base64.")
    error: str
    topic: str
    partition: int
    offset: int
    received_at: datetime = Field(default_factory=utcnow)

    @classmethod
    def of(
        cls, value: bytes | None, key: bytes | None, error: str, topic: str, partition: int, offset: int
    ) -> DeadLetter:
        return cls(
            raw=base64.b64encode(value or b"").decode(),
            key=None if key is None else base64.b64encode(key).decode(),
            error=error,
            topic=topic,
            partition=partition,
            offset=offset,
        )

    def raw_bytes(self) -> bytes:
        return base64.b64decode(self.raw)


ADAPTER_KEY = b"current"  # the adapters topic is compacted: the newest announcement is the one in force


class AdapterAnnouncement(_Contract):
    """A promoted LoRA adapter. Kafka key: 'current' on the compacted adapters topic."""

    version: Id
    uri: str = Field(description="Where the weights are: a directory path or URI.")
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    blend_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        default=None,
        description="sha256 of the blend.npz refitted with the adapter, served with it; None: the base model's blend.",
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    parent: str | None = None
    base: str | None = Field(default=None, description="The base model the adapter was trained on.")
    created_at: datetime = Field(default_factory=utcnow)


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


def parse(model: type[M], raw: bytes | None) -> M:
    """Decode and validate one message value, or raise InvalidMessage with a readable reason."""
    if raw is None:
        raise InvalidMessage("empty message value (tombstone)")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidMessage(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidMessage(f"expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors())
        raise InvalidMessage(f"invalid {model.__name__}: {reasons}") from None


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every contract, by file stem."""
    return {name: model.model_json_schema(mode="serialization") for name, model in CONTRACTS.items()}
