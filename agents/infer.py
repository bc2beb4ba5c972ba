"""Inference agent: history updates -> micro-batches (newest history per user) -> generation in a
dedicated thread -> one recommendation per user on the recommendations topic."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import faust

from agents.app import InferStreams
from agents.supervision import dead_letter
from streamrec.events import ADAPTER_KEY
from streamrec.generation import AdapterWatch, CatalogWatch, Generator, newest_per_user, served_by
from streamrec.metrics import FRESHNESS_SECONDS, GENERATION_SECONDS, INFER_BATCH, RECOMMENDATIONS
from streamrec.trending import TrendingReader

log = logging.getLogger(__name__)


def register(streams: InferStreams) -> None:
    # Imported now, before the event loop runs: a first import of torch and transformers inside the
    # generation thread holds the GIL long enough to stall the loop, its heartbeats and /healthz.
    from streamrec.model.recommender import set_threads

    app, settings, dlq, serve = streams.app, streams.settings, streams.dlq, streams.settings.serve
    set_threads(settings.model.threads)
    generator, catalogs, adapters = Generator(settings), CatalogWatch(serve.catalog_refresh_s), AdapterWatch()
    # One thread: generation is serialised and never blocks the event loop, so heartbeats and
    # commits go on while a slow batch runs.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
    trending = TrendingReader()

    async def refresh_catalog(loop: asyncio.AbstractEventLoop) -> None:
        current = catalogs.to_apply(streams.catalog.values, generator.recommender is not None, time.monotonic())
        if current is not None:
            await loop.run_in_executor(executor, generator.set_catalog, current, current.fingerprint())

    async def maybe_swap_adapter(loop: asyncio.AbstractEventLoop) -> None:
        # In the generation thread between two batches; a refused adapter leaves the one in service.
        try:
            announcement = adapters.to_apply(streams.adapters.values.get(ADAPTER_KEY), generator.version)
            if announcement is None:
                return
            await loop.run_in_executor(executor, generator.apply_adapter, announcement)
        except Exception as exc:  # whatever is wrong with an adapter, the one in service stays
            adapters.refused(exc)
            return
        adapters.served()

    @app.agent(streams.updates, name="infer")
    async def infer(stream: faust.StreamT[bytes]) -> None:
        assert isinstance(stream, faust.Stream)  # take_events is not on the StreamT protocol
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(serve.batch_size, within=serve.batch_within_s):
            batch, bad = newest_per_user(((raw, raw.message.value) for raw in events), settings.contract)
            for raw, exc in bad:
                await dead_letter(dlq, settings, raw.message, exc)
            await refresh_catalog(loop)
            if not batch:
                continue
            while generator.recommender is None:
                # Hold the batch (unacknowledged) until there is a catalog to recommend from.
                log.warning("no catalog in %s yet: waiting before generating", settings.topics.catalog)
                await asyncio.sleep(2.0)
                await refresh_catalog(loop)
            await maybe_swap_adapter(loop)
            INFER_BATCH.observe(len(batch))
            with GENERATION_SECONDS.time():
                trends, updates = trending.read(streams.trending.values), [u for _, u in batch]
                served, failed = await loop.run_in_executor(executor, generator.generate_each, updates, trends)
            for n, exc in failed:  # a history that breaks generation on its own
                await dead_letter(dlq, settings, batch[n][0].message, exc)
            for n, rec in served:
                await streams.recommendations.send(key=rec.user_id.encode(), value=rec.model_dump_json().encode())
                RECOMMENDATIONS.labels(kind=served_by(rec)).inc()
                if (appended := batch[n][1].trigger_appended_at) is not None:
                    FRESHNESS_SECONDS.observe(time.time() - appended.timestamp())
