"""Client configuration from KafkaSettings: the keyword arguments every kafka-python and aiokafka
client takes, and faust's broker credentials. Security (SASL, TLS) is decided here, once."""

from __future__ import annotations

from typing import Any

from streamrec.settings import KafkaSettings


def client_config(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for kafka-python's and aiokafka's producers, consumers and admin clients
    (both libraries name these options the same way)."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_list,
        "security_protocol": kafka.security_protocol,
        "client_id": kafka.client_id,
    }
    if kafka.security_protocol.startswith("SASL"):
        cfg |= {
            "sasl_mechanism": kafka.sasl_mechanism,
            "sasl_plain_username": kafka.sasl_username,
            "sasl_plain_password": kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
        }
    if kafka.uses_ssl:
        cfg["ssl_context"] = kafka.ssl_context()
    return cfg


def faust_credentials(kafka: KafkaSettings) -> Any:
    """faust's broker_credentials for these settings (None for PLAINTEXT)."""
    import faust  # imported here: the pure core and the CLI's --help must not pay for faust

    if kafka.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            mechanism=kafka.sasl_mechanism,
            ssl_context=kafka.ssl_context(),
        )
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(kafka.ssl_context())
    return None
