"""Feedback agent: recommendations and the events that follow them -> per-user join state (a table)
and training examples (the feedback store the trainer reads)."""

from __future__ import annotations

import logging

import faust
from faust.types import EventT

from agents.app import TrainStreams, user_cache
from agents.internals import bind_event
from agents.supervision import dead_letter
from streamrec.feedback import FeedbackExample, FeedbackUser
from streamrec.feedback_stream import FeedbackRules, Refused, decode_feedback
from streamrec.metrics import FEEDBACK_EXAMPLES, FEEDBACK_SKIPPED, FEEDBACK_STORE

log = logging.getLogger(__name__)


def register(streams: TrainStreams) -> None:
    app, settings, dlq, store = streams.app, streams.settings, streams.dlq, streams.store
    rules, batching, recommendations = FeedbackRules.of(settings), settings.ingest, settings.topics.recommendations
    FEEDBACK_STORE.set(len(store))
    cache = user_cache(app, batching.cache_users)

    def load(key: bytes, raw: EventT[bytes]) -> FeedbackUser:
        user: FeedbackUser | None = cache.get(key)
        if user is None:
            # faust reads a table from the current event's partition, which in a batch is the last
            # event's: without binding the key's own event first, the read can miss the user.
            bind_event(raw)
            stored = streams.users.get(key)
            user = FeedbackUser.from_bytes(stored) if stored else FeedbackUser()
        return user

    @app.agent(streams.source, name="feedback")
    async def feedback(stream: faust.StreamT[bytes]) -> None:
        assert isinstance(stream, faust.Stream)  # take_events is not on the StreamT protocol
        async for events in stream.take_events(batching.batch_size, within=batching.batch_within_s):
            changed: dict[bytes, tuple[EventT[bytes], FeedbackUser]] = {}
            examples: list[FeedbackExample] = []
            for raw in events:
                message = raw.message
                decoded = decode_feedback(
                    message.topic, message.value, message.key, recommendations=recommendations, limits=settings.contract
                )
                if isinstance(decoded, Refused):
                    if decoded.dead_letter:
                        await dead_letter(dlq, settings, message, decoded.error)
                    else:
                        FEEDBACK_SKIPPED.labels(topic=message.topic).inc()
                        log.debug("feedback: skipped %s@%d: %s", message.topic, message.offset, decoded.error)
                    continue
                key = decoded.user_id.encode()
                before = changed[key][1] if key in changed else load(key, raw)
                try:
                    user, made = rules.apply(before, decoded)
                except Exception as exc:  # a rule that fails on one message must not take the batch with it
                    await dead_letter(dlq, settings, message, exc)
                    continue
                if user is not before:
                    changed[key] = (raw, user)
                examples.extend(made)
            # Examples first, the user state second: a crash in between replays the events, and
            # the store's keys (event time + event id) make the rewrite a no-op.
            if examples:
                store.put_many(examples)
                FEEDBACK_STORE.set(len(store))
                for example in examples:
                    FEEDBACK_EXAMPLES.labels(outcome=example.outcome).inc()
            for key, (raw, user) in changed.items():
                bind_event(raw)
                streams.users[key] = user.to_bytes()  # faust persists only on assignment
                cache.put(key, user)
