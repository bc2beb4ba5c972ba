"""The feedback agent's input rules: recommendations and events told apart by topic, the event key
check, a bad recommendation dead-lettered and a bad event only skipped, and what each message does
to the user. No Kafka, no disk."""

from __future__ import annotations

from datetime import timedelta

from streamrec.errors import InvalidMessage
from streamrec.events import Event, ModelVersion, Recommendation, RecommendedItem, utcnow
from streamrec.feedback import FeedbackUser
from streamrec.feedback_stream import HISTORY_ITEMS, FeedbackRules, Refused, decode_feedback
from streamrec.settings import ContractSettings, Settings

RECS = "recs"
LIMITS = ContractSettings()
T0 = utcnow() - timedelta(hours=1)


def ev(eid: str, seconds: float, item: str, rec_id: str | None = None) -> Event:
    return Event(
        event_id=eid, user_id="u1", item_id=item, type="click", ts=T0 + timedelta(seconds=seconds), rec_id=rec_id
    )


def rec(rec_id: str, seconds: float, items: list[str]) -> Recommendation:
    return Recommendation(
        rec_id=rec_id,
        user_id="u1",
        items=[RecommendedItem(item_id=i, score=1.0) for i in items],
        model=ModelVersion(base="tiny"),
        event_ts=T0 + timedelta(seconds=seconds),
        generated_at=utcnow(),
    )


def decode(topic: str, value: bytes | None, key: object = b"u1") -> Recommendation | Event | Refused:
    return decode_feedback(topic, value, key, recommendations=RECS, limits=LIMITS)


def test_the_topic_says_what_a_message_is() -> None:
    r, e = rec("r1", 0, ["a"]), ev("e1", 1, "a")
    assert decode(RECS, r.model_dump_json().encode(), key=None) == r  # recommendations need no key check
    assert decode("clicks", e.model_dump_json().encode()) == e
    refused = decode("clicks", r.model_dump_json().encode())
    assert isinstance(refused, Refused) and isinstance(refused.error, InvalidMessage)


def test_a_bad_recommendation_is_dead_lettered_and_a_bad_event_skipped() -> None:
    bad_rec = decode(RECS, b"not json")
    assert isinstance(bad_rec, Refused) and bad_rec.dead_letter
    # The ingest worker dead-letters bad events: the feedback agent must not write a second letter.
    for value, key in [(b"not json", b"u1"), (ev("e1", 1, "a").model_dump_json().encode(), b"someone else")]:
        bad_event = decode("purchases", value, key)
        assert isinstance(bad_event, Refused) and not bad_event.dead_letter


def test_the_rules_apply_a_recommendation_then_the_event_that_takes_it() -> None:
    rules = FeedbackRules(keep=5, max_events=50, dedup_window=1000, horizon_s=600.0)
    user, made = rules.apply(FeedbackUser(), ev("e0", 0, "z"))
    assert made == []
    user, made = rules.apply(user, rec("r1", 5, ["a", "b"]))
    assert made == [] and [p.rec_id for p in user.pending.recs] == ["r1"]
    same, made = rules.apply(user, rec("r1", 5, ["a", "b"]))
    assert same is user and made == []  # a redelivered recommendation changes nothing
    user, [example] = rules.apply(user, ev("e1", 10, "b", rec_id="r1"))
    assert (example.rec_id, example.taken, example.outcome) == ("r1", ("b",), "taken")
    again, made = rules.apply(user, ev("e1", 10, "b", rec_id="r1"))
    assert again is user and made == []  # a redelivered event counts once


def test_the_rules_come_from_the_settings() -> None:
    settings = Settings(online={"keep_recs": 3, "horizon_s": 60.0}, history={"max_events": 7, "dedup_window": 9})
    assert FeedbackRules.of(settings) == FeedbackRules(3, 7, 9, 60.0, HISTORY_ITEMS)
