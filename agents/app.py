"""Build a faust app for one role (ingest, infer or train) from Settings. Each role is its own consumer
group (the app id plus a suffix): faust expects every member of a group to run the same agents."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import TableT

from agents.internals import on_agent_error, set_fetch_max_wait
from agents.supervision import Supervisor
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
    supervisor: Supervisor


# faust's own views stay off: /table serves raw table values (a user's events and seen event ids),
# /router every worker's URL, the statistics index, /graph and /performance the worker's internals.
# table_route does not need /router (it asks the local assignor). "/" then answers {"status": "OK"}.
CLOSED_VIEWS = {
    "web_tables_enabled": False,
    "web_router_enabled": False,
    "web_stats_enabled": False,
    "web_graph_enabled": False,
    "web_metrics_enabled": False,
}
WILDCARDS = {"", "0.0.0.0", "::"}


def web_options(settings: Settings) -> dict[str, Any]:
    """faust's web settings: streamrec's views only, on STREAMREC_WEB_HOST and STREAMREC_WEB_PORT."""
    options: dict[str, Any] = {
        "web_enabled": True,
        "web_port": settings.web_port,
        "web_bind": settings.web_host,
        **CLOSED_VIEWS,
    }
    if settings.web_host not in WILDCARDS:
        # The canonical URL is where other workers forward table_route requests: the bound address,
        # not faust's default (the hostname, which need not resolve to it). On a wildcard bind the
        # hostname stays (NODE_CANONICAL_URL overrides it, see deploy/k8s).
        host = settings.web_host
        options["web_host"] = f"[{host}]" if ":" in host else host
    # faust lets its own unprefixed variables (WEB_BIND, APP_WEB_TABLES_ENABLED...) override these
    # arguments; drop them so the STREAMREC_* settings decide.
    ignored = {faust.Settings.SETTINGS[name].env_name for name in options}
    options["env"] = {k: v for k, v in os.environ.items() if k not in ignored}
    return options


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
        **web_options(settings),
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
    supervisor = Supervisor(settings, "ingest")
    on_agent_error(app, supervisor.on_agent_error)
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
        supervisor=supervisor,
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
        supervisor = streams.supervisor
    elif role == "infer":
        app, supervisor = faust_app(settings, "infer"), Supervisor(settings, "infer")
        on_agent_error(app, supervisor.on_agent_error)
        infer.register(app, settings, supervisor)
    elif role == "train":
        app, supervisor = faust_app(settings, "train"), Supervisor(settings, "train")
        on_agent_error(app, supervisor.on_agent_error)
        feedback.register(app, settings, supervisor)
    else:
        raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLES)}")
    web.register_common(app, supervisor)
    return app
