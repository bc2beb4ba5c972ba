"""The event-loop lag timer of the train worker: how late a 0.5 s timer fires is how long something
(an import, a step that should be in the training thread) held the loop, its heartbeats and /healthz."""

from __future__ import annotations

import time
from collections import deque

import faust

from streamrec.metrics import LOOP_LAG_SECONDS

TICK_S = 0.5


def register(app: faust.App) -> None:
    lags: deque[tuple[float, float]] = deque()  # (when, how late), over the last minute

    @app.timer(interval=TICK_S)  # type: ignore[untyped-decorator]
    async def loop_lag() -> None:
        now = time.monotonic()
        lags.append((now, max(0.0, now - lags[-1][0] - TICK_S) if lags else 0.0))
        while lags[0][0] < now - 60:
            lags.popleft()
        LOOP_LAG_SECONDS.set(max(lag for _, lag in lags))
