"""The faust floor of the ingest benchmark: a bare faust agent, configured like the ingest worker
and batching like it, that only decodes and validates each event (no table, no output). Its rate is
what faust itself allows on this broker; run as `python -m streamrec.lab.bench.floor COUNT OUT`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import faust

from agents.app import faust_app
from streamrec.events import Event, parse
from streamrec.settings import load_settings


def build(count: int, out: Path) -> faust.App:
    settings = load_settings()
    app = faust_app(settings, "ingest")
    topics = app.topic(settings.topics.clicks, settings.topics.purchases, key_type=bytes, value_type=bytes)
    batching = settings.ingest

    @app.agent(topics, name="floor")
    async def floor(stream: faust.StreamT[bytes]) -> None:
        assert isinstance(stream, faust.Stream)
        seen, first, cpu_first = 0, 0.0, 0.0
        async for events in stream.take_events(batching.batch_size, within=batching.batch_within_s):
            if not first:
                first, cpu_first = time.time(), time.process_time()
            for raw in events:
                parse(Event, raw.message.value)
            seen += len(events)
            if seen >= count:
                # Written once, atomically: the benchmark waits for this file, then stops the worker.
                tmp = out.with_suffix(".tmp")
                cpu = time.process_time() - cpu_first
                tmp.write_text(json.dumps({"events": seen, "first": first, "last": time.time(), "cpu_s": cpu}))
                tmp.replace(out)

    return app


def main() -> None:
    count, out = int(sys.argv[1]), Path(sys.argv[2])
    faust.Worker(build(count, out), loglevel="warning").execute_from_commandline()


if __name__ == "__main__":
    main()
