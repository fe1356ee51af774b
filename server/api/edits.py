"""``POST /v1/images/edits``: openai's ``client.images.edit(image=..., prompt=...)`` (a multipart body).

The form (openai ``resources/images.py`` ``edit``) is read by the bounded reader (server/api/multipart.py);
its text fields are the generation request's fields, validated by the same schema (server/api/schemas.py),
so ``n``, ``size``, ``response_format``, ``output_format``, ``output_compression``, ``aspect_ratio`` and
Together's fields (``steps``, ``seed``, ... through ``extra_body``) mean what they mean there. The files:

- ``image`` (one) or ``image[]`` (several, in order): the first is the image to edit (Kontext edits it;
  FLUX.1 text-to-image models run img2img), the others are reference images on models that take them. Each
  goes through the guarded fetcher's decoder as a ``data:`` URL would: format sniffed from the bytes, pixel
  count checked from the header (``fetch.max_pixels``), EXIF orientation, RGB; errors name ``image`` or
  ``image[i]``.
- ``mask``: inpainting, which no served model does: a 400 naming ``mask``. ``markup``: a 400.

Without ``model``, the first served model that takes an input image and that the caller's key may use
edits. Limits, safety, keys, rate limits, the queue and the answer are those of
``POST /v1/images/generations``.
"""

from __future__ import annotations

import base64
import re

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..errors import Forbidden, InvalidRequest, Unsupported
from ..registry import ModelManifest
from .auth import check_api_key
from .images import Inputs, body_size, generate
from .keys import requested_model
from .multipart import Limits, Part, form_fields, read_multipart
from .runtime import Runtime
from .schemas import parse_request

router = APIRouter()

PATHS = ("/v1/images/edits", "/images/edits", "/v1/v1/images/edits")
IMAGE_PARTS = ("image", "image[]")
# Images come as files here; a URL field would be a second way in (and a surprise): refused by name.
URL_FIELDS = ("image_url", "reference_images", "image_base64")
_IMAGE_TYPE = re.compile(r"image/[a-z0-9.+-]{1,50}")


def data_url(part: Part) -> str:
    """An uploaded file as a ``data:`` URL, so the fetcher decodes it exactly as it decodes any image."""
    ctype = part.content_type if part.content_type and _IMAGE_TYPE.fullmatch(part.content_type) else None
    return f"data:{ctype or 'image/unknown'};base64,{base64.b64encode(part.data).decode('ascii')}"


def _editing_model(request: Request, runtime: Runtime, name: str | None) -> ModelManifest:
    """The named model, or the first served model that edits and that the caller's key may use."""
    manifest = requested_model(request, name, lambda m: m.capabilities.image_to_image)
    if manifest is not None:
        return manifest
    if any(m.capabilities.image_to_image for m in runtime.registry.models):
        raise Forbidden("this API key may not use any model served here that edits images", param="model",
                        code="model_not_allowed")
    raise Unsupported("no model served here edits images", param="model")


def _check_files(files: list[Part], manifest: ModelManifest) -> list[Part]:
    """The image parts, in order; 400 for a mask, markup, another file, or more images than the model
    takes."""
    for part in files:
        if part.name == "mask":
            raise Unsupported(f"model {manifest.id} does not support inpainting with a 'mask'", param="mask")
        if part.name not in IMAGE_PARTS:
            raise Unsupported(f"the file field '{part.name}' is not supported; send the images as 'image'",
                              param=part.name)
    images = [part for part in files if part.name in IMAGE_PARTS]
    if not images:
        raise InvalidRequest("'image' is required: the image to edit, as a file", param="image")
    caps = manifest.capabilities
    if not caps.image_to_image:
        raise Unsupported(f"model {manifest.id} does not edit images", param="model")
    refs = manifest.limits.max_reference_images if caps.reference_images else 0
    # On FLUX.2 the first image is one of the references (server/api/conditioning.py): the same limit.
    most = refs if manifest.family in ("flux2", "flux2-klein") else 1 + refs
    if len(images) > most:
        raise InvalidRequest(
            f"model {manifest.id} takes at most {most} image(s) per edit (got {len(images)})", param="image")
    return images


async def edit_image(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    limits = Limits.of(settings.uploads, settings.fetch.max_bytes)
    assert runtime.lanes is not None
    # The upload stays in memory (as data: URLs once read) until the answer: it counts against the
    # server-wide budget of body bytes from before it is read (server.max_inflight_body_bytes).
    async with runtime.lanes.bodies.hold(body_size(request, limits.max_bytes)):
        return await _edit(request, runtime, await read_multipart(request, limits))


async def _edit(request: Request, runtime: Runtime, parts: list[Part]) -> Response:
    body = form_fields(parts)
    for name in URL_FIELDS:
        if name in body:
            raise Unsupported(
                f"'{name}' is not taken by the edits endpoint; send the images as 'image' files", param=name)
    model = body.get("model")
    manifest = _editing_model(request, runtime, model if isinstance(model, str) and model else None)
    images = _check_files([part for part in parts if part.filename is not None], manifest)
    urls = [data_url(part) for part in images]
    del parts, images  # the raw bytes: only the data URLs travel on
    body["image_url"] = urls[0]
    if len(urls) > 1:
        body["reference_images"] = urls[1:]
    req = parse_request(body)
    fields = ["image"] if len(urls) == 1 else [f"image[{i}]" for i in range(len(urls))]
    inputs = Inputs(image_url=urls[0], image_field="image", references=urls[1:] or None, fields=fields)
    return await generate(request, req, inputs, default_model=manifest)


for _path in PATHS:
    router.add_api_route(
        _path, edit_image, methods=["POST"], dependencies=[Depends(check_api_key)],
        include_in_schema=_path == PATHS[0],
    )
