"""Catalog agent: the compacted catalog topic -> a global table of items every worker can read."""

from __future__ import annotations

import faust

from agents.app import IngestStreams
from agents.supervision import dead_letter
from streamrec.catalog import decode_item


def register(streams: IngestStreams) -> None:
    settings = streams.settings

    @streams.app.agent(streams.catalog_topic, name="catalog")
    async def catalog(stream: faust.StreamT[bytes]) -> None:
        async for raw in stream.events():
            message = raw.message
            if message.value is None and message.key is not None:
                streams.catalog.pop(message.key, None)  # a tombstone removes the item
                continue
            try:
                item = decode_item(message.value, message.key, settings.contract)
            except Exception as exc:  # whatever one message makes the decoder do, it is that message's
                await dead_letter(streams.dlq, settings, message, exc)
                continue
            streams.catalog[item.item_id.encode()] = item.model_dump_json().encode()
