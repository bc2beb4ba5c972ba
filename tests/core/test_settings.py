"""Settings from the environment, and the same Kafka security for every client."""

from __future__ import annotations

import ssl

import pytest

from streamrec.errors import ConfigError
from streamrec.kafka.config import client_config, faust_credentials
from streamrec.settings import load_settings, to_env

SASL = {
    "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": "k1:9093,k2:9093",
    "STREAMREC_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
    "STREAMREC_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
    "STREAMREC_KAFKA__SASL_USERNAME": "svc-streamrec",
    "STREAMREC_KAFKA__SASL_PASSWORD": "hunter2",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("STREAMREC_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir("/")  # no stray .env file


def test_defaults() -> None:
    s = load_settings()
    assert s.kafka.bootstrap_servers == "localhost:9092"
    assert str(s.data_dir) == "streamrec-data" and s.web_port == 6066
    assert (s.history.max_events, s.history.dedup_window) == (50, 1000)
    assert s.topics.clicks == "streamrec.clicks" and s.topics.dlq == "streamrec.dlq"


def test_nested_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_HISTORY__MAX_EVENTS", "20")
    monkeypatch.setenv("STREAMREC_TOPICS__CLICKS", "shop.clicks")
    monkeypatch.setenv("STREAMREC_WEB_PORT", "7000")
    s = load_settings()
    assert (s.history.max_events, s.topics.clicks, s.web_port) == (20, "shop.clicks", 7000)


def test_sasl_ssl_reaches_every_client_and_the_secret_never_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SASL.items():
        monkeypatch.setenv(key, value)
    s = load_settings()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())
    cfg = client_config(s.kafka)  # kafka-python and aiokafka
    assert cfg["bootstrap_servers"] == ["k1:9093", "k2:9093"]
    assert (cfg["security_protocol"], cfg["sasl_mechanism"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (cfg["sasl_plain_username"], cfg["sasl_plain_password"]) == ("svc-streamrec", "hunter2")
    assert isinstance(cfg["ssl_context"], ssl.SSLContext)
    creds = faust_credentials(s.kafka)
    assert (creds.username, creds.password) == ("svc-streamrec", "hunter2")
    assert (creds.protocol.value, creds.mechanism.value) == ("SASL_SSL", "SCRAM-SHA-512")
    assert isinstance(creds.ssl_context, ssl.SSLContext)


def test_sasl_without_password_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("STREAMREC_KAFKA__SASL_MECHANISM", "PLAIN")
    with pytest.raises(ConfigError, match="sasl_password"):
        load_settings()


def test_unknown_mechanism_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_KAFKA__SASL_MECHANISM", "MD5")
    with pytest.raises(ConfigError, match="sasl_mechanism"):
        load_settings()


def test_plaintext_has_no_credentials() -> None:
    s = load_settings()
    assert faust_credentials(s.kafka) is None
    assert "sasl_mechanism" not in client_config(s.kafka)


def test_environment_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SASL.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("STREAMREC_INGEST__BATCH_SIZE", "64")
    original = load_settings()
    env = to_env(original)
    assert env["STREAMREC_KAFKA__SASL_PASSWORD"] == "hunter2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert load_settings() == original


def test_web_server_binds_loopback_and_asks_no_token_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.web_host == "127.0.0.1" and s.web_token is None
    monkeypatch.setenv("STREAMREC_WEB_HOST", "0.0.0.0")
    monkeypatch.setenv("STREAMREC_WEB_TOKEN", "s3cret-web-token")
    s = load_settings()
    assert s.web_host == "0.0.0.0"
    assert s.web_token is not None and s.web_token.get_secret_value() == "s3cret-web-token"
    assert "s3cret-web-token" not in repr(s)
