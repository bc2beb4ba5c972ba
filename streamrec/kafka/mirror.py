"""An in-memory mirror of a compacted topic (the catalog, trending snapshots, adapter announcements):
the newest value per key, read by every worker for itself outside any consumer group."""

from __future__ import annotations

import asyncio
import logging

from streamrec.kafka.clients import aio_consumer
from streamrec.settings import KafkaSettings

log = logging.getLogger(__name__)


class TopicMirror:
    """The newest value per key of a compacted topic, kept up to date by a plain aiokafka consumer
    that reads every partition from the beginning (no consumer group: each worker keeps a copy)."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.kafka, self.topic = kafka, topic
        self.values: dict[bytes, bytes] = {}

    async def run(self) -> None:
        from aiokafka import TopicPartition

        consumer = aio_consumer(
            self.kafka,
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
