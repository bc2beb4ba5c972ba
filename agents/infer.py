"""Inference agent: history updates -> micro-batches (newest history per user) -> generation in a
dedicated thread -> one recommendation per user on the recommendations topic."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import faust
from faust.types import EventT

from agents.supervision import Supervisor, dead_letter
from streamrec.catalog import Catalog
from streamrec.errors import InvalidMessage
from streamrec.events import (
    ADAPTER_KEY,
    AdapterAnnouncement,
    CatalogItem,
    HistoryUpdate,
    Recommendation,
    TrendingSnapshot,
    parse,
)
from streamrec.generation import Generator, refusal_reason
from streamrec.metrics import (
    ADAPTER_REJECTED,
    ADAPTER_SWAPS,
    FRESHNESS_SECONDS,
    GENERATION_SECONDS,
    INFER_BATCH,
    MODEL_INFO,
    RECOMMENDATIONS,
)
from streamrec.settings import KafkaSettings, Settings, client_config
from streamrec.signing import adapter_key
from streamrec.trending import merge_snapshots

log = logging.getLogger(__name__)


class TopicMirror:
    """The newest value per key of a compacted topic, kept up to date by a plain aiokafka consumer
    that reads every partition from the beginning (no consumer group: each worker keeps a copy)."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.kafka, self.topic = kafka, topic
        self.values: dict[bytes, bytes] = {}

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            **client_config(self.kafka),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.kafka.fetch_max_wait_ms,
        )
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(self.topic)
            while not parts:
                await asyncio.sleep(1.0)
                await consumer.force_metadata_update()
                parts = consumer.partitions_for_topic(self.topic)
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while True:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    for record in records:
                        if record.key is None:
                            continue
                        if record.value is None:
                            self.values.pop(record.key, None)  # a tombstone deletes the key
                        else:
                            self.values[record.key] = record.value
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("mirror of %s stopped", self.topic)
            raise
        finally:
            await consumer.stop()


def read_catalog(table: Mapping[bytes, bytes]) -> Catalog:
    """The catalog as a Catalog, skipping entries that do not validate (the ingest worker's catalog
    agent sends those to the dead-letter topic)."""
    items = []
    for value in list(table.values()):
        try:
            items.append(parse(CatalogItem, value))
        except InvalidMessage:
            continue
    return Catalog(items)


def read_trending(table: Mapping[bytes, bytes]) -> dict[str, float]:
    snapshots = []
    for value in list(table.values()):
        try:
            snapshots.append(parse(TrendingSnapshot, value).items)
        except InvalidMessage:
            continue
    return merge_snapshots(snapshots)


