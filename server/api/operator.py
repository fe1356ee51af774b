"""Operator pages: ``GET /metrics`` (Prometheus) and ``GET /playground`` (a single static page)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import metrics

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
