"""Everything besides generation and the model list (server/api/catalog.py): health, readiness, and stored
images."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from ..errors import InvalidRequest
from .runtime import Runtime
from .storage import MEDIA_TYPES

router = APIRouter()


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers. It never waits on a model or the queue."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    runtime = _runtime(request)
    is_ready, workers = runtime.readiness()
    return JSONResponse(
        {"ready": is_ready, "workers": workers, "queue_depth": runtime.queue.depth(),
         "pipeline_calls": runtime.pipeline_calls(), "safety": runtime.safety_report(),
         "compile": runtime.compile_report()},
        status_code=200 if is_ready else 503,
    )


@router.get("/v1/files/{key}")
async def stored_image(request: Request, key: str, expires: str = "", signature: str = "") -> FileResponse:
    """A stored image behind its signed URL (no API key: the signature is the credential).

    ``expires`` is a unix time in ASCII digits (``isdigit`` alone would pass "²", which ``int`` refuses, and a
    number too long for ``int`` to convert)."""
    if not expires or not signature:
        raise InvalidRequest("this URL needs its 'expires' (a unix time) and 'signature' parameters")
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
        raise InvalidRequest("'expires' must be an integer unix timestamp (ASCII digits, as the signed URL "
                             "gives it)", param="expires")
    path = _runtime(request).storage.open(key, int(expires), signature)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lstrip(".")])
