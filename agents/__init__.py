"""The faust app and its agents: each module reads a topic, calls the pure core, writes a table
or a topic; logic that decides anything lives in streamrec/. `create_app` wires a role's agents,
timers and views onto the app that agents.app builds (which imports none of them)."""

from __future__ import annotations

from collections.abc import Callable

import faust

from agents import catalog, feedback, infer, ingest, loop_lag, trainer, web
from agents.app import ROLES, Worker, infer_streams, ingest_streams, train_streams
from streamrec.settings import Settings


def ingest_worker(settings: Settings) -> Worker:
    streams = ingest_streams(settings)
    ingest.register(streams)
    catalog.register(streams)
    web.register_history(streams)
    return streams


def infer_worker(settings: Settings) -> Worker:
    streams = infer_streams(settings)
    infer.register(streams)
    return streams


def train_worker(settings: Settings) -> Worker:
    streams = train_streams(settings)
    feedback.register(streams)
    trainer.register(streams)
    loop_lag.register(streams.app)
    return streams


WORKERS: dict[str, Callable[[Settings], Worker]] = {
    "ingest": ingest_worker,
    "infer": infer_worker,
    "train": train_worker,
}


def create_app(settings: Settings, role: str) -> faust.App:
    """The faust app of `role` with its agents and web views registered."""
    if role not in WORKERS:
        raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLES)}")
    worker = WORKERS[role](settings)
    web.register_common(worker.app, worker.supervisor)
    return worker.app
