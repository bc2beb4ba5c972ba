"""The feedback agent's input rules: a message is a recommendation or an event (by its topic), an
event passes the ingest worker's key check, a bad recommendation is dead-lettered and a bad event
skipped, and each message changes one user's FeedbackUser. Pure: no Kafka, no disk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from streamrec.events import Event, Recommendation, parse
from streamrec.feedback import FeedbackExample, FeedbackUser
from streamrec.history import decode_event
from streamrec.settings import ContractSettings, Settings

HISTORY_ITEMS = 20  # history kept in an example: more than any template shows, so edits still work


class Refused(NamedTuple):
    """A message the feedback agent cannot use. `dead_letter` False: a bad event, which the ingest
    worker dead-letters already (one letter per message), so the feedback agent only skips it."""

    error: Exception
    dead_letter: bool


def decode_feedback(
    topic: str, value: bytes | None, key: object, *, recommendations: str, limits: ContractSettings
) -> Recommendation | Event | Refused:
    """What a message of the feedback stream carries: a Recommendation on the `recommendations`
    topic, an Event (with its key check) on the others, or why it is refused."""
    try:
        if topic == recommendations:
            return parse(Recommendation, value, limits)
        return decode_event(value, key, limits)
    except Exception as exc:  # whatever one message makes the decoder do, it is that message's
        return Refused(exc, dead_letter=topic == recommendations)


@dataclass(frozen=True)
class FeedbackRules:
    """The limits a message is applied under: recommendations remembered, the rolling history (the
    ingest worker's), the join horizon and the history an example keeps."""

    keep: int
    max_events: int
    dedup_window: int
    horizon_s: float
    history_items: int = HISTORY_ITEMS

    @classmethod
    def of(cls, settings: Settings) -> FeedbackRules:
        online, history = settings.online, settings.history
        return cls(online.keep_recs, history.max_events, history.dedup_window, online.horizon_s)

    def apply(self, user: FeedbackUser, message: Recommendation | Event) -> tuple[FeedbackUser, list[FeedbackExample]]:
        """The user after `message` and the examples it makes (a recommendation makes none)."""
        if isinstance(message, Recommendation):
            return user.on_recommendation(message, keep=self.keep), []
        return user.on_event(
            message,
            max_events=self.max_events,
            dedup_window=self.dedup_window,
            horizon_s=self.horizon_s,
            history_items=self.history_items,
        )
