"""Ingest agent: click and purchase events -> rolling per-user histories (RocksDB table with a
changelog) and history updates; anything that does not validate -> the dead-letter topic."""

from __future__ import annotations

import time

import faust
from faust.types import EventT

from agents.app import IngestStreams, user_cache
from agents.internals import bind_event
from agents.supervision import dead_letter
from streamrec.events import Event, kafka_time, utcnow
from streamrec.history import apply_batch, decode_event, encode_events, history_update_json, stored_state
from streamrec.metrics import EVENTS_CONSUMED, EVENTS_DUPLICATE, HISTORY_UPDATES, INGEST_BATCH
from streamrec.trending import PartitionTrending


def register(streams: IngestStreams) -> None:
    app, settings, dlq = streams.app, streams.settings, streams.dlq
    hist, batching = settings.history, settings.ingest
    # The table stays the truth: every change is written to it; the cache saves the read and decode.
    cache = user_cache(app, batching.cache_users)
    # Rolling popularity per input partition, published for cold-start recommendations.
    trending = PartitionTrending(settings.trending.half_life_s)
    app.on_partitions_revoked.connect(lambda *_, **__: trending.clear(), weak=False)
    published = {"at": 0.0}

    async def apply_user(key: bytes, arrivals: list[tuple[EventT[bytes], Event]]) -> None:
        """One user's events of a batch, in arrival order: one table write and one history update."""
        bind_event(arrivals[0][0])
        state = cache.get(key)
        if state is None:
            state = stored_state(key, streams.histories.get(key))
        batch = apply_batch(state, [e for _, e in arrivals], max_events=hist.max_events, dedup_window=hist.dedup_window)
        for n, exc in batch.failed:
            await dead_letter(dlq, settings, arrivals[n][0].message, exc)
        EVENTS_DUPLICATE.inc(len(arrivals) - len(batch.accepted) - len(batch.failed))
        if not batch.accepted:
            return
        bind_event(arrivals[0][0])  # the dead letters above may have moved faust's current event
        events_json = encode_events(batch.state.events)  # once, for the table value and the update
        streams.histories[key] = batch.state.to_bytes(events_json)  # faust persists only on assignment
        cache.put(key, batch.state)
        trending.add(arrivals[0][0].message.partition, (arrivals[n][1] for n in batch.accepted))
        if batch.trigger is not None:
            raw, event = arrivals[batch.trigger]
            update = history_update_json(events_json, event, kafka_time(raw.message.timestamp))
            await streams.history_updates.send(key=key, value=update)
            HISTORY_UPDATES.inc()

    @app.agent(streams.events, name="ingest")
    async def ingest(stream: faust.StreamT[bytes]) -> None:
        # Batches amortise the read-modify-write of hot users: one table write and one history
        # update per user per batch. Events are acked only after the batch body returns; a failure
        # that escapes it stops the worker (agents.supervision) before anything is acked.
        assert isinstance(stream, faust.Stream)  # take_events is not on the StreamT protocol
        async for events in stream.take_events(batching.batch_size, within=batching.batch_within_s):
            INGEST_BATCH.observe(len(events))
            by_user: dict[bytes, list[tuple[EventT[bytes], Event]]] = {}
            for raw in events:
                EVENTS_CONSUMED.labels(topic=raw.message.topic).inc()
                try:
                    event = decode_event(raw.message.value, raw.message.key, settings.contract)
                except Exception as exc:  # whatever one message makes the decoder do, it is that message's
                    await dead_letter(dlq, settings, raw.message, exc)
                    continue
                by_user.setdefault(event.user_id.encode(), []).append((raw, event))
            for key, arrivals in by_user.items():
                await apply_user(key, arrivals)
            if time.monotonic() - published["at"] >= settings.trending.publish_interval_s:
                # From the agent between batches rather than a faust timer: one task writes, so the
                # snapshots never interleave with a batch in progress.
                published["at"] = time.monotonic()
                for snapshot in trending.snapshots(settings.trending.top_n, as_of=utcnow()):
                    value = snapshot.model_dump_json().encode()
                    await streams.trending.send(key=str(snapshot.partition).encode(), value=value)