def register(app: faust.App, settings: Settings, supervisor: Supervisor) -> None:
    # Imported now, before the event loop runs: a first import of torch and transformers inside the
    # generation thread holds the GIL long enough to stall the loop, its heartbeats and /healthz.
    from streamrec.model.recommender import set_threads

    set_threads(settings.model.threads)
    topics, serve = settings.topics, settings.serve
    updates = app.topic(topics.history_updates, key_type=bytes, value_type=bytes)
    recommendations = app.topic(topics.recommendations, key_type=bytes, value_type=bytes)
    dlq = app.topic(topics.dlq, key_type=bytes, value_type=bytes)
    # Every worker needs the whole catalog and every partition's trending snapshot: mirror both
    # compacted topics into memory, outside the consumer group.
    catalog = TopicMirror(settings.kafka, topics.catalog)
    trending = TopicMirror(settings.kafka, topics.trending)
    adapters = TopicMirror(settings.kafka, topics.adapters)
    for mirror in (catalog, trending, adapters):
        app.add_future(supervisor.guard(f"mirror of {mirror.topic}", mirror.run()))
    # The announcement handled last (served or refused). Only the last one: a rollback announces an
    # older version again, byte for byte, and must still be acted on.
    considered: dict[str, bytes | None] = {"last": None}
    generator = Generator(settings)
    if adapter_key(settings.adapter_key) is None:  # an empty key fails here, at start
        log.warning(
            "STREAMREC_ADAPTER_KEY is not set: adapter announcements are not authenticated, and whoever can "
            "write to %s chooses which registered adapter is served",
            topics.adapters,
        )
    # One thread: generation is serialised and never blocks the event loop, so heartbeats and
    # commits go on while a slow batch runs.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
    refreshed = {"at": 0.0}

    async def refresh_catalog(loop: asyncio.AbstractEventLoop) -> None:
        fresh = time.monotonic() - refreshed["at"] < serve.catalog_refresh_s
        if fresh and generator.recommender is not None:
            return
        refreshed["at"] = time.monotonic()
        current = read_catalog(catalog.values)
        if not current.available_ids:
            return
        key = (len(current), hash(tuple((i.item_id, i.available, i.title) for i in current)))
        await loop.run_in_executor(executor, generator.set_catalog, current, key)
        if generator.recommender is not None:
            version = generator.recommender.version
            MODEL_INFO.info({"base": version.base, "adapter": version.adapter or ""})

    async def maybe_swap_adapter(loop: asyncio.AbstractEventLoop) -> None:
        """Swap in the newest announced adapter, in the generation thread between two batches; a
        refused one is logged and counted and the adapter in service stays."""
        raw = adapters.values.get(ADAPTER_KEY)
        if raw is None or raw == considered["last"]:
            return
        considered["last"] = raw
        try:
            announcement = parse(AdapterAnnouncement, raw)
            if announcement.version == (generator.recommender.version.adapter if generator.recommender else None):
                return
            await loop.run_in_executor(executor, generator.apply_adapter, announcement)
        except Exception as exc:  # whatever is wrong with an adapter, the one in service stays
            reason = refusal_reason(exc)
            ADAPTER_REJECTED.labels(reason=reason).inc()
            log.error("adapter announcement refused (%s), keeping the adapter in service: %s", reason, exc)
            return
        ADAPTER_SWAPS.inc()
        version = generator.recommender.version if generator.recommender else None
        if version is not None:
            MODEL_INFO.info({"base": version.base, "adapter": version.adapter or ""})

    async def generate(
        loop: asyncio.AbstractEventLoop, batch: list[tuple[EventT[bytes], HistoryUpdate]]
    ) -> list[tuple[HistoryUpdate, Recommendation]]:
        """The batch's recommendations; a history that breaks generation on its own is dead-lettered."""
        updates = [u for _, u in batch]
        served, failed = await loop.run_in_executor(
            executor, generator.generate_each, updates, read_trending(trending.values)
        )
        for n, exc in failed:
            await dead_letter(dlq, settings, batch[n][0].message, exc)
        return [(updates[n], rec) for n, rec in served]

    @app.agent(updates, name="infer")
    async def infer(stream: faust.StreamT[bytes]) -> None:
        assert isinstance(stream, faust.Stream)  # take_events is not on the StreamT protocol
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(serve.batch_size, within=serve.batch_within_s):
            newest: dict[str, tuple[EventT[bytes], HistoryUpdate]] = {}
            for raw in events:
                try:
                    update = parse(HistoryUpdate, raw.message.value, settings.contract)
                except Exception as exc:  # whatever one message makes the decoder do, it is that message's
                    await dead_letter(dlq, settings, raw.message, exc)
                    continue
                newest[update.user_id] = (raw, update)  # one user's updates arrive in order: keep the last
            await refresh_catalog(loop)
            if not newest:
                continue
            while generator.recommender is None:
                # Hold the batch (unacknowledged) until there is a catalog to recommend from.
                log.warning("no catalog in %s yet: waiting before generating", topics.catalog)
                await asyncio.sleep(2.0)
                await refresh_catalog(loop)
            await maybe_swap_adapter(loop)
            batch = list(newest.values())
            INFER_BATCH.observe(len(batch))
            started = time.perf_counter()
            served = await generate(loop, batch)
            GENERATION_SECONDS.observe(time.perf_counter() - started)
            for update, rec in served:
                await recommendations.send(key=rec.user_id.encode(), value=rec.model_dump_json().encode())
                kind = "model" if any(i.reason and "model" in i.reason for i in rec.items) else "trending"
                RECOMMENDATIONS.labels(kind=kind).inc()
                if update.trigger_appended_at is not None:
                    FRESHNESS_SECONDS.observe(time.time() - update.trigger_appended_at.timestamp())
