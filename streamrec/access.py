"""Who may read a user's history over HTTP: the bearer-token rule of the ingest worker's history
view. Pure: the view asks before it routes, so a refused request is never forwarded."""

from __future__ import annotations

import hmac

from pydantic import SecretStr


def authorized(header: str | None, token: SecretStr | None) -> bool:
    """Whether a request with this Authorization header may read a history: any request when no token
    is configured, else `Bearer <token>` only (compared in constant time). An empty token admits nobody."""
    if token is None:
        return True
    expected = token.get_secret_value().encode()
    scheme, _, given = (header or "").strip().partition(" ")
    return bool(expected) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)
