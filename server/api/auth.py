"""Bearer-key authentication, in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from ..errors import Unauthorized


def check_api_key(request: Request) -> None:
    """A FastAPI dependency: with keys configured, the request must carry one of them."""
    keys = request.app.state.runtime.settings.server.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing bearer API key (Authorization: Bearer <key>)")
    supplied = token.strip().encode()
    # Compare with every key, so the time taken does not tell which one nearly matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(supplied, key.get_secret_value().encode())
    if not matched:
        raise Unauthorized("invalid API key")
