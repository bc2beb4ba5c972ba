"""A failure no single message owns stops the worker loudly, and nothing past it is committed: the
events behind it are read again by the next worker, instead of being acknowledged and lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition

from agents.supervision import EXIT_FAILURE
from streamrec.kafka.clients import producer
from streamrec.kafka.offsets import committed_offsets
from streamrec.kafka.topics import create_topics
from streamrec.settings import to_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

HERE = Path(__file__).parent


def test_a_failure_beyond_one_message_stops_the_worker_without_committing_past_it(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings()
    create_topics(settings.kafka, settings.topics)
    prod = producer(settings.kafka)
    topic = settings.topics.clicks
    values = [f"ok-{i}".encode() for i in range(300)]
    values[150] = b"boom"
    for value in values:
        prod.send(topic, key=b"u", value=value, partition=0)
    prod.flush()
    prod.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")} | to_env(settings)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent.parent), env.get("PYTHONPATH", "")])
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "failing_worker.py"), "worker", "-l", "info"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the worker went on after a failure that no message owns")
    text = log.read_text(errors="replace")
    assert code == EXIT_FAILURE, text[-2000:]
    assert "CRITICAL" in text and "no space left on device" in text
    # Let any commit in flight land, then check that none reached past the failing message.
    time.sleep(2)
    committed = committed_offsets(settings.kafka, settings.app_id, [topic]).get(TopicPartition(topic, 0), 0)
    assert committed <= 150, f"committed up to {committed}: the events behind the failure would be lost"
    crash = json.loads((settings.data_dir / "crash-ingest.json").read_text())
    assert crash["agent"] == "agent failing"
    assert crash["error"] == "OSError: no space left on device"
