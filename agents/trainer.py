"""The periodic trainer (on the group leader): fresh examples plus a replay sample of older ones ->
a gated LoRA increment in a training thread -> an announcement on the adapters topic when promoted."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from agents.app import TrainStreams
from streamrec.events import ADAPTER_KEY, AdapterAnnouncement
from streamrec.metrics import ADAPTER_PROMOTED, GATE_DECISIONS, INCREMENT_SECONDS
from streamrec.signing import adapter_key
from streamrec.trainer import Trainer, announcement_at_start, increment_due

log = logging.getLogger(__name__)


def register(streams: TrainStreams) -> None:
    # The training stack is imported here, before the event loop runs: importing torch,
    # transformers and peft holds the GIL for long stretches (most of a second on a busy machine),
    # which in the training thread would stall the loop, its heartbeats and /healthz.
    import peft  # noqa: F401

    from streamrec.model.recommender import set_threads

    app, settings, cfg = streams.app, streams.settings, streams.settings.online
    set_threads(settings.model.threads)
    if adapter_key(settings.adapter_key) is None:  # an empty key fails here, at start
        log.warning("STREAMREC_ADAPTER_KEY is not set: adapter announcements go out unsigned")
    training = Trainer(settings, streams.store)
    # One training thread: an increment never runs twice at once and never on the event loop.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
    state = {"running": False, "announced": False}

    async def announce(announcement: AdapterAnnouncement) -> None:
        await streams.adapters.send(key=ADAPTER_KEY, value=announcement.model_dump_json().encode())

    @app.timer(interval=cfg.interval_s, on_leader=True)  # type: ignore[untyped-decorator]
    async def trainer() -> None:
        if state["running"]:
            return
        if not state["announced"]:
            state["announced"] = True
            if (current := announcement_at_start(training.registry, settings.adapter_key)) is not None:
                await announce(current)
                log.info("trainer: announced the adapter in service, %s", current.version)
        mark = training.cursor.get()
        loop = asyncio.get_running_loop()
        fresh = await loop.run_in_executor(None, streams.store.count_fresh, mark, cfg.since)
        if not increment_due(fresh, bool(streams.catalog.values), cfg):
            log.info("trainer: %d new examples (need %d + %d held out)", fresh, cfg.min_new_examples, cfg.holdout)
            return
        state["running"] = True
        started = time.monotonic()
        log.info("trainer: increment starts on %d new examples (after arrival %s)", fresh, mark.arrival)
        try:
            result, after = await loop.run_in_executor(executor, training.increment, streams.catalog.values, mark)
        except Exception:
            log.exception("trainer: the increment failed; the adapter in service stays")
            return
        finally:
            state["running"] = False
        INCREMENT_SECONDS.observe(time.monotonic() - started)
        training.record(result, after)
        decision = result.decision
        GATE_DECISIONS.labels(decision="accepted" if decision.accepted else "refused").inc()
        if result.manifest is None:
            log.warning("trainer: gate refused the candidate (parent %s): %s", result.parent, decision.reason)
            return
        await announce(training.registry.announcement(result.manifest, settings.adapter_key))
        ADAPTER_PROMOTED.info({"version": result.manifest.version, "parent": result.parent or ""})
        log.info(
            "trainer: promoted %s (parent %s) after %.1fs: %s",
            result.manifest.version,
            result.parent,
            result.seconds,
            decision.reason,
        )
