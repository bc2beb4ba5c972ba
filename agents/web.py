"""HTTP views: a user's history on the ingest worker; liveness and Prometheus metrics on every worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import faust
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agents.app import IngestStreams
from agents.supervision import Supervisor
from streamrec.access import authorized
from streamrec.history import UserState
from streamrec.metrics import CONSUMER_LAG


def register_history(streams: IngestStreams) -> None:
    app = streams.app
    token = streams.settings.web_token

    async def owned_history(web: View, request: Request, user_id: str) -> Response:
        stored = streams.histories.get(user_id.encode())
        if not stored:
            return web.json({"error": f"unknown user {user_id!r}"}, status=404)
        state = UserState.from_bytes(stored)
        events: list[dict[str, Any]] = [e.model_dump(mode="json", exclude_none=True) for e in state.events]
        return web.json({"user_id": user_id, "events": events})

    # Forwards to the worker that owns the user's partition; faust's router passes the request's headers
    # on, so that worker checks the same token again.
    routed: Callable[..., Awaitable[Response]] = app.table_route(table=streams.histories, match_info="user_id")(
        owned_history
    )

    @app.page("/users/{user_id}/history")
    async def user_history(web: View, request: Request, user_id: str) -> Response:
        # Checked before routing: a refused request is never forwarded.
        if not authorized(request.headers.get("Authorization"), token):
            return web.json(
                {"error": "missing or wrong bearer token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="streamrec"'},
            )
        return await routed(web, request, user_id)


def register_common(app: faust.App, supervisor: Supervisor) -> None:
    previous_crash = supervisor.previous_crash()

    @app.page("/healthz")
    async def healthz(web: View, request: Request) -> Response:
        # A worker whose agent fails beyond one message exits (agents.supervision): while it answers,
        # its agents run. The restarted worker says why its predecessor stopped.
        return web.json({"status": "ok", "previous_crash": previous_crash})

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
