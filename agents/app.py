"""Build the faust app: topics, tables and the agents of the chosen roles, from Settings."""

from __future__ import annotations

from dataclasses import dataclass

import faust
from faust.types import TableT

from agents.internals import set_fetch_max_wait
from streamrec.settings import Settings, faust_credentials


@dataclass
class Streams:
    """Everything agents share: the app, the settings, topics and tables."""

    app: faust.App
    settings: Settings
    events: faust.TopicT
    dlq: faust.TopicT
    history_updates: faust.TopicT
    catalog_topic: faust.TopicT
    histories: TableT[bytes, bytes]  # user id -> UserState JSON
    catalog: TableT[bytes, bytes]  # item id -> CatalogItem JSON


def create_app(settings: Settings, roles: tuple[str, ...] = ("ingest",)) -> Streams:
    kafka = settings.kafka
    topics = settings.topics
    set_fetch_max_wait(kafka.fetch_max_wait_ms)
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in kafka.bootstrap_list],
        broker_credentials=faust_credentials(kafka),
        store="rocksdb://",
        datadir=str(settings.data_dir / "state"),
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        autodiscover=False,
        topic_partitions=topics.partitions,
        topic_replication_factor=topics.replication_factor,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=max(10.0, settings.rebalance_timeout_s),
        broker_heartbeat_interval=3.0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        key_serializer="raw",
        value_serializer="raw",
        # Commit often: a crash replays at most this much, and the dedup memory absorbs the replay.
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        table_standby_replicas=0,
    )
    streams = Streams(
        app=app,
        settings=settings,
        events=app.topic(topics.clicks, topics.purchases, key_type=bytes, value_type=bytes),
        dlq=app.topic(topics.dlq, key_type=bytes, value_type=bytes),
        history_updates=app.topic(topics.history_updates, key_type=bytes, value_type=bytes),
        catalog_topic=app.topic(topics.catalog, key_type=bytes, value_type=bytes),
        histories=app.Table(
            "histories", partitions=topics.partitions, key_type=bytes, value_type=bytes, default=None
        ),
        catalog=app.GlobalTable(
            "catalog", partitions=topics.partitions, key_type=bytes, value_type=bytes, default=None
        ),
    )
    from agents import catalog, ingest, web

    if "ingest" in roles:
        ingest.register(streams)
        catalog.register(streams)
        web.register(streams)
    return streams
