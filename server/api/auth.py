"""Bearer-key authentication: the key store (server/api/keys.py) decides who the caller is."""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from .keys import KeyStore, authenticate


async def check_api_key(request: Request) -> None:
    """A FastAPI dependency: with keys configured, the request must carry one of them (401 otherwise).

    Keys are looked up by their SHA-256, so neither a key nor how nearly one matched shows in the timing.
    The lookup is a dictionary read, done on the event loop (no hop to a thread and back per request); only a
    due re-read of ``auth.keys_file`` runs in a thread.
    """
    store: KeyStore = request.app.state.runtime.keys
    if store.reload_due:
        await run_in_threadpool(authenticate, request)
    else:
        authenticate(request)
