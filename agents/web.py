"""HTTP views: a user's history on the ingest worker; liveness and Prometheus metrics on every worker."""

from __future__ import annotations

from typing import Any

import faust
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agents.app import Streams
from streamrec.history import UserState
from streamrec.metrics import CONSUMER_LAG


def register_history(streams: Streams) -> None:
    app = streams.app

    @app.page("/users/{user_id}/history")
    @app.table_route(table=streams.histories, match_info="user_id")
    async def user_history(web: View, request: Request, user_id: str) -> Response:
        stored = streams.histories.get(user_id.encode())
        if not stored:
            return web.json({"error": f"unknown user {user_id!r}"}, status=404)
        state = UserState.from_bytes(stored)
        events: list[dict[str, Any]] = [e.model_dump(mode="json", exclude_none=True) for e in state.events]
        return web.json({"user_id": user_id, "events": events})


def register_common(app: faust.App) -> None:
    @app.page("/healthz")
    async def healthz(web: View, request: Request) -> Response:
        return web.json({"status": "ok"})

    @app.page("/metrics")
    async def metrics(web: View, request: Request) -> Response:
        update_lag(app)
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])


def update_lag(app: faust.App) -> None:
    """Consumer lag per topic from faust's monitor: end offset minus last offset read."""
    monitor: Any = app.monitor
    lag: dict[str, int] = {}
    for tp, end in dict(monitor.tp_end_offsets).items():
        read = monitor.tp_read_offsets.get(tp, -1)
        lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end - read - 1)
    for topic, value in lag.items():
        CONSUMER_LAG.labels(topic=topic).set(value)
