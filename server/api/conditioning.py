"""``image_url`` and ``reference_images``: which conditioning a request gets, and its images, fetched.

The API half of conditioning (the engine's half, using the prepared images, is server/engine/pipelines.py).
Runs in the API process, before a job is queued: a bad URL or a model without the capability is a 400
that costs no GPU work. Images travel in the job as plain RGB bytes (``ConditioningImage``), already
sized for their use, so the worker does no network I/O and little image work:

- the input image (img2img or Kontext editing) is scaled to cover the requested width x height and
  centre-cropped to it, so the output has the request's size and the input's framing;
- Kontext references are prepared the same way; the engine sets them side by side after the input image;
- Redux references keep their aspect ratio, bounded to ``REDUX_MAX_SIDE`` (the SigLIP encoder resizes
  them again to its own input size).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable
from typing import TypeVar

from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..errors import InvalidRequest, Unsupported
from ..fetch import Fetcher
from ..images import fit_cover, fit_within
from ..params import Conditioning, ConditioningImage, GenerationParams
from ..registry import ModelManifest

REDUX_MAX_SIDE = 768
T = TypeVar("T")


def conditioning_kind(
    image_url: str | None, reference_images: list[str] | None, manifest: ModelManifest
) -> tuple[Conditioning, float | None]:
    """The conditioning a request asks for (and its img2img strength); 400 if the model can't."""
    caps = manifest.capabilities
    refs = reference_images or []
    if image_url and not caps.image_to_image:
        raise Unsupported(f"'image_url' is not supported by model {manifest.id}", param="image_url")
    if refs and not caps.reference_images:
        raise Unsupported(f"'reference_images' is not supported by model {manifest.id}",
                          param="reference_images")
    most = manifest.limits.max_reference_images
    if len(refs) > most:
        raise InvalidRequest(f"'reference_images' may hold at most {most} images for {manifest.id}",
                             param="reference_images")
    if manifest.family == "flux-kontext":
        return ("kontext" if image_url or refs else "text"), None
    if image_url:
        return ("img2img+redux" if refs else "img2img"), manifest.defaults.img2img_strength
    return ("redux" if refs else "text"), None


def _fetch(fetcher: Fetcher, url: str, field: str) -> Image.Image:
    return fetcher.fetch_image(url, field)


def _prepare(image: Image.Image, prepare: Callable[[Image.Image], Image.Image]) -> ConditioningImage:
    return ConditioningImage.from_pil(prepare(image))


async def _gather_in_order(calls: list[Callable[[], T]]) -> list[T]:
    """Run ``calls`` in the thread pool concurrently; the first failure in list (field) order is raised,
    whichever finished first."""
    results = await asyncio.gather(*(run_in_threadpool(call) for call in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)  # type: ignore[arg-type]


async def attach_images(
    params: GenerationParams, image_url: str | None, reference_images: list[str] | None,
    fetcher: Fetcher, *, fields: list[str] | None = None,
    match_input: Callable[[int, int], GenerationParams] | None = None,
) -> GenerationParams:
    """Fetch, decode and size a request's conditioning images into its params (concurrently).

    ``fields`` names each URL in errors (the input image first); by default ``image_url`` and
    ``reference_images[i]``. ``match_input(width, height)``: the params again, sized from the input image
    (``aspect_ratio: match_input_image``), once it is decoded and before any image is prepared.
    """
    if params.conditioning == "text":
        return params
    urls = ([image_url] if image_url else []) + list(reference_images or [])
    names = fields or ((["image_url"] if image_url else [])
                       + [f"reference_images[{i}]" for i in range(len(reference_images or []))])
    decoded = await _gather_in_order(
        [functools.partial(_fetch, fetcher, url, field) for url, field in zip(urls, names, strict=True)])
    if match_input is not None and image_url:
        params = match_input(decoded[0].width, decoded[0].height)
    w, h = params.width, params.height

    def cover(image: Image.Image) -> Image.Image:
        return fit_cover(image, w, h)

    def bounded(image: Image.Image) -> Image.Image:
        return fit_within(image, REDUX_MAX_SIDE)

    ref_prepare = cover if params.conditioning == "kontext" else bounded
    preparers = ([cover] if image_url else []) + [ref_prepare] * len(reference_images or [])
    images = await _gather_in_order(
        [functools.partial(_prepare, image, prep) for image, prep in zip(decoded, preparers, strict=True)])
    main = images.pop(0) if image_url else None
    return dataclasses.replace(params, image=main, references=tuple(images))
