"""The train worker: a feedback agent that joins recommendations with the events that follow them into
training examples, and a periodic trainer (on the group leader) that turns fresh examples plus a
replay sample of older ones into a gated LoRA increment and announces it when it is promoted."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
from faust.types import EventT

from agents.infer import TopicMirror, read_catalog
from agents.ingest import decode_event
from agents.internals import bind_event
from agents.supervision import Supervisor, dead_letter
from streamrec.events import ADAPTER_KEY, Recommendation, parse
from streamrec.feedback import FeedbackExample, FeedbackUser, Mark, fresh_by_arrival
from streamrec.feedback_store import ExampleStore
from streamrec.metrics import (
    ADAPTER_PROMOTED,
    FEEDBACK_EXAMPLES,
    FEEDBACK_SKIPPED,
    FEEDBACK_STORE,
    GATE_DECISIONS,
    INCREMENT_SECONDS,
    LOOP_LAG_SECONDS,
)
from streamrec.registry import AdapterRegistry
from streamrec.settings import Settings, registry_root
from streamrec.signing import adapter_key

log = logging.getLogger(__name__)

HISTORY_ITEMS = 20  # history kept in an example: more than any template shows, so edits still work


def register(app: faust.App, settings: Settings, supervisor: Supervisor) -> None:
    topics, cfg, hist = settings.topics, settings.online, settings.history
    source = app.topic(topics.clicks, topics.purchases, topics.recommendations, key_type=bytes, value_type=bytes)
    dlq = app.topic(topics.dlq, key_type=bytes, value_type=bytes)
    adapters_topic = app.topic(topics.adapters, key_type=bytes, value_type=bytes)
    users = app.Table("feedback-users", partitions=topics.partitions, key_type=bytes, value_type=bytes, default=None)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = ExampleStore(settings.data_dir / "feedback", cfg.capacity)
    FEEDBACK_STORE.set(len(store))
    cache: OrderedDict[bytes, FeedbackUser] = OrderedDict()

    def forget(*_: object, **__: object) -> None:
        cache.clear()

    app.on_partitions_revoked.connect(forget, weak=False)
    app.on_partitions_assigned.connect(forget, weak=False)

    def load(key: bytes, raw: EventT[bytes]) -> FeedbackUser:
        user = cache.get(key)
        if user is None:
            # faust reads a table from the current event's partition, which in a batch is the last
            # event's: without binding the key's own event first, the read can miss the user.
            bind_event(raw)
            stored = users.get(key)
            user = FeedbackUser.from_bytes(stored) if stored else FeedbackUser()
        return user

    def remember(key: bytes, user: FeedbackUser) -> None:
        cache[key] = user
        cache.move_to_end(key)
        if len(cache) > settings.ingest.cache_users:
            cache.popitem(last=False)

    @app.agent(source, name="feedback")
    async def feedback(stream: faust.StreamT[bytes]) -> None:
        assert isinstance(stream, faust.Stream)  # take_events is not on the StreamT protocol
        async for events in stream.take_events(settings.ingest.batch_size, within=settings.ingest.batch_within_s):
            changed: dict[bytes, tuple[Any, FeedbackUser]] = {}
            examples: list[FeedbackExample] = []
            for raw in events:
                message = raw.message
                try:
                    if message.topic == topics.recommendations:
                        rec = parse(Recommendation, message.value, settings.contract)
                        key: bytes = rec.user_id.encode()
                    else:
                        event = decode_event(message, settings.contract)
                        key = event.user_id.encode()
                except Exception as exc:
                    if message.topic == topics.recommendations:
                        await dead_letter(dlq, settings, message, exc)
                    else:  # the ingest worker dead-letters bad events: one letter per message
                        FEEDBACK_SKIPPED.labels(topic=message.topic).inc()
                        log.debug("feedback: skipped %s@%d: %s", message.topic, message.offset, exc)
                    continue
                before = changed[key][1] if key in changed else load(key, raw)
                try:
                    if message.topic == topics.recommendations:
                        user = before.on_recommendation(rec, keep=cfg.keep_recs)
                        made: list[FeedbackExample] = []
                    else:
                        user, made = before.on_event(
                            event,
                            max_events=hist.max_events,
                            dedup_window=hist.dedup_window,
                            horizon_s=cfg.horizon_s,
                            history_items=HISTORY_ITEMS,
                        )
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
                users[key] = user.to_bytes()  # faust persists only on assignment
                remember(key, user)

    register_trainer(app, settings, store, adapters_topic, supervisor)


def register_trainer(
    app: faust.App, settings: Settings, store: ExampleStore, adapters_topic: faust.TopicT, supervisor: Supervisor
) -> None:
    # The training stack is imported here, before the event loop runs: importing torch,
    # transformers and peft holds the GIL for long stretches (most of a second on a busy machine),
    # which in the training thread would stall the loop, its heartbeats and /healthz.
    import peft  # noqa: F401

    from streamrec.model.recommender import set_threads
    from streamrec.online import Cursor, advance, append_increment, run_increment

    set_threads(settings.model.threads)

    cfg = settings.online
    catalog = TopicMirror(settings.kafka, settings.topics.catalog)
    app.add_future(supervisor.guard(f"mirror of {catalog.topic}", catalog.run()))
    registry = AdapterRegistry(registry_root(settings))
    if adapter_key(settings.adapter_key) is None:  # an empty key fails here, at start
        log.warning("STREAMREC_ADAPTER_KEY is not set: adapter announcements go out unsigned")
    cursor = Cursor(settings)
    # One training thread: an increment never runs twice at once and never on the event loop.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
    state: dict[str, Any] = {"running": False, "lag": [], "seq": 0, "announced": False}

    def increment(mark: Mark) -> tuple[Any, Mark]:
        arrived = store.by_arrival()
        state["seq"] += 1
        result = run_increment(
            settings,
            read_catalog(catalog.values),
            [a.example for a in arrived],
            fresh_by_arrival(arrived, mark, cfg.since),
            registry,
            seed=state["seq"],
        )
        return result, advance(mark, [a.seq for a in arrived], result)

    async def announce_current() -> None:
        """Announce the registry's CURRENT once at start: a crash between a promotion and its
        announcement must not leave the inference workers on the previous adapter. Workers ignore
        an announcement of the version they already serve."""
        state["announced"] = True
        manifest = registry.current()
        if manifest is not None and registry.verify(manifest):
            announcement = registry.announcement(manifest, settings.adapter_key)
            await adapters_topic.send(key=ADAPTER_KEY, value=announcement.model_dump_json().encode())
            log.info("trainer: announced the adapter in service, %s", manifest.version)
        elif manifest is not None:
            log.warning(
                "trainer: the adapter in service, %s, fails its check against its manifest (or was registered "
                "before every file was hashed: `streamrec adapters reregister`); not announced",
                manifest.version,
            )

    @app.timer(interval=cfg.interval_s, on_leader=True)  # type: ignore[untyped-decorator]
    async def trainer() -> None:
        if state["running"]:
            return
        if not state["announced"]:
            await announce_current()
        mark = cursor.get()
        loop = asyncio.get_running_loop()
        fresh = await loop.run_in_executor(None, store.count_fresh, mark, cfg.since)
        if fresh < cfg.min_new_examples + cfg.holdout or not catalog.values:
            log.info("trainer: %d new examples (need %d + %d held out)", fresh, cfg.min_new_examples, cfg.holdout)
            return
        state["running"] = True
        started = time.monotonic()
        log.info("trainer: increment starts on %d new examples (after arrival %s)", fresh, mark.arrival)
        try:
            result, after = await loop.run_in_executor(executor, increment, mark)
        except Exception:
            log.exception("trainer: the increment failed; the adapter in service stays")
            return
        finally:
            state["running"] = False
        INCREMENT_SECONDS.observe(time.monotonic() - started)
        cursor.set(after)
        decision = result.decision
        GATE_DECISIONS.labels(decision="accepted" if decision.accepted else "refused").inc()
        append_increment(settings, result)
        if result.manifest is None:
            log.warning("trainer: gate refused the candidate (parent %s): %s", result.parent, decision.reason)
            return
        announcement = registry.announcement(result.manifest, settings.adapter_key)
        await adapters_topic.send(key=ADAPTER_KEY, value=announcement.model_dump_json().encode())
        ADAPTER_PROMOTED.info({"version": result.manifest.version, "parent": result.parent or ""})
        log.info(
            "trainer: promoted %s (parent %s) after %.1fs: %s",
            result.manifest.version,
            result.parent,
            result.seconds,
            decision.reason,
        )

    @app.timer(interval=0.5)  # type: ignore[untyped-decorator]
    async def loop_lag() -> None:
        # How late this 0.5 s timer fires is how long something held the event loop.
        now = time.monotonic()
        lags: list[tuple[float, float]] = state["lag"]
        if lags:
            lags.append((now, max(0.0, now - lags[-1][0] - 0.5)))
        else:
            lags.append((now, 0.0))
        while lags and lags[0][0] < now - 60:
            lags.pop(0)
        LOOP_LAG_SECONDS.set(max(lag for _, lag in lags))
