"""Diffusers pipelines for the served models, one set per device, and the batched call.

The same loading code serves the tiny built-in model, a local folder and a Hub id: only where the
weights come from differs. A batch is one pipeline call with one prompt and one generator per image,
so an image depends on its own seed and prompt, not on what it was batched with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import EngineSettings
from ..registry import ModelManifest, Registry
from .tiny import ensure_tiny_flux
from .types import GenerationParams

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_devices(requested: Sequence[str]) -> list[str]:
    """Expand ``auto`` into every CUDA device, or the CPU when there is none."""
    devices: list[str] = []
    for name in requested:
        if name == "auto":
            if torch.cuda.is_available():
                devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
            else:
                devices.append("cpu")
        else:
            devices.append(name)
    return list(dict.fromkeys(devices))


def resolve_dtype(manifest: ModelManifest, device: str) -> torch.dtype:
    if manifest.dtype != "auto":
        return _DTYPES[manifest.dtype]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def weights_location(manifest: ModelManifest, cache_dir: Path) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` reads the weights, and the keyword arguments that go with it."""
    source = manifest.source
    if source.builtin == "tiny-flux":
        return str(ensure_tiny_flux(cache_dir)), {}
    if source.path is not None:
        # An absolute path: diffusers takes a relative one for a Hub id.
        return str(source.path.expanduser().resolve()), {}
    kwargs: dict[str, Any] = {}
    if source.revision:
        kwargs["revision"] = source.revision
    return str(source.hub), kwargs


def load_pipeline(manifest: ModelManifest, settings: EngineSettings, device: str) -> Any:
    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Progress bars belong in a terminal session, not in a server's log.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    location, kwargs = weights_location(manifest, settings.cache_dir)
    dtype = resolve_dtype(manifest, device)
    started = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(location, dtype=dtype, **kwargs)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    log.info(
        "model loaded model=%s device=%s dtype=%s from=%s seconds=%.2f",
        manifest.id, device, str(dtype).removeprefix("torch."), location,
        time.perf_counter() - started,
    )
    return pipe


class Engine:
    """The pipelines of one device. Called from that device's worker thread only."""

    def __init__(self, registry: Registry, settings: EngineSettings, device: str) -> None:
        self.registry = registry
        self.settings = settings
        self.device = device
        self._pipes: dict[str, Any] = {}
        self.calls = 0

    def load(self) -> None:
        for manifest in self.registry.models:
            self._pipes[manifest.id] = load_pipeline(manifest, self.settings, self.device)

    def warmup(self) -> None:
        """One small call per model, so the first user request does not pay for lazy init."""
        for manifest in self.registry.models:
            params = GenerationParams(
                model=manifest.id, prompt="warm-up", width=64, height=64, steps=1,
                guidance_scale=manifest.defaults.guidance_scale, seeds=(0,),
                max_sequence_length=manifest.defaults.max_sequence_length,
            )
            self.generate([params])

    def generate(self, batch: Sequence[GenerationParams]) -> list[list[Image.Image]]:
        """Run compatible requests as one pipeline call; returns each request's images in order."""
        first = batch[0]
        keys = {p.batch_key() for p in batch}
        if len(keys) != 1:
            raise ValueError("a batch must hold compatible requests only")
        pipe = self._pipes[first.model]

        prompts = [p.prompt for p in batch for _ in p.seeds]
        seeds = [seed for p in batch for seed in p.seeds]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs: dict[str, Any] = {}
        if first.negative_prompt is not None:
            kwargs["negative_prompt"] = [p.negative_prompt for p in batch for _ in p.seeds]
            kwargs["true_cfg_scale"] = first.true_cfg_scale

        with torch.inference_mode():
            images = pipe(
                prompt=prompts,
                height=first.height,
                width=first.width,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                generator=generators,
                max_sequence_length=first.max_sequence_length,
                output_type="pil",
                **kwargs,
            ).images
        self.calls += 1

        out: list[list[Image.Image]] = []
        start = 0
        for params in batch:
            out.append(images[start : start + params.n])
            start += params.n
        return out
