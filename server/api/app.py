"""The FastAPI application, assembled from settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from ..config import Settings
from .. import __version__, metrics
from . import docs, images, operator, service
from .errors import install_error_handlers
from .observe import ObserveMiddleware
from .runtime import Runtime

log = logging.getLogger(__name__)


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime or Runtime.build(settings)
        app.state.runtime = rt
        app.state.started_unix = int(time.time())
        metrics.attach(metrics.RuntimeCollector(rt))
        rt.start()
        sweeper = asyncio.create_task(_sweep_storage(rt))
        try:
            yield
        finally:
            sweeper.cancel()
            await run_in_threadpool(rt.stop)

    # /openapi.json and /docs (public, server.api_docs): server/api/docs.py.
    app = docs.make_app(settings, title="Darkroom", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(images.router)
    app.include_router(service.router)
    app.include_router(operator.router)
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
