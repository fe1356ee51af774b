"""Control images for FLUX.1 Canny [dev] and Depth [dev]: what the user's photo becomes before the pipeline.

Users send an ordinary photo as ``image_url``; the control models were trained on edge maps and depth maps,
so the worker computes those here, as the upstream examples do before calling ``FluxControlPipeline``:

- Canny: OpenCV's ``cv2.Canny`` on the greyscale image (what ``controlnet_aux.CannyDetector`` runs, with the
  thresholds diffusers' FLUX.1 Canny example uses: 50 and 200), white edges on black, as RGB;
- Depth: a depth-estimation model through ``transformers.pipeline("depth-estimation")`` (BFL's and
  diffusers' FLUX.1 Depth examples use Depth Anything, ``LiheYoung/depth-anything-large-hf``), the
  normalised 8-bit depth map as RGB (``image_gen_aux.DepthPreprocessor`` returns the same).

Worker side only: OpenCV and the depth model are never imported by an API process.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from diffusers import FluxControlPipeline
from PIL import Image

from ..params import GenerationParams
from .runner import FamilyRunner, SharedModels, grey, per_image
from .weights import source_location

log = logging.getLogger(__name__)

# diffusers' FluxControlPipeline example (black-forest-labs/FLUX.1-Canny-dev): CannyDetector(low_threshold=50,
# high_threshold=200).
CANNY_LOW = 50
CANNY_HIGH = 200


class ControlPreprocessor(Protocol):
    """Turns the users' images into the control images a model was trained on (same sizes, RGB)."""

    def __call__(self, images: Sequence[Image.Image]) -> list[Image.Image]: ...


def canny_edges(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """The Canny edge map of ``image``: RGB, same size, 255 on edges and 0 elsewhere.

    ``low``/``high`` are the hysteresis thresholds of ``cv2.Canny`` on 0-255 grey levels (a gradient above
    ``high`` starts an edge, one above ``low`` continues it).
    """
    import cv2
    import numpy as np

    grey = np.asarray(image.convert("L"))
    edges = cv2.Canny(grey, low, high)
    return Image.fromarray(edges).convert("RGB")


class CannyPreprocessor:
    """:class:`ControlPreprocessor` for FLUX.1 Canny: :func:`canny_edges` of each image."""

    def __init__(self, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> None:
        if not 0 <= low <= high:
            raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high (got {low}, {high})")
        self.low, self.high = low, high

    def __call__(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        return [canny_edges(image, self.low, self.high) for image in images]


class DepthPreprocessor:
    """:class:`ControlPreprocessor` for FLUX.1 Depth: a transformers depth-estimation pipeline, loaded once.

    ``location`` is what ``from_pretrained`` reads (a folder or a Hub id, with ``revision`` in ``kwargs``);
    each image is estimated on its own (one model call per image, so a map does not depend on what it was
    batched with) and comes back as an RGB depth map of the image's size (near is bright).
    """

    def __init__(self, location: str, device: str, kwargs: dict[str, Any] | None = None) -> None:
        from transformers import pipeline

        started = time.perf_counter()
        self._pipe = pipeline("depth-estimation", model=location, device=device, **(kwargs or {}))
        log.info("depth model loaded from=%s device=%s seconds=%.2f", location, device,
                 time.perf_counter() - started)

    def __call__(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        out = []
        for image in images:
            depth = self._pipe(image.convert("RGB"))["depth"]
            if depth.size != image.size:  # the pipeline resizes back to the input; be sure
                depth = depth.resize(image.size, Image.Resampling.BICUBIC)
            out.append(depth.convert("RGB"))
        return out


class ControlRunner(FamilyRunner):
    """FLUX.1 Canny / Depth [dev] (``family: flux-control``): ``FluxControlPipeline`` with each request's
    control image computed from its ``image_url`` photo (sized to the output by the API) by the manifest's
    preprocessor. No negative conditioning (the pipeline has none)."""

    pipeline_class = FluxControlPipeline
    preprocess: ControlPreprocessor

    def attach(self, shared: SharedModels) -> None:
        spec = self.manifest.control
        assert spec is not None  # the manifest validator requires it for this family
        if spec.preprocessor == "canny":
            self.preprocess = CannyPreprocessor(spec.canny_low, spec.canny_high)
            return
        assert spec.depth_model is not None
        location, kwargs = source_location(spec.depth_model, self.settings.cache_dir)
        # One depth model per device, however many manifests name it.
        self.preprocess = shared.get("depth-estimation", location,
                                     lambda: DepthPreprocessor(location, self.device, kwargs))

    def route(self, batch: Sequence[GenerationParams], kwargs: dict[str, Any]) -> Any:
        photos = []
        for p in batch:
            assert p.image is not None  # the API requires image_url for this family
            photos.append(p.image.to_pil())
        kwargs["control_image"] = per_image(batch, self.preprocess(photos))
        return self.pipe

    def warm_request(self, params: GenerationParams) -> GenerationParams:
        return dataclasses.replace(params, conditioning="control", image=grey(params.width, params.height))
