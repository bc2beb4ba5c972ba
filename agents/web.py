"""HTTP views on the ingest worker: a user's history, and liveness."""

from __future__ import annotations

from typing import Any

from faust.web import Request, Response, View

from agents.app import Streams
from streamrec.history import UserState


def register(streams: Streams) -> None:
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

    @app.page("/healthz")
    async def healthz(web: View, request: Request) -> Response:
        return web.json({"status": "ok"})
