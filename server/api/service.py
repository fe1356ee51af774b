"""Everything besides generation: the model list, health, readiness, and stored images."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse

from ..errors import InvalidRequest
from .auth import check_api_key
from .keys import visible_models
from .runtime import Runtime
from .storage import MEDIA_TYPES

router = APIRouter()


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _model_card(runtime: Runtime, manifest: Any, created: int) -> dict[str, Any]:
    limits = manifest.effective_limits(runtime.settings.limits)
    return {
        "id": manifest.id,
        "object": "model",
        "created": created,
        "owned_by": manifest.owned_by,
        "type": "image",
        "description": manifest.description,
        "aliases": manifest.aliases,
        # The pipeline family: what image_url and reference_images mean here (README: Model families).
        "family": manifest.family,
        "capabilities": manifest.capabilities.model_dump(),
        "defaults": manifest.defaults.model_dump(),
        "limits": limits.model_dump(),
    }


@router.get("/v1/models", dependencies=[Depends(check_api_key)])
@router.get("/models", dependencies=[Depends(check_api_key)], include_in_schema=False)
async def list_models(request: Request) -> dict[str, Any]:
    runtime = _runtime(request)
    created = request.app.state.started_unix
    # A key limited to some models sees only those.
    models = visible_models(request, runtime.registry.models)
    return {"object": "list", "data": [_model_card(runtime, m, created) for m in models]}


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(check_api_key)])
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    runtime = _runtime(request)
    return _model_card(runtime, runtime.registry.get(model_id), request.app.state.started_unix)


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
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 12) or not signature:
        raise InvalidRequest("this URL needs its 'expires' (a unix time) and 'signature' parameters")
    path = _runtime(request).storage.open(key, int(expires), signature)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lstrip(".")])
