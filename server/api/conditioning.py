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
from collections.abc import Callable

from PIL import Image

from ..errors import InvalidRequest, Unsupported
from ..fetch import Fetcher
from ..images import fit_cover, fit_within
from ..params import Conditioning, ConditioningImage, GenerationParams
from ..registry import ModelManifest
from .lanes import Lane, Lanes

REDUX_MAX_SIDE = 768


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


def _load(fetcher: Fetcher, url: str, field: str,
          prepare: Callable[[Image.Image], Image.Image]) -> ConditioningImage:
    return ConditioningImage.from_pil(prepare(fetcher.fetch_image(url, field)))


async def attach_images(
    params: GenerationParams, image_url: str | None, reference_images: list[str] | None,
    fetcher: Fetcher, lanes: Lanes, key: str,
) -> GenerationParams:
    """Fetch, decode and size a request's conditioning images into its params (concurrently).

    Downloads run in the downloads lane (counted against the API key ``key``), ``data:`` URLs in the decodes
    lane (server/api/lanes.py): a full lane is a 429 ``fetch_busy`` within ``server.slot_wait_s``.
    """
    if params.conditioning == "text":
        return params
    w, h = params.width, params.height

    def cover(image: Image.Image) -> Image.Image:
        return fit_cover(image, w, h)

    def bounded(image: Image.Image) -> Image.Image:
        return fit_within(image, REDUX_MAX_SIDE)

    ref_prepare = cover if params.conditioning == "kontext" else bounded
    jobs: list[tuple[str, str, Callable[[Image.Image], Image.Image]]] = []
    if image_url:
        jobs.append((image_url, "image_url", cover))
    jobs += [(url, f"reference_images[{i}]", ref_prepare)
             for i, url in enumerate(reference_images or [])]
    results = await asyncio.gather(
        *(_lane(lanes, url).run(_load, fetcher, url, field, prep, lane_key=key)
          for url, field, prep in jobs),
        return_exceptions=True,
    )
    images: list[ConditioningImage] = []
    for result in results:  # the first failure in field order, whichever finished first
        if isinstance(result, BaseException):
            raise result
        images.append(result)
    main = images.pop(0) if image_url else None
    return dataclasses.replace(params, image=main, references=tuple(images))


def _lane(lanes: Lanes, url: str) -> Lane:
    """A ``data:`` URL downloads nothing: it only decodes (the fetcher refuses whatever is not a URL)."""
    return lanes.decodes if isinstance(url, str) and url[:5].lower() == "data:" else lanes.downloads
