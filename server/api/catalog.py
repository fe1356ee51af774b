"""The model list, in the shape each client parses.

Which client asks, and what it needs (read from the installed clients):

- openai (``client.models.list()``: ``GET {base}/models``) parses ``{"object": "list", "data": [...]}``.
- together 1.x (``client.models.list()``: ``GET {base}/models``, ``resources/models.py``) asserts that the
  body *is* a list (Together's own API answers a bare JSON array) and builds a ``ModelObject`` from each
  item, which needs ``id``, ``object: "model"`` and ``pricing``.
- together 3.x (``client.models.list()``, ``resources/models/models.py``) calls
  ``GET /v2/projects/{project_id}/models`` (the client needs a ``project_id``: ``Together(project_id=...)``
  or ``TOGETHER_PROJECT_ID``; any value works here) and parses ``{"data": [Model], "next_cursor"}``;
  ``client.models.list_supported()`` calls ``GET /v2/supported-models`` (no project needed).

``/v1/models`` and ``/models`` are shared by openai, together 1.x and plain HTTP callers. The discriminator is
the ``X-Together-Client-User-Agent`` header, which together 1.x's requestor adds to every request
(``utils/api_helpers.py get_headers``) and no other client sends (together 3.x and openai are Stainless
clients: ``X-Stainless-*`` headers), or a ``User-Agent`` starting ``Together/v1 PythonBindings``. Those get
Together's bare array; everyone else, generic OpenAI-compatible callers included, the OpenAI list.
``?format=together`` / ``?format=openai`` choose explicitly.

Every model object carries both vocabularies (Together's ``type``, ``display_name``, ``organization``,
``pricing``; OpenAI's ``owned_by``) plus Darkroom's ``aliases``, ``capabilities``, ``defaults`` and
``limits``: extra keys are harmless to every client.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ..errors import InvalidRequest, ModelNotFound
from ..registry import ModelManifest
from .auth import check_api_key
from .keys import api_key_of, visible_models
from .runtime import Runtime

router = APIRouter()

TOGETHER_V1_HEADER = "x-together-client-user-agent"
TOGETHER_V1_AGENT = "Together/v1 PythonBindings"
_FREE = {"input": 0.0, "output": 0.0, "hourly": 0.0, "base": 0.0, "finetune": 0.0}


def wants_bare_list(request: Request) -> bool:
    """Whether ``/v1/models`` answers Together's bare array (together 1.x) rather than OpenAI's list."""
    chosen = request.query_params.get("format")
    if chosen in ("together", "openai"):
        return chosen == "together"
    if chosen is not None:
        raise InvalidRequest("'format' must be 'together' or 'openai'", param="format")
    agent = request.headers.get("user-agent", "")
    return TOGETHER_V1_HEADER in request.headers or agent.startswith(TOGETHER_V1_AGENT)


def model_card(runtime: Runtime, manifest: ModelManifest, created: int) -> dict[str, Any]:
    """One model, as OpenAI's and Together's ``/v1/models`` items both read it."""
    limits = manifest.effective_limits(runtime.settings.limits)
    hub = manifest.source.hub
    return {
        "id": manifest.id,
        "object": "model",
        "created": created,
        "owned_by": manifest.owned_by,
        "type": "image",
        "display_name": manifest.description or manifest.id,
        "description": manifest.description,
        "organization": manifest.owned_by,
        "link": f"https://huggingface.co/{hub}" if hub else None,
        "license": None,
        "context_length": None,
        "pricing": dict(_FREE),
        "aliases": runtime.registry.names(manifest),
        # The pipeline family: what image_url and reference_images mean here (docs/models.md).
        "family": manifest.family,
        "capabilities": manifest.capabilities.model_dump(),
        "defaults": manifest.defaults.model_dump(),
        "limits": limits.model_dump(),
    }


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _visible(request: Request) -> list[ModelManifest]:
    """The served models this caller's key may use (a key limited to some models sees only those)."""
    return visible_models(request, _runtime(request).registry.models)


def _created(request: Request) -> int:
    return int(request.app.state.started_unix)


def _lookup(request: Request, model_id: str) -> ModelManifest:
    """The served model named ``model_id`` (an id or alias) that this key may use; 404 otherwise."""
    manifest = _runtime(request).registry.get(model_id, api_key_of(request).may_use)
    if manifest not in _visible(request):  # as if it were not served: no hint what another key may use
        raise ModelNotFound(f"model {model_id!r} is not served here", param="model")
    return manifest


