"""Catalog agent: the compacted catalog topic -> a global table of items every worker can read."""

from __future__ import annotations

import faust

from agents.app import Streams
from agents.supervision import dead_letter
from streamrec.errors import InvalidMessage
from streamrec.events import CatalogItem, parse


def register(streams: Streams) -> None:
    settings = streams.settings

    @streams.app.agent(streams.catalog_topic, name="catalog")
    async def catalog(stream: faust.StreamT[bytes]) -> None:
        async for raw in stream.events():
            message = raw.message
            if message.value is None and message.key is not None:
                streams.catalog.pop(message.key, None)  # a tombstone removes the item
                continue
            try:
                item = parse(CatalogItem, message.value, settings.contract)
                if message.key is not None and message.key != item.item_id.encode():
                    raise InvalidMessage(f"message key {message.key[:300]!r} is not the item_id {item.item_id!r}")
            except Exception as exc:  # whatever one message makes the decoder do, it is that message's
                await dead_letter(streams.dlq, settings, message, exc)
                continue
            streams.catalog[item.item_id.encode()] = item.model_dump_json().encode()
