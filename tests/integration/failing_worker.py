"""A worker whose agent fails on something no message owns (run by test_supervision as a child
process): every message is processed, except that b"boom" raises, as a broken disk would."""

from __future__ import annotations

import faust

from agents.app import faust_app
from agents.internals import on_agent_error
from agents.supervision import Supervisor
from streamrec.settings import Settings

settings = Settings()
app = faust_app(settings, "ingest")
supervisor = Supervisor(settings, "ingest")
on_agent_error(app, supervisor.on_agent_error)
source = app.topic(settings.topics.clicks, key_type=bytes, value_type=bytes)


@app.agent(source, name="failing")
async def failing(stream: faust.StreamT[bytes]) -> None:
    assert isinstance(stream, faust.Stream)
    async for events in stream.take_events(100, within=0.05):
        for event in events:
            if event.message.value == b"boom":
                raise OSError("no space left on device")


if __name__ == "__main__":
    faust.Worker(app, loglevel="info").execute_from_commandline()
