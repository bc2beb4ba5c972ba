"""What every agent does with a failure. A failure owned by one message sends that message to the
dead-letter topic with the reason, and the agent goes on. Any other failure (the broker, the disk,
a bug) stops the worker at once, loudly, before faust can acknowledge the events buffered behind
it: faust would otherwise restart the agent and commit past them, losing them silently."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Awaitable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import faust

from streamrec.errors import InvalidMessage
from streamrec.events import DeadLetter, utcnow
from streamrec.metrics import EVENTS_REJECTED, LAST_CRASH
from streamrec.settings import Settings

log = logging.getLogger(__name__)

EXIT_FAILURE = 70  # EX_SOFTWARE: a supervisor (Kubernetes, compose, systemd) restarts the worker


def describe(exc: BaseException) -> str:
    """The reason a dead letter carries: our own validation messages as they are, anything else with
    the exception's type, so an operator can tell a contract violation from a bug."""
    return str(exc) if isinstance(exc, InvalidMessage) else f"{type(exc).__name__}: {exc}"


async def dead_letter(
    dlq: faust.TopicT, settings: Settings, message: faust.types.Message, exc: BaseException | str
) -> None:
    """Send `message` to the dead-letter topic with the reason, cut to what the producer can send."""
    error = exc if isinstance(exc, str) else describe(exc)
    letter = DeadLetter.of(
        message.value,
        message.key,
        error,
        message.topic,
        message.partition,
        message.offset,
        max_raw=settings.contract.dead_letter_raw_bytes,
    )
    log.warning("dead letter %s[%d]@%d: %s", message.topic, message.partition, message.offset, letter.error[:300])
    EVENTS_REJECTED.labels(topic=message.topic).inc()
    await dlq.send(key=letter.key_bytes, value=letter.model_dump_json().encode())


def crash_file(settings: Settings, role: str) -> Path:
    return settings.data_dir / f"crash-{role}.json"


class Supervisor:
    """One per worker process: the `on_error` of every agent and the guard of every background task."""

    def __init__(self, settings: Settings, role: str) -> None:
        self.settings, self.role = settings, role
        crash = self.previous_crash()
        if crash is not None:
            log.warning("the previous %s worker stopped on a failure: %s", role, crash)
            with contextlib.suppress(ValueError, TypeError):
                LAST_CRASH.labels(agent=str(crash["agent"])).set(datetime.fromisoformat(crash["at"]).timestamp())

    def stop_worker(self, where: str, exc: BaseException) -> NoReturn:
        """Record the failure, say it loudly and exit without another await: no acknowledgement or
        commit can happen after this, so a restart reads from the last commit, and every table value
        written so far carries its own dedup memory (a replayed event is recognised)."""
        record = {"role": self.role, "agent": where, "error": describe(exc), "at": utcnow().isoformat()}
        try:
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
            crash_file(self.settings, self.role).write_text(json.dumps(record))
        except OSError:
            pass  # the disk may be what failed; the log line below still says it
        text = "".join(traceback.format_exception(exc))
        log.critical(
            "%s crashed on a failure not owned by one message; stopping the worker (exit %d) without committing "
            "past the events in flight. A restart resumes from the last commit.\n%s",
            where,
            EXIT_FAILURE,
            text,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_FAILURE)

    async def on_agent_error(self, agent: Any, exc: BaseException) -> None:
        """faust's per-agent error hook: runs before faust marks the actor dead and restarts it."""
        self.stop_worker(f"agent {getattr(agent, 'name', agent)}", exc)

    async def guard(self, name: str, task: Awaitable[None]) -> None:
        """Run a background task (a topic mirror) whose death would leave the worker serving stale data."""
        try:
            await task
        except Exception as exc:
            self.stop_worker(name, exc)

    def previous_crash(self) -> dict[str, Any] | None:
        """The last crash of this role's worker, from its data directory (shown on /healthz)."""
        try:
            data = json.loads(crash_file(self.settings, self.role).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and {"agent", "at"} <= data.keys() else None
