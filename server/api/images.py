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
from ..errors import InvalidRequest, PayloadTooLarge, ServiceUnavailable
from ..jobs import ClientGone, Job, JobResult
from ..lora_format import LOADERS
from ..queue.submit import run_job
from .auth import check_api_key
from .conditioning import attach_images
from .keys import authorize_model, bearer_token, charge
from .observe import request_id
from .runtime import Runtime
from .safety import resolve_check
from .schemas import parse_request, resolve_params, response_kind

router = APIRouter()

# 3.x posts to /v1/images/generations, 1.x/2.x and openai append /images/generations to a base URL
# that usually ends in /v1; a 3.x client given such a base URL sends /v1/v1/...
PATHS = ("/v1/images/generations", "/images/generations", "/v1/v1/images/generations")


async def read_json(request: Request, max_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


async def create_image(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    req = parse_request(await read_json(request, settings.server.max_body_bytes))
    manifest = runtime.registry.get(req.model)
    key = authorize_model(request, manifest)  # 403 for a model this API key may not use
    params = resolve_params(req, manifest, settings.limits, settings.loras)
    await charge(request, key, params.n)  # the key's requests/images per minute: 429 when over
    kind = response_kind(req, settings.server.default_response_format)
    guard = runtime.guard
    if resolve_check(settings.safety, manifest, req.disable_safety_checker,
                     bearer_token(request.headers.get("authorization")), guard.counters,
                     key_allows=key.disable_safety_checker):
        # The prompt stage runs here, before the job is queued: a flagged prompt costs no GPU work.
        if guard.needs_classifier:
            await run_in_threadpool(guard.check, req.prompt, settings.server.request_timeout_s)
        else:
            guard.check(req.prompt)
    else:
        params = dataclasses.replace(params, check_safety=False)
    if not runtime.accepting():
        raise ServiceUnavailable("no worker is able to run jobs; see /ready")
    # Conditioning images are fetched here, through the guarded fetcher: a bad URL is a 400 before
    # the job is queued.
    params = await attach_images(params, req.image_url, req.reference_images, runtime.fetcher, manifest)
    # LoRA files are fetched into the disk cache and checked here too, as the model's diffusers loader would
    # convert them (the worker fetches any it lacks).
    if params.loras and settings.loras.prefetch and runtime.lora_store is not None:
        await run_in_threadpool(runtime.lora_store.prefetch, params.loras, LOADERS.get(manifest.family))

    job = Job.create(params, settings.server.request_timeout_s)
    job.request_id = request_id(request)
    try:
        result = await run_job(runtime.queue, job, request.is_disconnected)
    except ClientGone:
        # Nobody is listening; 499 is what proxies log for it.
        return JSONResponse({}, status_code=499)
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


def _data_items(runtime: Runtime, request: Request, result: JobResult, kind: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    base = (runtime.settings.server.public_url or str(request.base_url)).rstrip("/")
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
