"""Build a faust app for one role (ingest, infer or train) from Settings. Each role is its own consumer
group (the app id plus a suffix): faust expects every member of a group to run the same agents."""

from __future__ import annotations

from dataclasses import dataclass

import faust
from faust.types import TableT

from agents.internals import set_fetch_max_wait
from streamrec.settings import Settings, faust_credentials

ROLES = {"ingest": "", "infer": "-infer", "train": "-train"}


@dataclass
class Streams:
    """What the ingest agents share: the app, the settings, topics and tables."""

    app: faust.App
    settings: Settings
    events: faust.TopicT
    dlq: faust.TopicT
    history_updates: faust.TopicT
    catalog_topic: faust.TopicT
    trending: faust.TopicT
    histories: TableT[bytes, bytes]  # user id -> UserState JSON
    catalog: TableT[bytes, bytes]  # item id -> CatalogItem JSON


def faust_app(settings: Settings, role: str) -> faust.App:
    kafka = settings.kafka
    set_fetch_max_wait(kafka.fetch_max_wait_ms)
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    return faust.App(
        settings.app_id + ROLES[role],
        broker=[f"kafka://{server}" for server in kafka.bootstrap_list],
        broker_credentials=faust_credentials(kafka),
        store="rocksdb://",
        datadir=str(settings.data_dir / f"state{ROLES[role]}"),
        web_enabled=True,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        autodiscover=False,
        topic_partitions=settings.topics.partitions,
        topic_replication_factor=settings.topics.replication_factor,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        key_serializer="raw",
        value_serializer="raw",
        # Commit often: a crash replays at most this much, and the dedup memory absorbs the replay.
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        table_standby_replicas=0,
    )


def ingest_streams(settings: Settings) -> Streams:
    app = faust_app(settings, "ingest")
    topics = settings.topics
    return Streams(
        app=app,
        settings=settings,
        events=app.topic(topics.clicks, topics.purchases, key_type=bytes, value_type=bytes),
        dlq=app.topic(topics.dlq, key_type=bytes, value_type=bytes),
        history_updates=app.topic(topics.history_updates, key_type=bytes, value_type=bytes),
        catalog_topic=app.topic(topics.catalog, key_type=bytes, value_type=bytes),
        trending=app.topic(topics.trending, key_type=bytes, value_type=bytes),
        histories=app.Table("histories", partitions=topics.partitions, key_type=bytes, value_type=bytes, default=None),
        catalog=app.GlobalTable(
            "catalog", partitions=topics.partitions, key_type=bytes, value_type=bytes, default=None
        ),
    )


def create_app(settings: Settings, role: str) -> faust.App:
    """The faust app of `role` with its agents and web views registered."""
    from agents import catalog, feedback, infer, ingest, web

    if role == "ingest":
        streams = ingest_streams(settings)
        ingest.register(streams)
        catalog.register(streams)
        web.register_history(streams)
        app = streams.app
    elif role == "infer":
        app = faust_app(settings, "infer")
        infer.register(app, settings)
    elif role == "train":
        app = faust_app(settings, "train")
        feedback.register(app, settings)
    else:
        raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLES)}")
    web.register_common(app)
    return app
