"""Helpers shared by the integration tests: start workers, send messages, remember offsets."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from kafka import TopicPartition

from streamrec.kafka.clients import producer
from streamrec.kafka.offsets import wait_caught_up
from streamrec.lab.runner import spawn_worker, wait_http
from streamrec.settings import Settings

Ends = dict[Any, int]


def start_worker(role: str, settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    proc = spawn_worker(role, settings, log=log)
    wait_http(f"http://127.0.0.1:{settings.web_port}/healthz", timeout=120, proc=proc)
    return proc


def send_raw(
    settings: Settings, messages: list[tuple[str, str, bytes]], rate: float | None = None, ends: Ends | None = None
) -> Ends:
    """messages: (topic, key, value), sent in order, optionally paced. Returns (and records in `ends`)
    the next offset of every partition written, from the broker's acknowledgements."""
    ends = {} if ends is None else ends
    prod = producer(settings.kafka)
    start = time.monotonic()
    futures = []
    for i, (topic, key, value) in enumerate(messages):
        futures.append(prod.send(topic, key=key.encode(), value=value))
        if rate and i % 50 == 0:
            ahead = i / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    prod.flush()
    prod.close()
    for future in futures:
        meta = future.get(timeout=30)
        tp = TopicPartition(meta.topic, meta.partition)
        ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    return ends


def caught_up(settings: Settings, group: str, proc: Any, ends: Ends) -> None:
    wait_caught_up(settings.kafka, group, ends, timeout=180, proc=proc)
