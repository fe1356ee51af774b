"""Operator pages: ``GET /metrics`` (Prometheus), ``GET /playground`` (a single static page) and ``GET /``
(browsers go to the playground; API clients get a JSON pointer to what is served)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import __version__, metrics

router = APIRouter()

PLAYGROUND = Path(__file__).resolve().parents[1] / "static" / "playground.html"


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    # Scrape-time collectors may ask Redis for the queue depth: off the event loop.
    body, content_type = await run_in_threadpool(metrics.exposition)
    return Response(body, media_type=content_type)


@router.get("/playground", include_in_schema=False)
async def playground() -> FileResponse:
    """No API key here: the page asks for one and sends it with its own requests."""
    return FileResponse(PLAYGROUND, media_type="text/html; charset=utf-8",
                        headers={"cache-control": "no-cache"})


@router.get("/", include_in_schema=False)
async def root(request: Request) -> Response:
    """A browser (``Accept: text/html``) is redirected (307) to the playground; any other caller gets a JSON
    object naming the endpoints, the playground and the API docs (``/docs``, ``/openapi.json``, when
    ``server.api_docs`` is on). No API key is needed: nothing here is more than the route names."""
    base = request.scope.get("root_path", "").rstrip("/")
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse(f"{base}/playground", status_code=307)
    body: dict[str, Any] = {
        "object": "darkroom",
        "version": __version__,
        "generate": f"POST {base}/v1/images/generations",
        "models": f"{base}/v1/models",
        "playground": f"{base}/playground",
    }
    if request.app.openapi_url:
        body["docs"] = f"{base}/docs"
        body["openapi"] = f"{base}{request.app.openapi_url}"
    return JSONResponse(body)
