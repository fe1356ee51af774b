"""The output size of a request: ``width``/``height``, OpenAI's ``size``, Together's ``aspect_ratio``.

Rules (README, "Sizes"):

1. Explicit ``width``/``height`` win. ``size: "WxH"`` fills only what is missing; a ``size`` that disagrees
   with an explicit ``width`` or ``height`` is a 400 naming both fields. ``size: "auto"`` is no size.
2. ``aspect_ratio`` (``"16:9"``, any ``"W:H"``) sizes what is still missing: with one side given, the other
   follows the ratio; with none, the output has about the model's default area (width x height of its
   manifest: one megapixel for the FLUX models) in that ratio. ``"match_input_image"`` takes the ratio of
   the input image (``image_url``, ``image_base64`` or an edit's ``image``), on models that take one.
3. What is left comes from the manifest's defaults.
4. A side must be a multiple of ``limits.request_multiple`` (8, as Together asks). FLUX needs multiples of
   ``limits.size_multiple`` (16): the pipeline runs at the next such size and the worker centre-crops the
   few extra pixels, so the image has exactly the requested size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import InvalidRequest
from ..images import round_to_multiple
from ..registry import ModelLimits, ModelManifest

MATCH_INPUT = "match_input_image"
# Together's documented ratios; any other "W:H" within MAX_RATIO works too.
ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21")
MAX_RATIO = 4.0
_SIZE = re.compile(r"([0-9]+)[xX]([0-9]+)")
# Digits a side of ``size`` may have before it is refused unread (as too large, whatever the model).
_SIZE_DIGITS = 6
_RATIO = re.compile(r"([0-9]{1,4}):([0-9]{1,4})")


@dataclass(frozen=True)
class Size:
    """The size the client gets (``width`` x ``height``) and the one the pipeline runs at."""

    width: int
    height: int
    gen_width: int
    gen_height: int


def parse_size(value: str) -> tuple[int, int] | None:
    """``"WxH"`` → (W, H); ``"auto"`` → None; anything else raises ValueError (the schema's 400)."""
    if value == "auto":
        return None
    match = _SIZE.fullmatch(value)
    if not match:
        raise ValueError("size must look like '1024x768' (width x height) or be 'auto'")
    if max(len(match[1].lstrip("0")), len(match[2].lstrip("0"))) > _SIZE_DIGITS:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise ValueError(f"size {shown} is too large: each model's largest width and height are its "
                         "limits.max_width and limits.max_height (GET /v1/models)")
    width, height = int(match[1].lstrip("0") or "0"), int(match[2].lstrip("0") or "0")
    if width < 1 or height < 1:
        raise ValueError("size must look like '1024x768' (width x height) or be 'auto'")
    return width, height


def parse_aspect_ratio(value: str) -> float | None:
    """``"W:H"`` → W / H; ``"match_input_image"`` → None; anything else raises ValueError."""
    if value == MATCH_INPUT:
        return None
    match = _RATIO.fullmatch(value)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"aspect_ratio must look like '16:9' (one of {', '.join(ASPECT_RATIOS)}, any "
                         f"'W:H', or '{MATCH_INPUT}')")
    ratio = int(match[1]) / int(match[2])
    if not 1 / MAX_RATIO <= ratio <= MAX_RATIO:
        raise ValueError(f"aspect_ratio must lie between 1:{MAX_RATIO:g} and {MAX_RATIO:g}:1")
    return ratio


def explicit_size(width: int | None, height: int | None, size: str | None) -> tuple[int | None, int | None]:
    """Rule 1: the sides the request states, ``size`` filling only what ``width``/``height`` leave."""
    parsed = parse_size(size) if size else None
    if parsed is None:
        return width, height
    for name, given, from_size in (("width", width, parsed[0]), ("height", height, parsed[1])):
        if given is not None and given != from_size:
            raise InvalidRequest(
                f"'size' ({size}) and '{name}' ({given}) disagree; send one of them", param="size")
    return width or parsed[0], height or parsed[1]


