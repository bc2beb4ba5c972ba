"""Prometheus metrics every worker exports on /metrics. Names are part of the operations contract
(dashboards and alerts use them): change them only with the dashboards."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

EVENTS_CONSUMED = Counter("streamrec_events_consumed_total", "Input messages read by the ingest agent.", ["topic"])
EVENTS_REJECTED = Counter("streamrec_events_rejected_total", "Messages sent to the dead-letter topic.", ["topic"])
EVENTS_DUPLICATE = Counter("streamrec_events_duplicate_total", "Events dropped as already seen.")
HISTORY_UPDATES = Counter("streamrec_history_updates_total", "History updates published.")
INGEST_BATCH = Histogram(
    "streamrec_ingest_batch_events",
    "Events per ingest batch.",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
)

LAST_CRASH = Gauge(
    "streamrec_agent_last_crash_timestamp_seconds",
    "When this role's previous worker stopped on a failure not owned by one message (set at start from its "
    "data directory; absent when it never did).",
    ["agent"],
)
FEEDBACK_SKIPPED = Counter(
    "streamrec_feedback_skipped_total",
    "Events the feedback agent could not read (the ingest worker dead-letters them).",
    ["topic"],
)

RECOMMENDATIONS = Counter("streamrec_recommendations_total", "Recommendations published.", ["kind"])
INFER_BATCH = Histogram(
    "streamrec_infer_batch_users", "Users per generation batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
GENERATION_SECONDS = Histogram(
    "streamrec_generation_seconds",
    "Wall time of one generation batch.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FRESHNESS_SECONDS = Histogram(
    "streamrec_freshness_seconds",
    "From the trigger event's arrival in Kafka to its recommendation being published.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2, 5, 10, 30),
)
CONSUMER_LAG = Gauge("streamrec_consumer_lag", "Messages not yet read, per topic.", ["topic"])
MODEL_INFO = Info("streamrec_model", "Model in service: base and adapter version.")
ADAPTER_SWAPS = Counter("streamrec_adapter_swaps_total", "Adapter versions put in service.")
ADAPTER_REJECTED = Counter(
    "streamrec_adapter_rejected_total", "Announced adapters a worker refused to load.", ["reason"]
)

FEEDBACK_EXAMPLES = Counter(
    "streamrec_feedback_examples_total",
    "Training examples stored, by outcome: taken (the user chose a recommended item), ignored (a list "
    "was in force, the user chose another item), none (no list was in force).",
    ["outcome"],
)
FEEDBACK_STORE = Gauge("streamrec_feedback_store_examples", "Examples in the feedback store.")
GATE_DECISIONS = Counter("streamrec_gate_decisions_total", "Adapters judged by the gate.", ["decision"])
INCREMENT_SECONDS = Histogram(
    "streamrec_train_increment_seconds",
    "Wall time of one online increment (data, training, gate, registry).",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800),
)
ADAPTER_PROMOTED = Info("streamrec_adapter_promoted", "The adapter the trainer promoted last.")
LOOP_LAG_SECONDS = Gauge(
    "streamrec_event_loop_lag_seconds", "How late the event loop ran a 0.5 s timer, worst in the last minute."
)
