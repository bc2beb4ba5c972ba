"""Consumer-group progress, read without joining the group: the offsets a group has committed,
and waiting until it has committed everything that was produced."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable, Mapping
from typing import Any

from streamrec.errors import StreamrecError
from streamrec.kafka.clients import consumer
from streamrec.settings import KafkaSettings


def committed_offsets(kafka: KafkaSettings, group: str, topics: Iterable[str]) -> dict[Any, int]:
    """The offsets consumer group `group` has committed, per partition of `topics` (0 if none)."""
    from kafka import TopicPartition

    # committed() asks the group coordinator without joining the group, so it disturbs nobody.
    reader = consumer(kafka, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(reader.partitions_for_topic(t) or ())]
        return {tp: reader.committed(tp) or 0 for tp in tps}
    finally:
        reader.close()


def wait_caught_up(
    kafka: KafkaSettings,
    group: str,
    ends: Mapping[Any, int],
    timeout: float = 120.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> float:
    """Block until `group` has committed up to `ends` (TopicPartition -> next offset, e.g. from the
    producer's acknowledgements); returns the seconds waited. Fails early if `proc`, the worker
    expected to commit, exits.

    Take `ends` from what was produced rather than from the broker: the embedded broker reports a
    high watermark that can trail the real end of a partition (see topics.seal_partitions)."""
    topics = {tp.topic for tp in ends}
    start = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise StreamrecError(f"worker exited with code {proc.returncode} while catching up")
        committed = committed_offsets(kafka, group, topics)
        lag = sum(max(0, end - committed.get(tp, 0)) for tp, end in ends.items())
        if lag == 0:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise StreamrecError(f"group {group} still {lag} messages behind after {timeout:.0f}s")
        time.sleep(0.25)


def end_offsets(kafka: KafkaSettings, topics: Iterable[str]) -> dict[Any, int]:
    """The broker's end offset of every partition of `topics` (the embedded broker's may trail the
    last records a little: see topics.seal_partitions)."""
    from kafka import TopicPartition

    reader = consumer(kafka, enable_auto_commit=False)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(reader.partitions_for_topic(t) or ())]
        return dict(reader.end_offsets(tps))
    finally:
        reader.close()


def group_lag(kafka: KafkaSettings, group: str, ends: Mapping[Any, int]) -> int:
    """Messages of `ends` (TopicPartition -> next offset) that `group` has not committed yet."""
    committed = committed_offsets(kafka, group, {tp.topic for tp in ends})
    return sum(max(0, end - committed.get(tp, 0)) for tp, end in ends.items())