@router.get("/v1/models", dependencies=[Depends(check_api_key)])
@router.get("/models", dependencies=[Depends(check_api_key)], include_in_schema=False)
async def list_models(request: Request) -> JSONResponse:
    runtime, created = _runtime(request), _created(request)
    cards = [model_card(runtime, m, created) for m in _visible(request)]
    return JSONResponse(cards if wants_bare_list(request) else {"object": "list", "data": cards})


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(check_api_key)])
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    return model_card(_runtime(request), _lookup(request, model_id), _created(request))


# -- together 3.x ------------------------------------------------------------------------------------


def project_model(runtime: Runtime, manifest: ModelManifest, project_id: str, created: int) -> dict[str, Any]:
    """together 3.x's ``Model`` (``types/model.py``), plus the card's keys."""
    return {
        **model_card(runtime, manifest, created),
        "name": manifest.id,
        "organizationId": manifest.owned_by,
        "projectId": project_id,
        "visibility": "VISIBILITY_INTERNAL",
        "weights": {"architecture": manifest.family, "type": "WEIGHTS_TYPE_DEFAULT"},
        "description": manifest.description,
    }


def supported_model(runtime: Runtime, manifest: ModelManifest, created: int) -> dict[str, Any]:
    """together 3.x's ``SupportedModel`` (``types/supported_model.py``), plus the card's keys."""
    caps = manifest.capabilities
    started = dt.datetime.fromtimestamp(created, dt.timezone.utc).isoformat()
    inputs = ["MODALITY_TEXT"] + (["MODALITY_IMAGE"] if caps.image_to_image or caps.reference_images else [])
    return {
        **model_card(runtime, manifest, created),
        "baseModel": "", "baseModelId": "",
        "capabilities": ["CAPABILITY_IMAGE_GENERATION"],
        "createdAt": started, "updatedAt": started,
        "deploymentProfiles": [],
        "displayName": manifest.description or manifest.id,
        "displayType": "image",
        "inputModalities": inputs,
        "outputModalities": ["MODALITY_IMAGE"],
        "name": manifest.id,
        "products": ["PRODUCT_SERVERLESS"],
        "publisher": manifest.owned_by,
        "status": "SUPPORTED_MODEL_STATUS_SUPPORTED",
        "description": manifest.description,
        "darkroom_capabilities": caps.model_dump(),
    }


def _page(items: list[dict[str, Any]], request: Request) -> dict[str, Any]:
    """Cursor pagination as together 3.x follows it: ``after`` (an id) and ``limit``; ``next_cursor``."""
    after, limit = request.query_params.get("after"), request.query_params.get("limit")
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    if limit is not None:
        if not limit.isascii() or not limit.isdigit() or not 1 <= int(limit) <= 1000:
            raise InvalidRequest("'limit' must be an integer from 1 to 1000", param="limit")
        if len(items) > int(limit):
            items = items[:int(limit)]
            return {"data": items, "next_cursor": items[-1]["id"]}
    return {"data": items, "next_cursor": None}


@router.get("/v2/projects/{project_id}/models", dependencies=[Depends(check_api_key)])
async def list_project_models(request: Request, project_id: str) -> dict[str, Any]:
    runtime = _runtime(request)
    created = _created(request)
    return _page([project_model(runtime, m, project_id, created) for m in _visible(request)], request)


@router.get("/v2/projects/{project_id}/models/{model_id:path}", dependencies=[Depends(check_api_key)])
async def get_project_model(request: Request, project_id: str, model_id: str) -> dict[str, Any]:
    return project_model(_runtime(request), _lookup(request, model_id), project_id, _created(request))


@router.get("/v2/supported-models", dependencies=[Depends(check_api_key)])
async def list_supported_models(request: Request) -> dict[str, Any]:
    runtime = _runtime(request)
    models = [supported_model(runtime, m, _created(request)) for m in _visible(request)]
    search = request.query_params.get("search", "").lower()
    modality = request.query_params.get("modality")
    models = [m for m in models if (not search or search in (m["id"] + " " + m["description"]).lower())
              and (not modality or modality in m["inputModalities"])]
    return _page(models, request)


@router.get("/v2/supported-models/{model_id:path}", dependencies=[Depends(check_api_key)])
async def get_supported_model(request: Request, model_id: str) -> dict[str, Any]:
    return supported_model(_runtime(request), _lookup(request, model_id), _created(request))
