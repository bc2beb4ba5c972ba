"""Ingest throughput: the faust ingest worker against a raw aiokafka consumer that only decodes and
against a bare faust agent that only decodes (the faust floor), on the same broker and the same
pre-loaded events, in one run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from streamrec.events import Event, parse
from streamrec.kafka.broker import EmbeddedBroker, free_port
from streamrec.kafka.clients import aio_consumer
from streamrec.kafka.offsets import wait_caught_up
from streamrec.kafka.topics import create_topics, read_topic, tagged_topics
from streamrec.lab.bench import cpu_seconds, machine, write_report
from streamrec.lab.runner import spawn_module, spawn_worker, stop_process, wait_http
from streamrec.lab.simulate import SimConfig, generate_events
from streamrec.lab.traffic import send_events
from streamrec.settings import KafkaSettings, Settings


async def raw_consume(kafka: KafkaSettings, topics: list[str], count: int) -> tuple[int, float, float]:
    """Read `count` messages from the start of `topics` and validate each as an Event; returns
    (messages, seconds from the first message to the last one decoded, CPU seconds meanwhile)."""
    from aiokafka import TopicPartition

    consumer = aio_consumer(kafka, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen, first, cpu_first = 0, 0.0, 0.0
        while seen < count:
            batches = await consumer.getmany(timeout_ms=1000, max_records=2000)
            for records in batches.values():
                if not first and records:
                    first, cpu_first = time.perf_counter(), time.process_time()
                for record in records:
                    parse(Event, record.value)
                    seen += 1
        return seen, time.perf_counter() - first, time.process_time() - cpu_first
    finally:
        await consumer.stop()


def faust_floor(settings: Settings, count: int, workdir: Path) -> tuple[int, float, float]:
    """Run the bare faust agent (streamrec.lab.bench.floor) over the `count` events from the start;
    returns (events, seconds from its first batch to its last, its CPU seconds meanwhile)."""
    done = workdir / "floor.json"
    floor = settings.model_copy(update={"app_id": f"{settings.app_id}-floor", "data_dir": workdir / "floor"})
    proc = spawn_module(["streamrec.lab.bench.floor", str(count), str(done)], floor, log=workdir / "floor.log")
    try:
        deadline = time.monotonic() + 1800
        while not done.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the faust floor agent stopped before {count} events; see {workdir / 'floor.log'}")
            time.sleep(0.2)
    finally:
        stop_process(proc)
    result = json.loads(done.read_text())
    return result["events"], result["last"] - result["first"], result["cpu_s"]


def run(events: int, out: Path, users: int = 2_000, items: int = 2_000, profile: Path | None = None) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as stack:
        settings = Settings()
        kafka = settings.kafka
        broker_name = kafka.bootstrap_servers
        if "STREAMREC_KAFKA__BOOTSTRAP_SERVERS" not in os.environ:
            broker = stack.enter_context(EmbeddedBroker())
            kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
            broker_name = "embedded tansu (memory)"
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streamrec-bench-")))
        topics = tagged_topics(settings.topics, f"bench-{tag}")
        settings = settings.model_copy(
            update={
                "kafka": kafka,
                "topics": topics,
                "app_id": f"streamrec-bench-{tag}",
                "data_dir": workdir / "data",
                "web_port": free_port(),
                "web_host": "127.0.0.1",
                "rebalance_timeout_s": 3.0,
            }
        )
        create_topics(kafka, topics)

        stream = list(generate_events(SimConfig(users=users, items=items, seed=1), events))
        stats = send_events(settings, stream)
        inputs = [topics.clicks, topics.purchases]

        n_raw, raw_s, raw_cpu = asyncio.run(raw_consume(kafka, inputs, len(stream)))
        n_floor, floor_s, floor_cpu = faust_floor(settings, len(stream), workdir)

        log = workdir / "worker.log"
        proc = spawn_worker("ingest", settings, log=log, profile=profile)
        try:
            wait_http(f"http://127.0.0.1:{settings.web_port}/healthz", timeout=120, proc=proc)
            cpu_ready = cpu_seconds(proc.pid)  # imports and start-up are not per-event work
            wait_caught_up(kafka, settings.app_id, stats.ends, timeout=1800, proc=proc)
            cpu_done = cpu_seconds(proc.pid)
        finally:
            stop_process(proc)
        # Processing span: from the first history update the worker published to the last one.
        stamps = [r.timestamp for r in read_topic(kafka, topics.history_updates, timeout=120)]
        worker_s = (max(stamps) - min(stamps)) / 1000

    raw_rate, floor_rate = n_raw / raw_s, n_floor / floor_s
    worker_rate = len(stream) / worker_s
    us = 1e6 / len(stream)
    worker_cpu = None if cpu_ready is None or cpu_done is None else (cpu_done - cpu_ready) * us
    report = {
        "benchmark": "ingest",
        "events": len(stream),
        "users": users,
        "broker": broker_name,
        "worker": {
            "events_per_s": worker_rate,
            "seconds": worker_s,
            "history_updates": len(stamps),
            "batch_size": settings.ingest.batch_size,
            "cpu_us_per_event": worker_cpu,
        },
        "raw_consumer": {
            "events_per_s": raw_rate,
            "seconds": raw_s,
            "cpu_us_per_event": raw_cpu * us,
            "decodes": "json + Event validation",
        },
        "faust_floor": {
            "events_per_s": floor_rate,
            "seconds": floor_s,
            "cpu_us_per_event": floor_cpu * us,
            "does": "a faust agent configured and batching like the ingest worker, decoding each event; no table",
        },
        "ratio": worker_rate / raw_rate,
        "ratio_floor_raw": floor_rate / raw_rate,
        "ratio_worker_floor": worker_rate / floor_rate,
        "machine": machine(),
    }
    write_report(
        report,
        out,
        [
            ("events", f"{len(stream):,}"),
            ("ingest worker events/s", f"{worker_rate:,.0f}"),
            ("raw aiokafka consumer events/s", f"{raw_rate:,.0f}"),
            ("faust floor (decode only) events/s", f"{floor_rate:,.0f}"),
            ("ratio worker / raw", f"{worker_rate / raw_rate:.2f}"),
            ("ratio faust floor / raw", f"{floor_rate / raw_rate:.2f}"),
            ("ratio worker / faust floor", f"{worker_rate / floor_rate:.2f}"),
            ("CPU µs/event: worker", "-" if worker_cpu is None else f"{worker_cpu:,.0f}"),
            ("CPU µs/event: raw, faust floor", f"{raw_cpu * us:,.0f}, {floor_cpu * us:,.0f}"),
        ],
        title=f"ingest benchmark ({broker_name})",
    )
    return report
