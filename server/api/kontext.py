"""FLUX.1 Kontext: the output size and the sizes of its input images, as upstream does it, never cropped.

Upstream (diffusers' ``FluxKontextPipeline``, ``_auto_resize=True``, after Black Forest Labs' reference code)
resizes the input image, without cropping, to the entry of ``PREFERRED_KONTEXT_RESOLUTIONS`` (the
resolutions Kontext was trained at, about one megapixel each) whose aspect ratio is nearest the input's,
and generates at that size. Darkroom does the same when the request gives no size (no width, height or
size): the output is that preferred resolution, so an edit keeps its input's framing. The list is scaled
to the model's default area (a manifest whose default is 1024x1024, as FLUX.1 Kontext [dev]'s, gets
upstream's list exactly; the tiny test model gets it at 512x512), keeping sizes multiples of 16 within
the model's limits.

When the request names a size, the output has that size and the input image keeps its own aspect ratio:
it is scaled to the output's area (multiples of 16), not cropped to the output's shape; Kontext reads the
input image as its own tokens, so its shape need not match the output's. Reference images are scaled to
the input image's height (the engine sets them side by side after it), again without cropping.
"""

from __future__ import annotations

from ..images import round_to_multiple
from ..registry import ModelLimits, ModelManifest

# diffusers/pipelines/flux/pipeline_flux_kontext.py (diffusers 0.42), as (width, height): copied, because
# API pods do not import diffusers (tests check it equals upstream's).
PREFERRED_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)
UPSTREAM_AREA = 1024 * 1024


def preferred_size(width: int, height: int, manifest: ModelManifest, limits: ModelLimits) -> tuple[int, int]:
    """The preferred Kontext resolution nearest the aspect ratio of a ``width`` x ``height`` input.

    Upstream's choice (smallest ``|aspect - w/h|``) among the preferred resolutions scaled to the model's
    default area and rounded to ``limits.size_multiple``; entries outside the limits are skipped, and if
    none fits, the model's default size is returned.
    """
    scale = (manifest.defaults.width * manifest.defaults.height / UPSTREAM_AREA) ** 0.5
    step = limits.size_multiple
    aspect = width / height
    candidates = []
    for w, h in PREFERRED_KONTEXT_RESOLUTIONS:
        sw, sh = round_to_multiple(w * scale, step), round_to_multiple(h * scale, step)
        if (limits.min_size <= sw <= limits.max_width and limits.min_size <= sh <= limits.max_height
                and sw * sh <= limits.max_pixels):
            candidates.append((abs(aspect - w / h), sw, sh))
    if not candidates:
        return manifest.defaults.width, manifest.defaults.height
    _, best_w, best_h = min(candidates)
    return best_w, best_h
