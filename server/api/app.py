"""The FastAPI application, assembled from settings and a runtime.

``create_app(settings, runtime)`` is all a process or a test needs: ``darkroom serve`` / ``darkroom api``
(server/cli.py) hand it to uvicorn, and the in-process test tier drives it through Starlette's TestClient or
httpx's ASGI transport (tests/conftest.py ``make_app``). The runtime starts with the app's lifespan and stops
with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from .. import __version__, metrics
from ..config import Settings
from . import catalog, docs, edits, images, operator, service
from .errors import install_error_handlers
from .hosts import HostGuard
from .http import BodyGuard
from .methods import HeadAsGet, RefuseWebSockets
from .observe import ObserveMiddleware
from .runtime import Runtime

log = logging.getLogger(__name__)


def create_app(settings: Settings, runtime: Runtime) -> FastAPI:
    """The app serving ``runtime`` (``Runtime.build(settings, ...)``); the runtime starts when the app's
    lifespan does (uvicorn's start-up, or entering a TestClient) and stops when it ends."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.runtime = runtime
        app.state.started_unix = int(time.time())
        metrics.attach(metrics.RuntimeCollector(runtime))
        runtime.start()
        sweeper = asyncio.create_task(_sweep_storage(runtime))
        try:
            yield
        finally:
            sweeper.cancel()
            await run_in_threadpool(runtime.stop)
            await runtime.aclose()

    # /openapi.json and /docs (public, server.api_docs): server/api/docs.py.
    app = docs.make_app(settings, title="Darkroom", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(images.router)
    app.include_router(edits.router)
    app.include_router(catalog.router)
    app.include_router(service.router)
    app.include_router(operator.router)
    server = settings.server
    # Added last is outermost: the request log sees every answer, the host check's too.
    app.add_middleware(HeadAsGet)  # HEAD wherever GET is answered (server/api/methods.py)
    app.add_middleware(RefuseWebSockets)
    app.add_middleware(BodyGuard, read_timeout_s=server.body_read_timeout_s,
                       total_timeout_s=server.body_timeout_s)
    app.add_middleware(HostGuard, allowed=server.allowed_hosts)
    app.add_middleware(ObserveMiddleware)
    return app


async def _sweep_storage(runtime: Runtime) -> None:
    """Delete stored images past their retention, now and then."""
    while True:
        try:
            await run_in_threadpool(runtime.storage.cleanup)
        except Exception:  # noqa: BLE001 - a failed sweep is retried next time
            log.exception("storage cleanup failed")
        await asyncio.sleep(runtime.settings.storage.cleanup_interval_s)
