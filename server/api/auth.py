"""Bearer-key authentication: the key store (server/api/keys.py) decides who the caller is."""

from __future__ import annotations

from fastapi import Request

from .keys import authenticate


async def check_api_key(request: Request) -> None:
    """A FastAPI dependency: with keys configured, the request must carry one of them (401 otherwise).

    Keys are looked up by their SHA-256, so neither a key nor how nearly one matched shows in the timing.
    A coroutine: it runs on the event loop, never waiting for a thread of Starlette's shared pool.
    """
    authenticate(request)
