"""``image_url`` and ``reference_images``: which conditioning a request gets, and its images, fetched.

The API half of conditioning (the engine's half, using the prepared images, is server/engine/families.py).
Runs in the API process, before a job is queued: a bad URL or a model without the capability is a 400
that costs no GPU work. What the two fields mean depends on the model's family:

| family | ``image_url`` | ``reference_images`` |
|---|---|---|
| flux (FLUX.1) | img2img input | FLUX.1 Redux references (appearance/style tokens) |
| flux-kontext | the image to edit | more images beside it |
| flux2, flux2-klein (FLUX.2) | one more reference image, first | the pipeline's reference images, in order |
| flux-control (Canny/Depth) | the photo the control image is computed from (required) | refused |

Images travel in the job as plain RGB bytes (``ConditioningImage``), already sized for their use, so the
worker does no network I/O and little image work:

- the input image of img2img and the control photo are scaled to cover the requested width x height and
  centre-cropped to it (their latents are the output's), so the output has the request's size and the
  input's framing;
- Kontext follows upstream and never crops (server/api/kontext.py): without a size in the request the
  output takes the preferred Kontext resolution nearest the input's aspect ratio and the input is resized
  to it; with a size, the input keeps its aspect ratio at the output's area; references take the input's
  height, and the engine sets them side by side after it;
- Redux references keep their aspect ratio, bounded to ``REDUX_MAX_SIDE`` (the SigLIP encoder resizes
  them again to its own input size);
- FLUX.2 references keep their aspect ratio, scaled down to at most ``limits.max_reference_pixels`` and
  cropped to multiples of 16 (what ``Flux2Pipeline`` does itself); they must be at least 64 pixels a side
  with an aspect ratio of at most 8 (``Flux2ImageProcessor.check_image_input``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TypeVar

from PIL import Image

from ..errors import InvalidRequest, Unsupported
from ..fetch import Fetcher
from ..images import fit_area, fit_cover, fit_height, fit_within, resize_to, scale_to_area
from ..params import Conditioning, ConditioningImage, GenerationParams
from ..registry import ModelLimits, ModelManifest
from .kontext import preferred_size
from .lanes import Lane, Lanes

REDUX_MAX_SIDE = 768
# Flux2ImageProcessor.check_image_input: each side at least 64 px, aspect ratio at most 8.
FLUX2_MIN_SIDE = 64
FLUX2_MAX_ASPECT = 8
FLUX2_MULTIPLE = 16  # VAE scale factor 8 x the 2 x 2 patch
T = TypeVar("T")


def conditioning_kind(
    image_url: str | None, reference_images: list[str] | None, manifest: ModelManifest
) -> tuple[Conditioning, float | None]:
    """The conditioning a request asks for (and its img2img strength); 400 naming the field if the model
    can't take it."""
    caps = manifest.capabilities
    refs = reference_images or []
    if image_url and not caps.image_to_image:
        raise Unsupported(f"'image_url' is not supported by model {manifest.id}", param="image_url")
    if refs and not caps.reference_images:
        raise Unsupported(f"'reference_images' is not supported by model {manifest.id}",
                          param="reference_images")
    most = manifest.limits.max_reference_images
    # On FLUX.2 image_url is one more reference image: it counts against the same limit.
    given = len(refs) + (1 if image_url and manifest.family in ("flux2", "flux2-klein") else 0)
    if given > most:
        what = "'image_url' and 'reference_images' together" if len(refs) < given else "'reference_images'"
        raise InvalidRequest(f"{what} may hold at most {most} images for {manifest.id}",
                             param="reference_images")
    if manifest.family in ("flux2", "flux2-klein"):
        return ("references" if given else "text"), None
    if manifest.family == "flux-control":
        if not image_url:
            raise InvalidRequest(f"'image_url' is required by model {manifest.id}: the image its "
                                 f"{manifest.control.preprocessor if manifest.control else 'control'} "
                                 "control image is computed from", param="image_url")
        return "control", None
    if manifest.family == "flux-kontext":
        return ("kontext" if image_url or refs else "text"), None
    if image_url:
        return ("img2img+redux" if refs else "img2img"), manifest.defaults.img2img_strength
    return ("redux" if refs else "text"), None


