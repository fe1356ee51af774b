"""The contract between the engine and a model family: how a family's pipeline is loaded and called.

``Engine`` (server/engine/pipelines.py) does what every family shares: one generator per image, the LoRA set
of the batch, the stage timer, one pipeline call with the batch's size, steps, guidance and sequence length,
and splitting the images back per request. A ``FamilyRunner`` (one per model and device, picked by the
manifest's ``family`` in server/engine/families.py) does what differs: the pipeline class, what its
conditioning needs besides the pipeline (an img2img view, a Redux prior, a control preprocessor), and which
keyword arguments carry each request's images and negative prompt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from PIL import Image

from ..config import EngineSettings
from ..params import ConditioningImage, GenerationParams
from ..registry import ModelManifest
from .random_flux import RANDOM_MODELS, build_random_flux
from .weights import resolve_dtype, source_location

log = logging.getLogger(__name__)


def load_pipeline(cls: Any, manifest: ModelManifest, settings: EngineSettings, device: str) -> Any:
    """``cls.from_pretrained`` on the manifest's weights in its dtype, with no progress bars; still on the
    CPU (server/engine/placement.py puts it where it runs). A random builtin (server/engine/random_flux.py)
    is built in memory instead, on ``device``, its transformer on ``meta`` until it is placed."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Progress bars belong in a terminal session, not in a server's log.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    dtype = resolve_dtype(manifest.dtype, device)
    started = time.perf_counter()
    if manifest.source.in_memory:
        variant, small = RANDOM_MODELS[str(manifest.source.builtin)]
        pipe = build_random_flux(variant, device, dtype, scale_down=small, pipeline_cls=cls)
        location = f"builtin:{manifest.source.builtin} (random weights, in memory)"
    else:
        location, kwargs = source_location(manifest.source, settings.cache_dir)
        pipe = cls.from_pretrained(location, dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    log.info(
        "model loaded model=%s family=%s pipeline=%s device=%s dtype=%s from=%s seconds=%.2f",
        manifest.id, manifest.family, cls.__name__, device, str(dtype).removeprefix("torch."), location,
        time.perf_counter() - started,
    )
    return pipe


def per_image(batch: Sequence[GenerationParams], values: Sequence[Any]) -> list[Any]:
    """One value per request → one per image (each request's value repeated ``n`` times)."""
    return [value for p, value in zip(batch, values, strict=True) for _ in p.seeds]


def grey(width: int, height: int) -> ConditioningImage:
    """A plain mid-grey image (warm-up calls of the conditioning paths)."""
    return ConditioningImage.from_pil(Image.new("RGB", (width, height), (128, 128, 128)))


class FamilyRunner:
    """One model of one family on one device. Subclasses set ``pipeline_class`` and override what differs.

    ``pipe`` is the model's main pipeline: the engine applies optimizations, LoRA adapters and compilation
    to it, and every pipeline a runner calls shares its modules.
    """

    pipeline_class: ClassVar[Any]

    def __init__(self, manifest: ModelManifest, settings: EngineSettings, device: str) -> None:
        self.manifest = manifest
        self.settings = settings
        self.device = device
        self.pipe = self.load()

    def load(self) -> Any:
        """The main pipeline (``pipeline_class`` on the manifest's weights)."""
        return load_pipeline(self.pipeline_class, self.manifest, self.settings, self.device)

    def attach(self, shared: SharedModels) -> None:
        """Load what the family's conditioning needs beside the pipeline (after ``optimize.prepare``);
        ``shared`` holds models several runners of a device use (loaded once)."""

    def route(self, batch: Sequence[GenerationParams], kwargs: dict[str, Any]) -> Any:
        """Put the batch's per-image inputs (conditioning images, negative prompts) into ``kwargs``, which
        already holds ``prompt`` (one per image); return the pipeline to call: ``pipe`` or a view of it."""
        return self.pipe

    def embed(self, pipe: Any, batch: Sequence[GenerationParams], kwargs: dict[str, Any]) -> None:
        """Inside the timed call: inputs computed with the pipeline's own encoders (prompt embeddings with
        Redux tokens, negative prompt embeddings). Nothing by default."""

    def warm_request(self, params: GenerationParams) -> GenerationParams:
        """The warm-up's plain request as this model can run it (a control model needs its image)."""
        return params

    def warm_variants(self, text: GenerationParams) -> list[GenerationParams]:
        """One small request per further conditioning path of the model, for the warm-up."""
        return []


class SharedModels:
    """Models the runners of one device share, each loaded once (a depth-estimation model named by several
    control manifests)."""

    def __init__(self, settings: EngineSettings, device: str) -> None:
        self.settings = settings
        self.device = device
        self._loaded: dict[tuple[str, str], Any] = {}

    def get(self, kind: str, location: str, load: Any) -> Any:
        """The ``kind`` model at ``location``, loaded by ``load()`` on first use."""
        key = (kind, location)
        if key not in self._loaded:
            self._loaded[key] = load()
        return self._loaded[key]
