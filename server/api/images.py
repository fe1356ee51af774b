"""``POST /v1/images/generations``: Together's image API (and the paths older SDKs send)."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .. import metrics
from ..errors import DarkroomError, InvalidRequest, PayloadTooLarge, QueueFull, ServiceUnavailable
from ..jobs import ClientGone, Job, JobResult
from ..lora_format import LOADERS
from ..loras import LoraStore
from ..params import GenerationParams
from ..queue.submit import run_job
from ..registry import ModelManifest
from .auth import check_api_key
from .conditioning import KontextSizing, attach_images
from .hosts import public_base
from .keys import ApiKey, authorize_model, bearer_token, charge
from .observe import request_id
from .runtime import Runtime
from .safety import resolve_check
from .schemas import ImageRequest, explicit_size, parse_request, resolve_params, response_kind

router = APIRouter()

# 3.x posts to /v1/images/generations, 1.x/2.x and openai append /images/generations to a base URL
# that usually ends in /v1; a 3.x client given such a base URL sends /v1/v1/...
PATHS = ("/v1/images/generations", "/images/generations", "/v1/v1/images/generations")


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body as JSON: 413 past ``max_bytes``, 400 for anything ``json.loads`` refuses (invalid
    UTF-8 or JSON, nesting too deep, an integer of more digits than Python converts)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > max_bytes):
        raise PayloadTooLarge(f"request body is larger than {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"request body is larger than {max_bytes} bytes")
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digits
        raise InvalidRequest(f"the request body is not valid JSON: {str(exc)[:200]}") from None


async def create_image(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    req = parse_request(await read_json(request, settings.server.max_body_bytes))
    manifest = runtime.registry.get(req.model)
    key = authorize_model(request, manifest)  # 403 for a model this API key may not use
    params = resolve_params(req, manifest, settings.limits, settings.loras)
    charged = await charge(request, key, params.n)  # the key's requests/images per minute: 429 when over
    kind = response_kind(req, settings.server.default_response_format)
    job: Job | None = None
    try:
        params = await _prepare(request, runtime, req, manifest, key, params)
        job = Job.create(params, settings.server.request_timeout_s)
        job.request_id = request_id(request)
        result = await run_job(runtime.queue, job, request.is_disconnected)
    except ClientGone:
        # Nobody is listening; 499 is what proxies log for it.
        return JSONResponse({}, status_code=499)
    except DarkroomError as exc:
        # Only admitted work counts against the key: not a request refused before its job was queued, nor
        # one the queue refused (full) or could not serve (503).
        if job is None or isinstance(exc, QueueFull) or exc.status == 503:
            await charged.refund()
        raise
    storage_started = time.monotonic()
    data = await run_in_threadpool(_data_items, runtime, request, result, kind)
    stages = dict(result.stages)
    if kind == "url":
        stages["storage"] = time.monotonic() - storage_started
        metrics.STAGE_SECONDS.labels(stage="storage", model=manifest.id).observe(stages["storage"])
    return JSONResponse({
        "id": job.id,
        "model": manifest.id,
        "object": "list",
        "created": job.created_unix,
        "data": data,
        "timings": {
            "queue_s": round(result.queue_s, 4),
            "inference_s": round(result.inference_s, 4),
            "encode_s": round(result.encode_s, 4),
        },
        # Seconds per stage: text_encode, denoise, vae_decode, safety (of the batch), image_encode, storage.
        "stages": {f"{stage}_s": round(seconds, 4) for stage, seconds in stages.items()},
        "batch": {"id": result.batch_id, "jobs": result.batch_jobs, "images": result.batch_images},
    })


async def _prepare(request: Request, runtime: Runtime, req: ImageRequest, manifest: ModelManifest,
                   key: ApiKey, params: GenerationParams) -> GenerationParams:
    """What runs before a job is queued: the prompt stage of the safety checker, then the request's images
    and LoRA files, fetched and checked (a bad URL or file is a 400 that costs no GPU work). Blocking work
    runs in the API's lanes (server/api/lanes.py), never in Starlette's shared threads."""
    settings = runtime.settings
    lanes = runtime.lanes
    assert lanes is not None
    guard = runtime.guard
    if resolve_check(settings.safety, manifest, req.disable_safety_checker,
                     bearer_token(request.headers.get("authorization")), guard.counters,
                     key_allows=key.disable_safety_checker):
        # A flagged prompt costs no GPU work. The classifier is not waited for: loading → 503 at once.
        if guard.needs_classifier:
            await lanes.classifier.run(guard.check, req.prompt)
        else:
            guard.check(req.prompt)
    else:
        params = dataclasses.replace(params, check_safety=False)
    if not runtime.accepting():
        raise ServiceUnavailable("no worker is able to run jobs; see /ready")
    bucket = key.bucket or key.name
    assert runtime.fetcher is not None
    kontext = KontextSizing(manifest, manifest.effective_limits(settings.limits), explicit_size(req))
    params = await attach_images(params, req.image_url, req.reference_images, runtime.fetcher, manifest,
                                 lanes, bucket, kontext)
    # LoRA files are fetched into the disk cache and checked here too, as the model's diffusers loader would
    # convert them (the worker fetches any it lacks).
    store, loader = runtime.lora_store, LOADERS.get(manifest.family)
    if params.loras and settings.loras.prefetch and store is not None:
        if any(_downloads(store, ref.path) for ref in params.loras):
            await lanes.downloads.run(store.prefetch, params.loras, loader, lane_key=bucket)
        else:  # all on this disk already: a few file checks, no download slot (nor the key's) taken
            await run_in_threadpool(store.prefetch, params.loras, loader)
    return params


def _downloads(store: LoraStore, path: str) -> bool:
    """Whether fetching the LoRA at ``path`` means a download (it is neither registered nor cached yet)."""
    return path not in store.settings.registered and not store.file_for(path).is_file()


def _data_items(runtime: Runtime, request: Request, result: JobResult, kind: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    base = public_base(request.scope, runtime.settings.server)
    now = time.time()
    for index, image in enumerate(result.images):
        item: dict[str, Any] = {"index": index, "type": kind, "seed": image.seed}
        if kind == "url":
            key = runtime.storage.put(image.data, image.format)
            item["url"] = runtime.storage.url(key, base, now)
        else:
            item["b64_json"] = base64.b64encode(image.data).decode("ascii")
        items.append(item)
    return items


for _path in PATHS:
    router.add_api_route(
        _path, create_image, methods=["POST"], dependencies=[Depends(check_api_key)],
        include_in_schema=_path == PATHS[0],
    )