async def _gather_in_order(calls: list[Awaitable[T]]) -> list[T]:
    """Await ``calls`` concurrently; the first failure in list (field) order is raised, whichever finished
    first."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)  # type: ignore[arg-type]


def flux2_reference(image: Image.Image, field: str, max_pixels: int) -> Image.Image:
    """A FLUX.2 reference image as the pipeline will read it; 400 naming ``field`` if it can't be one."""
    small, large = sorted(image.size)
    if large > FLUX2_MAX_ASPECT * small:
        raise InvalidRequest(f"'{field}' is {image.width}x{image.height}: an aspect ratio of at most "
                             f"{FLUX2_MAX_ASPECT}:1 is accepted", param=field)
    image = fit_area(image, max_pixels, FLUX2_MULTIPLE)
    if min(image.size) < FLUX2_MIN_SIDE:
        raise InvalidRequest(f"'{field}' must be at least {FLUX2_MIN_SIDE}x{FLUX2_MIN_SIDE} pixels "
                             f"(got {image.width}x{image.height})", param=field)
    return image


async def attach_images(
    params: GenerationParams, image_url: str | None, reference_images: list[str] | None,
    fetcher: Fetcher, manifest: ModelManifest, lanes: Lanes, key: str, *, fields: list[str] | None = None,
    match_input: Callable[[int, int], GenerationParams] | None = None, kontext: KontextSizing | None = None,
) -> GenerationParams:
    """Fetch, decode and size a request's conditioning images into its params (concurrently).

    Downloads run in the downloads lane (counted against the API key ``key``), ``data:`` URLs in the decodes
    lane (server/api/lanes.py): a full lane is a 429 ``fetch_busy`` within ``server.slot_wait_s``. Each image
    is fetched, decoded and prepared in one lane call, so no decoded image waits between calls (the decode
    budget bounds what is decoded at once). ``fields`` names each URL in errors (the input image first); by
    default ``image_url`` and ``reference_images[i]``. ``match_input(width, height)``: the params again,
    sized from the input image (``aspect_ratio: match_input_image``), once it is decoded and before it is
    prepared. ``kontext``: for a Kontext model (required there), whether the request named its size, and its
    limits (server/api/kontext.py: upstream's preferred-resolution resize, never a crop).
    """
    if params.conditioning == "text":
        return params
    names = fields or ((["image_url"] if image_url else [])
                       + [f"reference_images[{i}]" for i in range(len(reference_images or []))])
    if params.conditioning == "kontext":
        if kontext is None:
            raise ValueError("a Kontext request's images need its KontextSizing")
        return await _attach_kontext(params, image_url, list(reference_images or []), names, fetcher, lanes,
                                     key, match_input, kontext)
    base = params
    ref_pixels = manifest.limits.max_reference_pixels

    def cover(image: Image.Image, _field: str, sized: GenerationParams | None) -> Image.Image:
        target = sized or base
        return fit_cover(image, target.width, target.height)

    def bounded(image: Image.Image, _field: str, _sized: GenerationParams | None) -> Image.Image:
        return fit_within(image, REDUX_MAX_SIDE)

    def reference(image: Image.Image, field: str, _sized: GenerationParams | None) -> Image.Image:
        return flux2_reference(image, field, ref_pixels)

    flux2 = params.conditioning == "references"
    calls = []
    if image_url:
        calls.append(_lane(lanes, image_url).run(_load, fetcher, image_url, names[0],
                                                 reference if flux2 else cover, match_input, lane_key=key))
    calls += [_lane(lanes, url).run(_load, fetcher, url, field, reference if flux2 else bounded, lane_key=key)
              for url, field in zip(reference_images or [], names[1:] if image_url else names, strict=True)]
    loaded = await _gather_in_order(calls)
    images = [image for image, _sized in loaded]
    if image_url and loaded[0][1] is not None:
        params = loaded[0][1]
    if flux2:  # image_url is the first reference
        return dataclasses.replace(params, references=tuple(images))
    main = images.pop(0) if image_url else None
    return dataclasses.replace(params, image=main, references=tuple(images))


