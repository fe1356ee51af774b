"""``POST /v1/images/generations``: Together's image API (and the paths older SDKs send)."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import metrics
from ..errors import (
    DarkroomError,
    Forbidden,
    InvalidRequest,
    PayloadTooLarge,
    QueueFull,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from ..fetch import declared_length
from ..jobs import ClientGone, Job, JobResult
from ..lora_format import LOADERS
from ..params import GenerationParams
from ..queue.submit import await_job
from ..registry import ModelLimits, ModelManifest
from .auth import check_api_key
from .conditioning import KontextSizing, attach_images
from .extras import Extras, resolve_extras
from .hosts import public_base
from .keys import ApiKey, authorize_model, bearer_token, charge, requested_model
from .observe import request_id
from .runtime import Runtime
from .safety import resolve_check
from .schemas import (
    ImageRequest,
    input_image,
    names_size,
    parse_request,
    resolve_params,
    response_kind,
    with_size,
)
from .sizing import MATCH_INPUT, resolve_size

log = logging.getLogger(__name__)
router = APIRouter()

# 3.x posts to /v1/images/generations, 1.x/2.x and openai append /images/generations to a base URL
# that usually ends in /v1; a 3.x client given such a base URL sends /v1/v1/...
PATHS = ("/v1/images/generations", "/images/generations", "/v1/v1/images/generations")


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body as JSON: 413 past ``max_bytes``, 400 for anything ``json.loads`` refuses (invalid
    UTF-8 or JSON, nesting too deep, an integer of more digits than Python converts)."""
    declared = declared_length(request.headers)
    if declared is not None and declared > max_bytes:
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


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Where a request's images come from: the input image (``image_url``, together 1.x's ``image_base64``
    or an edit's first ``image``) and the references, with the field names errors give them."""

    image_url: str | None = None
    image_field: str = "image_url"
    references: list[str] | None = None
    # One name per URL (the input image first); None: image_field, then reference_images[i].
    fields: list[str] | None = None

    def names(self) -> list[str]:
        """The field name of each URL, the input image first (for errors)."""
        if self.fields is not None:
            return self.fields
        return (([self.image_field] if self.image_url else [])
                + [f"reference_images[{i}]" for i in range(len(self.references or []))])


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON (``application/json`` or ``application/*+json``), as every SDK
    sends it. A browser may post ``text/plain``, a form or multipart to another site without a CORS
    preflight; none of those reach the generation path."""
    declared = request.headers.get("content-type")
    media = declared.split(";", 1)[0].strip().lower() if declared else ""
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    shown = ascii(media)[1:-1][:100] if media else "none"
    raise UnsupportedMediaType(
        f"the request body must be JSON, sent with 'Content-Type: application/json' (got {shown})")


def body_size(request: Request, max_bytes: int) -> int:
    """What a request's body may hold in memory: its declared ``Content-Length``, or ``max_bytes`` when it
    declares none (chunked) or more (then it is refused with 413 before anything is read)."""
    declared = declared_length(request.headers)
    return max_bytes if declared is None else min(declared, max_bytes)


async def create_image(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    require_json(request)
    assert runtime.lanes is not None
    max_bytes = runtime.settings.server.max_body_bytes
    # The body (and the data: URLs it may carry) stays in memory until the answer: it counts against the
    # server-wide budget of body bytes from before it is read (server.max_inflight_body_bytes).
    async with runtime.lanes.bodies.hold(body_size(request, max_bytes)):
        req = parse_request(await read_json(request, max_bytes))
        image_url, field = input_image(req)
        return await generate(request, req, Inputs(image_url=image_url, image_field=field,
                                                   references=req.reference_images))


def _note_extras(request: Request, extras: Extras) -> None:
    """The SDK fields that only reach the logs: ``user`` on the request's line, ignored fields on one line."""
    if extras.user:
        request.state.user = ascii(extras.user)[1:-1]
    if extras.ignored:
        rid = request_id(request)
        log.info("request fields ignored request_id=%s fields=%s", rid, ",".join(extras.ignored),
                 extra={"fields": {"request_id": rid, "ignored": list(extras.ignored)}})


async def generate(request: Request, req: ImageRequest, inputs: Inputs,
                   default_model: ModelManifest | None = None) -> Response:
    """Run one validated request (``POST /v1/images/generations`` or ``/v1/images/edits``) and answer it."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    started = time.perf_counter()
    job: Job | None = None
    # Until its job is queued (or refused), a request is "arriving": a batch being filled waits for it.
    with runtime.queue.arriving():
        manifest = default_model if default_model is not None and not req.model else (
            requested_model(request, req.model or None))
        if manifest is None:
            raise Forbidden("this API key may not use any model served here", param="model",
                            code="model_not_allowed")
        key = authorize_model(request, manifest)  # 403 for a model this API key may not use
        params = resolve_params(req, manifest, settings.limits, settings.loras,
                                image_url=inputs.image_url, image_field=inputs.image_field)
        extras = resolve_extras(req, params.output_format, req.unknown_fields())
        params = dataclasses.replace(params, output_quality=extras.output_quality)
        _note_extras(request, extras)
        parsed = time.perf_counter()
        charged = await charge(request, key, params.n)  # the key's requests/images per minute: 429 when over
        kind = response_kind(req, settings.server.default_response_format)
        try:
            params = await _prepare(request, runtime, req, manifest, key, params, inputs)
            job = Job.create(params, settings.server.request_timeout_s)
            job.request_id = request_id(request)
            await runtime.queue.admit(job)
        except DarkroomError:
            # Only admitted work counts against the key: not a request refused before its job was queued,
            # nor one the queue refused (full) or could not serve (503).
            await charged.refund()
            raise
        admitted = time.perf_counter()
    try:
        result = await await_job(runtime.queue, job, request.is_disconnected)
    except ClientGone:
        # Nobody is listening; 499 is what proxies log for it.
        return JSONResponse({}, status_code=499)
    except DarkroomError as exc:
        if isinstance(exc, QueueFull) or exc.status == 503:
            await charged.refund()
        raise
    answered = time.perf_counter()
    head = {
        "id": job.id,
        # The id the client asked for (an alias included), as Together echoes it.
        "model": req.model or manifest.id,
        "object": "list",
        "created": job.created_unix,
        "timings": {
            "queue_s": round(result.queue_s, 4),
            "inference_s": round(result.inference_s, 4),
            "encode_s": round(result.encode_s, 4),
        },
        "batch": {"id": result.batch_id, "jobs": result.batch_jobs, "images": result.batch_images},
    }
    stages = dict(result.stages)
    if kind == "url":
        storage_started = time.monotonic()
        items = await run_in_threadpool(_url_items, runtime, request, result)
        stages["storage"] = time.monotonic() - storage_started
        metrics.STAGE_SECONDS.labels(stage="storage", model=manifest.id).observe(stages["storage"])
        head["stages"] = _stages(stages)
        body, b64_s, json_s = render_body(head, items, []), 0.0, 0.0
    else:
        head["stages"] = _stages(stages)
        # Base64 and the body of a large answer are made off the event loop, so other requests go on.
        if sum(len(image.data) for image in result.images) > INLINE_BASE64_BYTES:
            body, b64_s, json_s = await run_in_threadpool(_b64_body, head, result)
        else:
            body, b64_s, json_s = _b64_body(head, result)
    timing = {"parse": parsed - started, "admit": admitted - parsed, "queue": result.queue_s,
              "inference": result.inference_s, "safety": result.stages.get("safety", 0.0),
              "encode": result.encode_s, "wait": answered - admitted,
              "b64": b64_s, "json": json_s, "total": time.perf_counter() - started}
    return Response(body, media_type="application/json", headers={"server-timing": server_timing(timing)})


async def _prepare(request: Request, runtime: Runtime, req: ImageRequest, manifest: ModelManifest,
                   key: ApiKey, params: GenerationParams, inputs: Inputs) -> GenerationParams:
    """What runs before a job is queued: the prompt stage of the safety checker, then the request's images
    and LoRA files, fetched and checked (a bad URL or file is a 400 that costs no GPU work; aspect_ratio
    "match_input_image" sizes the output once the input image is decoded). Blocking work runs in the API's
    lanes (server/api/lanes.py), never in Starlette's shared threads."""
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
    limits = manifest.effective_limits(settings.limits)
    params = await attach_images(params, inputs.image_url, inputs.references, runtime.fetcher, manifest,
                                 lanes, bucket, fields=inputs.names(),
                                 match_input=_matcher(req, manifest, params, limits),
                                 kontext=KontextSizing(manifest, limits, names_size(req)))
    # LoRA files are fetched into the disk cache and checked here too, as the model's diffusers loader would
    # convert them (the worker fetches any it lacks).
    store, loader = runtime.lora_store, LOADERS.get(manifest.family)
    if params.loras and settings.loras.prefetch and store is not None:
        if not all(store.on_disk(ref.path) for ref in params.loras):
            await lanes.downloads.run(store.prefetch, params.loras, loader, lane_key=bucket)
        else:  # all on this disk already: a few file checks, no download slot (nor the key's) taken
            await run_in_threadpool(store.prefetch, params.loras, loader)
    return params


def _matcher(req: ImageRequest, manifest: ModelManifest, params: GenerationParams,
             limits: ModelLimits) -> Callable[[int, int], GenerationParams] | None:
    """For ``aspect_ratio: match_input_image``: the params sized from the input image's width x height,
    within the model's effective ``limits``."""
    if req.aspect_ratio != MATCH_INPUT:
        return None

    def sized(width: int, height: int) -> GenerationParams:
        return with_size(params, resolve_size(req.width, req.height, req.size, req.aspect_ratio, manifest,
                                              limits, (width, height)))

    return sized


# Answers with at most this many image bytes are base64-encoded on the event loop (well under a millisecond).
INLINE_BASE64_BYTES = 256 * 1024


def _stages(stages: dict[str, float]) -> dict[str, float]:
    # Seconds per stage: text_encode, denoise, vae_decode, safety (of the batch), image_encode, storage.
    return {f"{stage}_s": round(seconds, 4) for stage, seconds in stages.items()}


def _url_items(runtime: Runtime, request: Request, result: JobResult) -> list[dict[str, Any]]:
    base = public_base(request.scope, runtime.settings.server)
    now = time.time()
    items: list[dict[str, Any]] = []
    for index, image in enumerate(result.images):
        key = runtime.storage.put(image.data, image.format)
        items.append({"index": index, "type": "url", "seed": image.seed,
                      "url": runtime.storage.url(key, base, now)})
    return items


def _b64_body(head: dict[str, Any], result: JobResult) -> tuple[bytes, float, float]:
    """The body with every image as ``b64_json``; (body, base64 seconds, rendering seconds)."""
    started = time.perf_counter()
    encoded = [base64.b64encode(image.data) for image in result.images]
    b64_done = time.perf_counter()
    items = [{"index": index, "type": "b64_json", "seed": image.seed}
             for index, image in enumerate(result.images)]
    body = render_body(head, items, encoded)
    return body, b64_done - started, time.perf_counter() - b64_done


def render_body(head: dict[str, Any], items: list[dict[str, Any]], b64: list[bytes]) -> bytes:
    """``{**head, "data": items}`` as JSON bytes, with ``b64[i]`` as item i's ``b64_json`` (when given).

    One encoding pass: the small fields go through ``json.dumps``; the base64 text (ASCII, nothing to escape)
    is placed in the body as it is, never scanned, decoded to ``str`` or copied but once, into the body.
    """
    parts = [json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1].encode(), b',"data":[']
    for index, item in enumerate(items):
        if index:
            parts.append(b",")
        item_json = json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode()
        if index < len(b64):
            parts += [item_json[:-1], b',"b64_json":"', b64[index], b'"}']
        else:
            parts.append(item_json)
    parts.append(b"]}")
    return b"".join(parts)


def server_timing(seconds: dict[str, float]) -> str:
    """The W3C ``Server-Timing`` header: each stage's milliseconds (benchmarks split the overhead with it)."""
    return ", ".join(f"{name};dur={value * 1000:.2f}" for name, value in seconds.items())


for _path in PATHS:
    router.add_api_route(
        _path, create_image, methods=["POST"], dependencies=[Depends(check_api_key)],
        include_in_schema=_path == PATHS[0],
    )
