"""streamrec's topics on any broker: their specs, creating the missing ones, fresh per-run names,
reading a whole topic without a group, and sealing changelog partitions before tables restore."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any

from streamrec.errors import BrokerError
from streamrec.kafka.clients import admin, consumer, producer
from streamrec.settings import KafkaSettings, TopicSettings


def topic_specs(topics: TopicSettings) -> dict[str, dict[str, str]]:
    """Every topic streamrec uses, with its config. Catalog and adapters are compacted: the newest
    value per key is the truth."""
    compact = {"cleanup.policy": "compact"}
    return {
        topics.clicks: {},
        topics.purchases: {},
        topics.catalog: compact,
        topics.dlq: {},
        topics.history_updates: {},
        topics.recommendations: {},
        topics.adapters: compact,
        topics.trending: compact,
    }


def tagged_topics(topics: TopicSettings, tag: str) -> TopicSettings:
    """`topics` with `.{tag}` after every topic name, for a run (a test, a replay, a benchmark) that
    must not share state with another on the same broker. Every name field is tagged, so a topic
    added to TopicSettings is covered without touching the callers."""
    names = {
        name: f"{getattr(topics, name)}.{tag}"
        for name, field in TopicSettings.model_fields.items()
        if field.annotation is str
    }
    return topics.model_copy(update=names)


def create_topics(kafka: KafkaSettings, topics: TopicSettings, timeout: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; returns the names created. Event topics share one
    partition count because the ingest tables are co-partitioned with them."""
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    deadline = time.monotonic() + timeout
    while True:
        try:
            client = admin(kafka, request_timeout_ms=10_000)
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}") from exc
            time.sleep(0.5)
    try:
        existing = set(client.list_topics())
        specs = topic_specs(topics)
        new = [
            NewTopic(
                name,
                1 if name in (topics.adapters, topics.trending) else topics.partitions,
                topics.replication_factor,
                topic_configs=cfg,
            )
            for name, cfg in specs.items()
            if name not in existing
        ]
        created: list[str] = []
        for topic in new:
            with contextlib.suppress(TopicAlreadyExistsError):
                client.create_topics([topic])
                created.append(topic.name)
        return created
    finally:
        client.close()


def read_topic(kafka: KafkaSettings, topic: str, timeout: float = 10.0, idle: float = 1.0) -> list[Any]:
    """Every record currently in `topic` (all partitions, from the beginning), without a group.

    Reads past the reported end offsets until the topic has been quiet for `idle` seconds: the
    embedded broker can report an end offset short of the last records (see `seal_partitions`)."""
    from kafka import TopicPartition

    reader = consumer(kafka, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + timeout
        parts = reader.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = reader.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts or ())]
        reader.assign(tps)
        reader.seek_to_beginning(*tps)
        ends = reader.end_offsets(tps)
        records: list[Any] = []
        quiet_since = time.monotonic()
        while any(reader.position(tp) < ends[tp] for tp in tps) or time.monotonic() - quiet_since < idle:
            if time.monotonic() > deadline + idle:
                raise BrokerError(f"timed out reading {topic}")
            polled = reader.poll(timeout_ms=200)
            for batch in polled.values():
                records.extend(batch)
            if polled:
                quiet_since = time.monotonic()
        return records
    finally:
        reader.close()


# A key no table uses: its tombstone changes no state when a changelog is replayed.
SEAL_KEY = b"__streamrec_seal__"


def seal_partitions(kafka: KafkaSettings, topics: Iterable[str]) -> int:
    """Append a one-record batch (a tombstone for SEAL_KEY) to every partition of `topics` that
    exist; returns the number of partitions sealed.

    The embedded Tansu broker reports a partition's high watermark as one past the *first* record
    of the last batch written, so when that batch held several records its end offset falls short.
    faust restores tables from their changelogs up to that watermark, and refuses to start when its
    local RocksDB has seen further. A final single-record batch makes the watermark true again. On
    a real Kafka this is a harmless extra tombstone per changelog partition at worker start."""
    meta = consumer(kafka)
    prod = producer(kafka, acks="all", linger_ms=0)
    sealed = 0
    try:
        for topic in topics:
            for partition in sorted(meta.partitions_for_topic(topic) or ()):
                prod.send(topic, key=SEAL_KEY, value=None, partition=partition).get(timeout=30)
                sealed += 1
    finally:
        prod.close()
        meta.close()
    return sealed
