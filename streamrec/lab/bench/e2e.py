"""End-to-end freshness: simulated events at a fixed rate through the real broker, the ingest
worker and the inference worker; for each recommendation, the time from its trigger event's
arrival in Kafka to the recommendation's arrival in Kafka (both broker-side record timestamps
set by the producers on this machine)."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

from streamrec.events import Recommendation
from streamrec.kafka.clients import consumer
from streamrec.lab.bench import machine, write_report
from streamrec.lab.runner import local_stack, running_workers
from streamrec.lab.simulate import SimConfig, generate_events, make_catalog
from streamrec.lab.traffic import SendStats, send_catalog, send_events
from streamrec.settings import Settings


def _collect(settings: Settings, out: list[tuple[float, str, int]], stop: threading.Event) -> None:
    """(publish time, trigger event id, items) of every recommendation, as it arrives."""
    reader = consumer(settings.kafka, auto_offset_reset="earliest", enable_auto_commit=False)
    reader.subscribe([settings.topics.recommendations])
    try:
        while not stop.is_set():
            for records in reader.poll(timeout_ms=200).values():
                for record in records:
                    rec = Recommendation.model_validate_json(record.value)
                    out.append((record.timestamp / 1000, rec.trigger_event_id or "", len(rec.items)))
    finally:
        reader.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(
    rate: float,
    duration: float,
    out: Path,
    *,
    model: str = "tiny",
    warmup: float = 15.0,
    users: int = 2_000,
    items: int = 1_000,
) -> dict[str, Any]:
    base = Settings()
    base = base.model_copy(update={"model": base.model.model_copy(update={"base": model})})
    cfg = SimConfig(users=users, items=items, seed=3)
    recs: list[tuple[float, str, int]] = []
    sent = SendStats()
    with local_stack(base) as settings:
        send_catalog(settings, make_catalog(cfg))
        with running_workers(settings, ("ingest", "infer")):
            stop, done = threading.Event(), threading.Event()
            collector = threading.Thread(target=_collect, args=(settings, recs, done), daemon=True)
            collector.start()
            sender = threading.Thread(
                target=send_events,
                kwargs={
                    "settings": settings,
                    "events": generate_events(cfg, 10_000_000),
                    "rate": rate,
                    "stats": sent,
                    "stop": stop,
                },
                daemon=True,
            )
            sender.start()
            time.sleep(warmup)  # group joins, catalog, model load: not what this measures
            window_start, sent_before = time.time(), sent.sent
            time.sleep(duration)
            window_end, sent_in_window = time.time(), sent.sent - sent_before
            stop.set()
            sender.join(timeout=30)
            time.sleep(5)  # let the last recommendations of the window arrive
            done.set()
            collector.join(timeout=10)

    freshness = [
        published - sent.appended[trigger]
        for published, trigger, _ in recs
        if trigger in sent.appended and window_start <= sent.appended[trigger] <= window_end
    ]
    if not freshness:
        raise RuntimeError("no recommendation was published for the measured window; see the worker logs")
    f = {
        "p50": statistics.median(freshness),
        "p90": percentile(freshness, 0.9),
        "p99": percentile(freshness, 0.99),
        "max": max(freshness),
    }
    report: dict[str, Any] = {
        "benchmark": "e2e",
        "model": model if model != "tiny" else "tiny (untrained weights unless a trained one is under the data dir)",
        "rate_target": rate,
        "rate_sent": sent_in_window / (window_end - window_start),
        "duration_s": window_end - window_start,
        "events_in_window": sent_in_window,
        "recommendations_in_window": len(freshness),
        "freshness_s": f,
        "note": "one recommendation per user per micro-batch: events of the same user within a batch share one",
        "users": users,
        "items": items,
        "machine": machine(),
    }
    write_report(
        report,
        out,
        [
            ("events/s sent", f"{report['rate_sent']:,.0f}"),
            ("recommendations", f"{len(freshness):,}"),
            ("freshness p50", f"{f['p50'] * 1000:,.0f} ms"),
            ("freshness p99", f"{f['p99'] * 1000:,.0f} ms"),
            ("freshness max", f"{f['max'] * 1000:,.0f} ms"),
        ],
        title=f"end-to-end at {rate:g} events/s ({model})",
    )
    return report