def _load(fetcher: Fetcher, url: str, field: str,
          prepare: Callable[[Image.Image, str, GenerationParams | None], Image.Image],
          match_input: Callable[[int, int], GenerationParams] | None = None,
          ) -> tuple[ConditioningImage, GenerationParams | None]:
    """One image fetched, decoded and prepared (on a lane thread); with ``match_input`` (the input image under
    ``aspect_ratio: match_input_image``) the params sized from it, which ``prepare`` gets too."""
    image = fetcher.fetch_image(url, field)
    sized = match_input(image.width, image.height) if match_input is not None else None
    return ConditioningImage.from_pil(prepare(image, field, sized)), sized


async def _attach_kontext(params: GenerationParams, image_url: str | None, references: list[str],
                          names: list[str], fetcher: Fetcher, lanes: Lanes, key: str,
                          match_input: Callable[[int, int], GenerationParams] | None,
                          kontext: KontextSizing) -> GenerationParams:
    """Kontext sizes its references from the input image's prepared height: the input image first (fetched,
    decoded and sized in one lane call), then the references concurrently, each in one lane call too, so no
    decoded image waits between calls."""
    main: ConditioningImage | None = None
    if image_url:
        main, params = await _lane(lanes, image_url).run(_load_kontext_input, fetcher, image_url, names[0],
                                                         params, match_input, kontext, lane_key=key)
    row_height = main.height if main is not None else params.height
    multiple = kontext.limits.size_multiple

    def beside(image: Image.Image, _field: str, _sized: GenerationParams | None) -> Image.Image:
        return fit_height(image, row_height, multiple)

    refs = await _gather_in_order([_lane(lanes, url).run(_load, fetcher, url, field, beside, lane_key=key)
                                   for url, field in zip(references, names[1:] if image_url else names,
                                                         strict=True)])
    return dataclasses.replace(params, image=main, references=tuple(image for image, _sized in refs))


def _load_kontext_input(fetcher: Fetcher, url: str, field: str, params: GenerationParams,
                        match_input: Callable[[int, int], GenerationParams] | None,
                        sizing: KontextSizing) -> tuple[ConditioningImage, GenerationParams]:
    """The image to edit, fetched, decoded and sized (on a lane thread), and the params sized with it."""
    source = fetcher.fetch_image(url, field)
    if match_input is not None:
        params = match_input(source.width, source.height)
    main, params = kontext_input(params, source, sizing)
    return ConditioningImage.from_pil(main), params


def _lane(lanes: Lanes, url: str) -> Lane:
    """A ``data:`` URL downloads nothing: it only decodes (the fetcher refuses whatever is not a URL)."""
    return lanes.decodes if isinstance(url, str) and url[:5].lower() == "data:" else lanes.downloads


@dataclasses.dataclass(frozen=True)
class KontextSizing:
    """What sizing a Kontext request's images needs besides the params: the model, and its size choice."""

    manifest: ModelManifest
    limits: ModelLimits
    explicit_size: bool


def kontext_input(params: GenerationParams, source: Image.Image,
                  sizing: KontextSizing) -> tuple[Image.Image, GenerationParams]:
    """Kontext's input image as the pipeline takes it, and the params sized with it. Without a size in the
    request, the output takes the preferred resolution nearest the input's aspect ratio and the input is
    resized to it; with one, the input keeps its aspect ratio at the output's area. References then take the
    input's height. Nothing is cropped (server/api/kontext.py)."""
    if sizing.explicit_size:
        return scale_to_area(source, params.width * params.height, sizing.limits.size_multiple), params
    width, height = preferred_size(source.width, source.height, sizing.manifest, sizing.limits)
    # The preferred size is the output's: nothing to crop afterwards.
    return resize_to(source, width, height), dataclasses.replace(
        params, width=width, height=height, output_width=None, output_height=None)
