"""All configuration in one frozen pydantic-settings model: environment variables with the prefix
STREAMREC_ and `__` between nested names (STREAMREC_KAFKA__BOOTSTRAP_SERVERS), or a .env file.
Secrets are SecretStr, so printing or logging the settings never shows them."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamrec.errors import ConfigError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """How every client (faust, aiokafka, kafka-python) reaches the brokers."""

    bootstrap_servers: str = "localhost:9092"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = Field(default=None, description="Password of the TLS key file.")
    ssl_check_hostname: bool = True
    client_id: str = "streamrec"

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL"):
            if not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
                raise ValueError(
                    f"security_protocol={self.security_protocol} needs sasl_mechanism, sasl_username "
                    "and sasl_password"
                )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together")
        return self

    @property
    def bootstrap_list(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """One TLS context for every client, built from the CA, cert and key files."""
        if not self.uses_ssl:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
        ctx.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile and self.ssl_keyfile:
            ctx.load_cert_chain(
                str(self.ssl_certfile),
                str(self.ssl_keyfile),
                password=self.ssl_password.get_secret_value() if self.ssl_password else None,
            )
        return ctx


class TopicSettings(_Section):
    clicks: str = "streamrec.clicks"
    purchases: str = "streamrec.purchases"
    catalog: str = "streamrec.catalog"
    dlq: str = "streamrec.dlq"
    history_updates: str = "streamrec.history-updates"
    recommendations: str = "streamrec.recommendations"
    adapters: str = "streamrec.adapters"
    partitions: int = Field(default=4, ge=1, description="Partitions for topics streamrec creates.")
    replication_factor: int = Field(default=1, ge=1)


class HistorySettings(_Section):
    max_events: int = Field(default=50, ge=1, description="Events kept per user, newest by event time.")
    dedup_window: int = Field(default=1000, ge=1, description="Event ids remembered per user.")


class IngestSettings(_Section):
    batch_size: int = Field(default=500, ge=1, description="Most events the ingest agent handles at once.")
    batch_within_s: float = Field(default=0.05, gt=0, description="Longest wait to fill a batch.")


class ModelSettings(_Section):
    base: str = Field(
        default="google/flan-t5-small", description="Hub id, a directory written by `streamrec train`, or 'tiny'."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        frozen=True,
    )

    app_id: str = Field(default="streamrec", description="faust app id: consumer group and changelog prefix.")
    data_dir: Path = Path("./streamrec-data")
    web_port: int = Field(default=6066, ge=0, le=65535)
    web_host: str = "0.0.0.0"
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    history: HistorySettings = HistorySettings()
    ingest: IngestSettings = IngestSettings()
    model: ModelSettings = ModelSettings()
    rebalance_timeout_s: float = Field(
        default=60.0, gt=0, description="Consumer-group rebalance timeout; keep it low on the embedded broker."
    )


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning a validation failure into a ConfigError that names the variable."""
    try:
        return Settings(**overrides)
    except ValueError as exc:
        raise ConfigError(f"invalid STREAMREC_* settings: {exc}") from exc


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
