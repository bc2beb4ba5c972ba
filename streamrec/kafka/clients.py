"""Builders for every Kafka client streamrec makes (kafka-python and aiokafka), configured from
KafkaSettings with its security; keyword options are the libraries' own and override the defaults.
Modules outside the Kafka wing call these instead of constructing a client."""

from __future__ import annotations

from typing import Any

from streamrec.kafka.config import client_config
from streamrec.settings import KafkaSettings


def producer(kafka: KafkaSettings, **options: Any) -> Any:
    """A kafka-python producer; keys and values are bytes. Not idempotent: the embedded broker
    supports neither idempotent nor transactional producers."""
    from kafka import KafkaProducer

    defaults: dict[str, Any] = {"acks": "all", "linger_ms": 5, "retries": 5}
    return KafkaProducer(**(client_config(kafka) | defaults | options))


def consumer(kafka: KafkaSettings, **options: Any) -> Any:
    """A kafka-python consumer (no group unless `group_id` is given); subscribe or assign it."""
    from kafka import KafkaConsumer

    return KafkaConsumer(**(client_config(kafka) | options))


def admin(kafka: KafkaSettings, **options: Any) -> Any:
    """A kafka-python admin client."""
    from kafka import KafkaAdminClient

    return KafkaAdminClient(**(client_config(kafka) | options))


def aio_consumer(kafka: KafkaSettings, **options: Any) -> Any:
    """An aiokafka consumer, not started: `await consumer.start()` inside the event loop."""
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(**(client_config(kafka) | options))
