"""Build a faust app for one role (ingest, infer or train) from Settings, with the topics, tables and
topic mirrors its agents share. Each role is its own consumer group (the app id plus a suffix): faust
expects every member of a group to run the same agents. Imports no agent: agents.create_app wires them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import TableT

from agents.internals import on_agent_error, set_fetch_max_wait
from agents.supervision import Supervisor
from streamrec.cache import LRUCache
from streamrec.feedback_store import ExampleStore
from streamrec.kafka.config import faust_credentials
from streamrec.kafka.mirror import TopicMirror
from streamrec.settings import Settings

ROLES = {"ingest": "", "infer": "-infer", "train": "-train"}

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """What every worker's agents share."""

    app: faust.App
    settings: Settings
    dlq: faust.TopicT
    supervisor: Supervisor


@dataclass
class IngestStreams(Worker):
    events: faust.TopicT  # clicks and purchases
    history_updates: faust.TopicT
    catalog_topic: faust.TopicT
    trending: faust.TopicT
    histories: TableT[bytes, bytes]  # user id -> UserState JSON
    catalog: TableT[bytes, bytes]  # item id -> CatalogItem JSON


@dataclass
class InferStreams(Worker):
    updates: faust.TopicT  # history updates
    recommendations: faust.TopicT
    # Every worker needs the whole catalog and every partition's trending snapshot: mirrors of the
    # compacted topics, outside the consumer group.
    catalog: TopicMirror
    trending: TopicMirror
    adapters: TopicMirror


@dataclass
class TrainStreams(Worker):
    source: faust.TopicT  # clicks, purchases and recommendations
    adapters: faust.TopicT
    users: TableT[bytes, bytes]  # user id -> FeedbackUser JSON
    store: ExampleStore
    catalog: TopicMirror


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
        # faust's 16 KB batches hold less than one full history value, so each table write and
        # history update went out as its own produce request; a few ms of linger fills requests.
        producer_linger=0.005,
        producer_max_batch_size=512 * 1024,
        key_serializer="raw",
        value_serializer="raw",
        # Commit often: a crash replays at most this much, and the dedup memory absorbs the replay.
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        table_standby_replicas=0,
    )


def worker(settings: Settings, role: str) -> Worker:
    """The app of `role`, whose agents stop the worker on a failure no message owns."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLES)}")
    app, supervisor = faust_app(settings, role), Supervisor(settings, role)
    on_agent_error(app, supervisor.on_agent_error)  # before any agent is defined: it applies to those after
    dlq = app.topic(settings.topics.dlq, key_type=bytes, value_type=bytes)
    return Worker(app, settings, dlq, supervisor)


def topic(w: Worker, *names: str) -> faust.TopicT:
    return w.app.topic(*names, key_type=bytes, value_type=bytes)


def mirror(w: Worker, name: str) -> TopicMirror:
    """A mirror of a compacted topic whose death stops the worker: it would serve stale data."""
    mirrored = TopicMirror(w.settings.kafka, name)
    w.app.add_future(w.supervisor.guard(f"mirror of {name}", mirrored.run()))
    return mirrored


def user_cache(app: faust.App, capacity: int) -> LRUCache[bytes, Any]:
    """A cache of decoded per-user table values. Any rebalance may move users: forget them all."""
    cache: LRUCache[bytes, Any] = LRUCache(capacity)
    app.on_partitions_revoked.connect(lambda *_, **__: cache.clear(), weak=False)
    app.on_partitions_assigned.connect(lambda *_, **__: cache.clear(), weak=False)
    return cache


def ingest_streams(settings: Settings) -> IngestStreams:
    w, topics = worker(settings, "ingest"), settings.topics
    return IngestStreams(
        **vars(w),
        events=topic(w, topics.clicks, topics.purchases),
        history_updates=topic(w, topics.history_updates),
        catalog_topic=topic(w, topics.catalog),
        trending=topic(w, topics.trending),
        histories=w.app.Table(
            "histories", partitions=topics.partitions, key_type=bytes, value_type=bytes, default=None
        ),
        catalog=w.app.GlobalTable(
            "catalog", partitions=topics.partitions, key_type=bytes, value_type=bytes, default=None
        ),
    )


def check_model(settings: Settings) -> str:
    """Raise ModelError, naming the fixes, when the configured base model cannot be loaded (a hub
    id the hub does not serve here, a directory without weights): at start, before the worker joins
    its consumer group, not on the first catalog message. Returns what the model runs on."""
    from streamrec.generation import TINY, tiny_dir
    from streamrec.model.recommender import check_loadable, dtype_name, resolve_device, resolve_dtype

    cfg = settings.model
    base: str | None = cfg.base
    if base == TINY:
        trained = tiny_dir(settings)
        base = str(trained) if (trained / "config.json").is_file() else None  # else built at the first catalog
    if base is not None:
        check_loadable(base)
    device = resolve_device(cfg.device)
    return f"model {cfg.base} on {device}, computing in {dtype_name(resolve_dtype(cfg.dtype, device))}"


def log_at_start(app: faust.App, message: str) -> None:
    """Log `message` once the worker runs (faust configures logging only then)."""

    async def say() -> None:
        log.info("%s", message)

    app.task(say)


def infer_streams(settings: Settings) -> InferStreams:
    running_on = check_model(settings)
    w, topics = worker(settings, "infer"), settings.topics
    log_at_start(w.app, f"inference worker: {running_on}")
    return InferStreams(
        **vars(w),
        updates=topic(w, topics.history_updates),
        recommendations=topic(w, topics.recommendations),
        catalog=mirror(w, topics.catalog),
        trending=mirror(w, topics.trending),
        adapters=mirror(w, topics.adapters),
    )


def train_streams(settings: Settings) -> TrainStreams:
    running_on = check_model(settings)
    w, topics = worker(settings, "train"), settings.topics
    log_at_start(w.app, f"train worker: {running_on} (fp32 weights while training)")
    return TrainStreams(
        **vars(w),
        source=topic(w, topics.clicks, topics.purchases, topics.recommendations),
        adapters=topic(w, topics.adapters),
        users=w.app.Table(
            "feedback-users", partitions=topics.partitions, key_type=bytes, value_type=bytes, default=None
        ),
        store=ExampleStore(settings.data_dir / "feedback", settings.online.capacity),
        catalog=mirror(w, topics.catalog),
    )
