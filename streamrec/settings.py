"""All configuration in one frozen pydantic-settings model: environment variables with the prefix
STREAMREC_ and `__` between nested names (STREAMREC_KAFKA__BOOTSTRAP_SERVERS), or a .env file.
Secrets are SecretStr, so printing or logging the settings never shows them."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
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
    fetch_max_wait_ms: int = Field(
        default=100, ge=0, description="Longest a worker's fetch waits for data; bounds the added latency."
    )

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        sasl_complete = self.sasl_mechanism and self.sasl_username and self.sasl_password
        if self.security_protocol.startswith("SASL") and not sasl_complete:
            raise ValueError(
                f"security_protocol={self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password"
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
    trending: str = "streamrec.trending"
    partitions: int = Field(default=4, ge=1, description="Partitions for topics streamrec creates.")
    replication_factor: int = Field(default=1, ge=1)


class ContractSettings(_Section):
    """Bounds on what a message may be. Anything outside them is a dead letter, decided before the
    message costs more than its size to look at."""

    max_message_bytes: int = Field(
        default=262_144, ge=1024, description="Largest message value decoded; a larger one is a dead letter."
    )
    max_depth: int = Field(default=32, ge=2, description="Deepest JSON nesting decoded (checked before parsing).")
    ts_min: datetime = Field(
        default=datetime(1970, 1, 1, tzinfo=UTC), description="Earliest event time accepted (ISO-8601)."
    )
    ts_max_ahead_s: float = Field(
        default=86_400.0, ge=0, description="How far ahead of the worker's clock an event time may be."
    )
    dead_letter_raw_bytes: int = Field(
        default=262_144,
        ge=1024,
        le=524_288,
        description="Most bytes of a bad message kept in its dead letter (the rest is cut, and the letter "
        "says so): base64 of this must fit the producer's 1 MiB request limit.",
    )


class HistorySettings(_Section):
    max_events: int = Field(default=50, ge=1, description="Events kept per user, newest by event time.")
    dedup_window: int = Field(default=1000, ge=1, description="Event ids remembered per user.")


class IngestSettings(_Section):
    batch_size: int = Field(default=500, ge=1, description="Most events the ingest agent handles at once.")
    batch_within_s: float = Field(default=0.05, gt=0, description="Longest wait to fill a batch.")
    cache_users: int = Field(default=20_000, ge=0, description="Decoded user states kept in memory.")


class TrendingSettings(_Section):
    half_life_s: float = Field(default=3600.0, gt=0, description="Event-time half-life of popularity counts.")
    publish_interval_s: float = Field(default=2.0, gt=0, description="How often ingest publishes trending items.")
    top_n: int = Field(default=200, ge=1, description="Items per published trending snapshot.")


class ServeSettings(_Section):
    batch_size: int = Field(default=64, ge=1, description="Most users in one generation batch.")
    batch_within_s: float = Field(default=0.1, gt=0, description="Longest wait to fill a batch.")
    cold_start_full_at: int = Field(
        default=5, ge=0, description="History length from which the model's list is served alone."
    )
    catalog_refresh_s: float = Field(default=5.0, gt=0, description="How often a changed catalog is re-read.")
    inject_delay_s: float = Field(
        default=0.0, ge=0, description="Fault injection: extra seconds each generation takes (tests, drills)."
    )
    exclude_seen: bool = Field(
        default=False,
        description="Never recommend an item already in the user's history (films, articles); purchases are "
        "always excluded.",
    )
    cold_start_task: bool = Field(
        default=True,
        description="Users with fewer than cold_start_full_at events are asked with the cold_start instruction "
        "(their items as text), blended with trending; False: the trigger's task, as for everyone.",
    )
    purchase_task: Literal["next_click", "next_purchase", "cold_start"] = Field(
        default="next_purchase",
        description="The instruction task after a purchase; after any other event: STREAMREC_MODEL__TASK.",
    )


class ModelSettings(_Section):
    base: str = Field(
        default="google/flan-t5-small",
        description="Hub id, a directory written by `streamrec train`, or 'tiny'.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="What the model computes in: served weights are cast to it; training keeps fp32 weights and "
        "runs under autocast to it on CUDA. auto: bfloat16 on a CUDA device that supports it, else float32 (on "
        "most CPUs bf16 matmuls are slower than fp32). No float16: T5's activations overflow it.",
    )
    scheme: Literal["item_token", "title", "semantic"] | None = Field(
        default=None,
        description="Item identifiers: one token per item, the title, or a semantic id (a few code tokens "
        "learned from item text and co-occurrence). None: what the model directory says (a plain hub "
        "checkpoint: title).",
    )
    task: Literal["next_click", "next_purchase", "cold_start"] = Field(
        default="next_click", description="The instruction task served."
    )
    templates: Path | None = Field(
        default=None,
        description="Instruction templates file; None: the model directory's copy or the packaged one.",
    )
    top_k: int = Field(default=10, ge=1, description="Items per recommendation.")
    num_beams: int = Field(default=10, ge=1, description="Beams for multi-token identifiers (title, semantic).")
    length_penalty: float = Field(
        default=0.0,
        ge=0.0,
        description="Multi-token identifiers are ranked by log P / length ** length_penalty; 0 ranks by log P, "
        "which is already a distribution over the catalog and lets the search stop early.",
    )
    exact_search: bool = Field(
        default=False,
        description="Multi-token identifiers: after the beam search, score by teacher forcing the items below any "
        "prefix the beams dropped that still beats the k-th item, so each list is the exact top k (without a "
        "length penalty). Cheap for a trained model; an untrained one pays for most of the catalog.",
    )
    batch_size: int = Field(default=64, ge=1, description="Users per forward pass.")
    blend: bool = Field(
        default=True,
        description="Blend the T5 scores with the item-kNN / Markov signal saved beside the model.",
    )
    blend_window: int = Field(
        default=40,
        ge=0,
        description="The blend's item-kNN, when a model is trained: items at most this many positions apart in "
        "a user's sequence are neighbours, weighted 1 / distance (0: classic item-kNN over whole histories).",
    )
    blend_decay: float = Field(
        default=0.5,
        ge=0.0,
        description="The blend's item-kNN weights the history's items by 1 / (position from the end) ** decay.",
    )
    threads: int = Field(
        default=0,
        ge=0,
        description="torch CPU threads in the inference and train workers; 0: torch's default (all cores). "
        "Set it when several workers share a machine: oversubscribed cores slow every one of them.",
    )


class TrainSettings(_Section):
    """Bootstrap and LoRA training. An epoch budget with early stopping decides how long a bootstrap
    trains, so the same data and seed give the same model on a busy machine as on an idle one; the
    time budget is only a cap (the report says when it bound). The defaults fit `streamrec eval` on
    MovieLens-100K and on a Beauty-sized sparse log into 30 minutes of a 2-core CPU."""

    seed: int = 0
    epochs: int = Field(
        default=5, ge=1, description="Passes over all sliding-window examples; the decay is planned for them."
    )
    batch_size: int = Field(default=256, ge=1)
    lr: float = Field(default=1e-3, gt=0, description="Peak AdamW learning rate (tiny from scratch).")
    finetune_lr: float = Field(default=3e-4, gt=0, description="Peak learning rate for a pretrained base.")
    lora_lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=1, description="Label smoothing of the item softmax (one-token-per-item schemes)."
    )
    warmup: float = Field(default=0.05, ge=0, lt=1, description="Share of the planned steps spent warming up.")
    patience: int = Field(default=3, ge=1, description="Epochs without a better validation NDCG@10 before stopping.")
    max_minutes: float = Field(
        default=26.0,
        gt=0,
        description="Wall-clock cap on the training loop: when the epochs will not fit, the decay is replanned "
        "to what does and training stops there (the log and the report say so).",
    )
    eval_users: int = Field(default=1000, ge=1, description="Validation users scored after each epoch.")
    cold_start_share: float = Field(default=0.05, ge=0, le=1, description="Share of examples using cold-start text.")
    d_model: int = Field(default=128, ge=8, description="tiny: hidden size.")
    d_ff: int = Field(default=256, ge=8, description="tiny: feed-forward size.")
    num_layers: int = Field(default=1, ge=1, description="tiny: encoder layers.")
    num_decoder_layers: int = Field(default=1, ge=1, description="tiny: decoder layers.")
    num_heads: int = Field(default=4, ge=1, description="tiny: attention heads.")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    text_vocab: int = Field(default=3000, ge=100, description="tiny: tokenizer vocabulary before item tokens.")
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)


class OnlineSettings(_Section):
    """The feedback agent and the periodic LoRA trainer (`streamrec worker train`)."""

    horizon_s: float = Field(
        default=1800.0, ge=0, description="An event joins a recommendation made at most this long before it."
    )
    keep_recs: int = Field(default=5, ge=1, description="Recommendations remembered per user for joining.")
    capacity: int = Field(
        default=100_000,
        ge=100,
        description="Training examples kept in the feedback store, oldest dropped first; also the window the "
        "blend is refitted on (more history makes better neighbourhoods; about 0.6 kB on disk and 4 kB in the "
        "trainer's memory during an increment per example).",
    )
    refit_blend: bool = Field(
        default=True,
        description="Each increment also refits the blend's item-kNN / Markov statistics on the feedback store "
        "and ships them with the adapter (gated together).",
    )
    refit_weights: bool = Field(
        default=True,
        description="With refit_blend, also choose the blend's weights again, on the newest fresh examples "
        "(statistics fitted without them, the model in service: nothing it has trained on).",
    )
    weights_examples: int = Field(
        default=1000,
        ge=50,
        description="Newest fresh examples the blend's weights are chosen on; with fewer than a fifth of "
        "that, the weights stay.",
    )
    interval_s: float = Field(default=300.0, gt=0, description="How often the trainer looks for new examples.")
    min_new_examples: int = Field(default=1000, ge=1, description="New examples needed before an increment runs.")
    replay_share: float = Field(
        default=0.5, ge=0, lt=1, description="Share of older examples mixed into each increment (no forgetting)."
    )
    max_train_examples: int = Field(
        default=20_000, ge=1, description="Most training examples per increment, newest fresh ones first."
    )
    holdout: int = Field(default=500, ge=1, description="Most recent examples kept out of training for the gate.")
    gate_tolerance: float = Field(
        default=0.01, ge=0, description="Largest absolute drop in HR@10 or NDCG@10 the gate lets through."
    )
    gate_min_examples: int = Field(default=100, ge=1, description="Held-out examples the gate needs to decide.")
    epochs: int = Field(default=2, ge=1, description="Passes over an increment's training examples.")
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0, description="Peak AdamW learning rate of an increment.")
    train_items: bool = Field(
        default=True,
        description="item_token scheme: also train the item tokens' embeddings (new and rising items).",
    )
    since: datetime | None = Field(
        default=None,
        description="Examples at or before this event time are never fresh: they only serve as replay.",
    )


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
    registry_dir: Path | None = Field(
        default=None, description="Adapter registry (a shared volume for several workers); default DATA_DIR/adapters."
    )
    web_port: int = Field(default=6066, ge=0, le=65535)
    web_host: str = Field(
        default="127.0.0.1",
        description="Address the web server binds; 0.0.0.0 only where the network is trusted (compose, k8s).",
    )
    web_token: SecretStr | None = Field(
        default=None, description="Bearer token required by /users/... (None: no token asked)."
    )
    adapter_key: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key signing adapter announcements: the same on the trainer and every inference "
        "worker. When set, an unsigned or wrongly signed announcement is refused.",
    )
    kafka: KafkaSettings = KafkaSettings()
    contract: ContractSettings = ContractSettings()
    topics: TopicSettings = TopicSettings()
    history: HistorySettings = HistorySettings()
    ingest: IngestSettings = IngestSettings()
    trending: TrendingSettings = TrendingSettings()
    serve: ServeSettings = ServeSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    online: OnlineSettings = OnlineSettings()
    rebalance_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Consumer-group rebalance timeout; keep it low on the embedded broker.",
    )
    session_timeout_s: float = Field(
        default=10.0, gt=0, description="A worker silent for this long is dropped from its consumer group."
    )


def registry_root(settings: Settings) -> Path:
    return settings.registry_dir or settings.data_dir / "adapters"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning a validation failure into a ConfigError that names the variable."""
    try:
        return Settings(**overrides)
    except ValueError as exc:
        raise ConfigError(f"invalid STREAMREC_* settings: {exc}") from exc


def to_env(settings: Settings) -> dict[str, str]:
    """The STREAMREC_* environment that reproduces `settings` in a child process (secrets included:
    pass it only to processes you start)."""
    env: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(f"{prefix}__{name.upper()}" if prefix else name.upper(), getattr(value, name))
        elif value is not None:
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"STREAMREC_{prefix}"] = str(value)

    walk("", settings)
    return env