def from_ratio(ratio: float, width: int | None, height: int | None, manifest: ModelManifest,
               limits: ModelLimits) -> tuple[int, int]:
    """Rule 2: the missing sides from ``ratio`` (W / H), about the model's default area when both are."""
    step = limits.size_multiple
    if width is not None:
        return width, height or round_to_multiple(width / ratio, step)
    if height is not None:
        return round_to_multiple(height * ratio, step), height
    area = manifest.defaults.width * manifest.defaults.height
    w, h = round_to_multiple(math.sqrt(area * ratio), step), round_to_multiple(math.sqrt(area / ratio), step)
    # Rounding may step over a limit: keep within the longest sides, then shrink the longer side.
    w, h = min(w, limits.max_width // step * step), min(h, limits.max_height // step * step)
    while w * h > limits.max_pixels:
        if w >= h:
            w -= step
        else:
            h -= step
    return w, h


def check_side(field: str, value: int, most: int, manifest: ModelManifest, limits: ModelLimits) -> None:
    if value % limits.request_multiple:
        raise InvalidRequest(
            f"'{field}' must be a multiple of {limits.request_multiple} for {manifest.id} (got {value})",
            param=field)
    if not limits.min_size <= value <= most:
        raise InvalidRequest(
            f"'{field}' must be between {limits.min_size} and {most} for {manifest.id} (got {value})",
            param=field)


def resolve_size(width: int | None, height: int | None, size: str | None, aspect_ratio: str | None,
                 manifest: ModelManifest, limits: ModelLimits,
                 input_size: tuple[int, int] | None = None) -> Size:
    """Rules 1-4 for one request; ``input_size`` is the input image's (for ``match_input_image``).

    Raises ``InvalidRequest`` (400) naming the field: a side off the multiple or out of the limits, a
    ``size`` that disagrees with ``width``/``height``, too many pixels; ``aspect_ratio`` when the side it
    computes from the given one is out of the limits.
    """
    w, h = explicit_size(width, height, size)
    # The side aspect_ratio computes from the one the request gives: a refusal names aspect_ratio, not a
    # field the client never sent.
    derived = {(True, False): "height", (False, True): "width"}.get((w is not None, h is not None))
    if aspect_ratio is not None and (w is None or h is None):
        ratio = parse_aspect_ratio(aspect_ratio)
        if ratio is None:
            if input_size is None:  # the caller checks there is an input; until it is fetched, a guess
                input_size = (manifest.defaults.width, manifest.defaults.height)
            ratio = min(max(input_size[0] / input_size[1], 1 / MAX_RATIO), MAX_RATIO)
        w, h = from_ratio(ratio, w, h, manifest, limits)
    else:
        derived = None
    w, h = w or manifest.defaults.width, h or manifest.defaults.height
    for field, value, most in (("width", w, limits.max_width), ("height", h, limits.max_height)):
        if field == derived and not limits.min_size <= value <= most:
            given = ("height", h) if field == "width" else ("width", w)
            bound = (f"above the limit of {most}" if value > most
                     else f"below the minimum of {limits.min_size}")
            raise InvalidRequest(
                f"aspect_ratio {aspect_ratio} with {given[0]} {given[1]} makes the {field} {value}, {bound} "
                f"for {manifest.id}; send a {given[0]} that fits, or both sides", param="aspect_ratio")
        check_side(field, value, most, manifest, limits)
    step = limits.size_multiple
    gen_w, gen_h = -(-w // step) * step, -(-h // step) * step
    if gen_w * gen_h > limits.max_pixels:
        raise InvalidRequest(
            f"width x height must be at most {limits.max_pixels} pixels for {manifest.id}"
            + (f" (aspect_ratio {aspect_ratio} made it {w}x{h})" if derived else ""),
            param="aspect_ratio" if derived else "width")
    return Size(w, h, gen_w, gen_h)
