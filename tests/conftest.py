"""Shared fixtures: one broker per test session (a configured one, testcontainers' Kafka when a
Docker engine answers, else the embedded Tansu broker) and settings with fresh topic names."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamrec.kafka.broker import EmbeddedBroker, free_port
from streamrec.kafka.topics import tagged_topics
from streamrec.settings import KafkaSettings, Settings, TopicSettings

MakeSettings = Callable[..., Settings]


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaSettings]:
    configured = os.environ.get("STREAMREC_KAFKA__BOOTSTRAP_SERVERS")
    if configured:
        yield KafkaSettings(bootstrap_servers=configured)
    elif _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as kafka:
            yield KafkaSettings(bootstrap_servers=kafka.get_bootstrap_server())
    else:
        log = tmp_path_factory.mktemp("broker") / "tansu.log"
        with EmbeddedBroker(log_path=str(log)) as broker:
            yield KafkaSettings(bootstrap_servers=broker.bootstrap_servers)


@pytest.fixture
def make_settings(kafka_settings: KafkaSettings, tmp_path: Path) -> MakeSettings:
    """Settings for one test: fresh topics, consumer group, state directory and web port."""

    def make(**overrides: Any) -> Settings:
        tag = uuid.uuid4().hex[:8]
        base: dict[str, Any] = {
            "app_id": f"streamrec-test-{tag}",
            "data_dir": tmp_path / tag,
            "web_port": free_port(),
            "web_host": "127.0.0.1",
            "kafka": kafka_settings,
            "topics": tagged_topics(TopicSettings(partitions=4), tag),
            # The embedded broker holds a group join for the whole rebalance timeout.
            "rebalance_timeout_s": 3.0,
        }
        return Settings(**(base | overrides))

    return make


@pytest.fixture(scope="session")
def walk_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model trained on the walk pattern (tests/walks.py), once per session; read-only."""
    pytest.importorskip("torch")
    from walks import train_walk_model

    return train_walk_model(tmp_path_factory.mktemp("walk") / "model")


@pytest.fixture(scope="session")
def semantic_walk_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model trained on the walk pattern under the `semantic` scheme; read-only."""
    pytest.importorskip("torch")
    from walks import train_walk_model

    return train_walk_model(tmp_path_factory.mktemp("walk") / "semantic", scheme="semantic")


@pytest.fixture(scope="session")
def flan_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Flan-T5-shaped hub directory (T5 v1.1, Unigram tokenizer, random weights, small dimensions)
    over the walk catalog's text (tests/flan_walks.py), once per session; read-only."""
    pytest.importorskip("torch")
    from flan_walks import build_flan

    return build_flan(tmp_path_factory.mktemp("flan") / "hub")


@pytest.fixture(scope="session")
def flan_model(flan_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """`flan_checkpoint` fine-tuned on the walk pattern with titles, as `streamrec train --base DIR`
    does (about 6 s): (the model directory, the training report); read-only."""
    from flan_walks import bootstrap

    return bootstrap(flan_checkpoint, tmp_path_factory.mktemp("flan") / "bootstrap")
