"""Diffusers pipelines for the served models, one set per device, and the batched call.

The same loading code serves the tiny built-in model, a local folder and a Hub id: only where the
weights come from differs. A batch is one pipeline call with one prompt and one generator per image,
so an image depends on its own seed and prompt, not on what it was batched with.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import EngineSettings, SafetySettings
from ..errors import DarkroomError, InvalidRequest
from ..images import stitch
from ..loras import LoraStore
from ..metrics import SafetyCounters
from ..params import ConditioningImage, GenerationParams
from ..registry import ModelManifest, Registry
from . import optimize, placement
from .adapters import LoraManager
from .compile_stats import RECOMPILE_REFUSED, CompileCounter
from .loading import LOAD_LOCK
from .random_flux import RANDOM_MODELS, build_random_flux
from .safety import ImageChecker, load_image_checkers, screen_batch
from .timing import Generation, stage_timer
from .weights import resolve_dtype, source_location

log = logging.getLogger(__name__)

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


def weights_location(manifest: ModelManifest, cache_dir: Path) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` reads a model's weights, and the keyword arguments that go with it."""
    return source_location(manifest.source, cache_dir)


def load_pipeline(manifest: ModelManifest, settings: EngineSettings, device: str) -> Any:
    from diffusers import FluxKontextPipeline, FluxPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Progress bars belong in a terminal session, not in a server's log.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    dtype = resolve_dtype(manifest.dtype, device)
    started = time.perf_counter()
    # FLUX.1 Kontext has FLUX.1's components; only the pipeline (how the input image enters) differs.
    cls = FluxKontextPipeline if manifest.family == "flux-kontext" else FluxPipeline
    if manifest.source.in_memory:
        # Random full-size weights, made on the device (the transformer on meta until it is placed).
        variant, small = RANDOM_MODELS[str(manifest.source.builtin)]
        pipe = build_random_flux(variant, device, dtype, scale_down=small, pipeline_cls=cls)
        location = f"builtin:{manifest.source.builtin} (random weights, in memory)"
    else:
        location, kwargs = weights_location(manifest, settings.cache_dir)
        pipe = cls.from_pretrained(location, dtype=dtype, **kwargs)
    # On the CPU still (a random builtin: on the device); placement.place puts it where it runs.
    pipe.set_progress_bar_config(disable=True)
    log.info(
        "model loaded model=%s device=%s dtype=%s from=%s seconds=%.2f",
        manifest.id, device, str(dtype).removeprefix("torch."), location,
        time.perf_counter() - started,
    )
    return pipe


def load_redux_prior(manifest: ModelManifest, settings: EngineSettings, device: str) -> Any:
    """The FLUX.1 Redux prior (SigLIP image encoder + ReduxImageEncoder) a manifest names."""
    from diffusers import FluxPriorReduxPipeline

    assert manifest.redux_prior is not None
    location, kwargs = source_location(manifest.redux_prior, settings.cache_dir)
    dtype = resolve_dtype(manifest.dtype, device)
    # Only the image side: the prompt is encoded by the model's own pipeline.
    prior = FluxPriorReduxPipeline.from_pretrained(
        location, dtype=dtype, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, **kwargs,
    )
    prior.to(device)
    log.info("redux prior loaded model=%s from=%s", manifest.id, location)
    return prior


class Engine:
    """The pipelines of one device. Called from that device's worker thread only."""

    def __init__(self, registry: Registry, settings: EngineSettings, device: str,
                 safety: SafetySettings | None = None, loras: LoraStore | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self.device = device
        self.safety = safety or SafetySettings()
        self._pipes: dict[str, Any] = {}
        # Per model: FluxImg2ImgPipeline sharing the text pipeline's modules; the Redux prior.
        self._img2img: dict[str, Any] = {}
        self._redux: dict[str, Any] = {}
        self._checkers: dict[str, ImageChecker | None] = {}
        self.safety_counters = SafetyCounters()
        # image_loras: the store (shared with the API in `darkroom serve`) and this device's adapters.
        if loras is None:
            from ..config import FetchSettings, LoraSettings

            loras = LoraStore(LoraSettings(), FetchSettings(), settings.cache_dir)
        self.loras = LoraManager(loras)
        # Graphs torch.compile built, and those built after warm-up (exported on /ready and /metrics).
        self.compile_counter = CompileCounter()

    def load(self) -> None:
        for manifest in self.registry.models:
            with LOAD_LOCK:  # see loading.py: concurrent from_pretrained calls corrupt each other
                self._pipes[manifest.id] = load_pipeline(manifest, self.settings, self.device)
                # Attention backend, fused QKV; then fp8, offload or the move to the device, VAE slicing:
                # all before the LoRA slots and the img2img pipeline.
                optimize.prepare(manifest, self._pipes[manifest.id])
                placement.place(manifest, self._pipes[manifest.id], self.device)
                self._load_conditioning(manifest)
            if manifest.capabilities.loras:
                # A compiled transformer always gets hotswap slots (registry.ModelManifest.uses_lora_slots).
                self.loras.prepare(manifest.id, self._pipes[manifest.id],
                                   hotswap=manifest.uses_lora_slots(self.loras.settings))
            # Last, so the compiled graphs already hold the LoRA slots (switching LoRAs: no recompile).
            optimize.compile_modules(manifest, self._pipes[manifest.id], self.settings)
        self._checkers = load_image_checkers(
            self.registry, self.safety, self.settings.cache_dir, self.device
        )

    def warmup(self, max_batch_images: int = 1, max_batch_pixels: int | None = None) -> int:
        """Calls per model before the worker is ready, so the first user request does not pay for lazy
        init or compilation: each of the manifest's engine.warmup sizes at each sequence bucket (by
        default one 64x64 call), for a compiled model at the batch sizes the scheduler can form
        (``max_batch_images`` / ``max_batch_pixels``: the scheduler's settings; optimize.warmup_plan),
        then one small call per conditioning path. Then the compile counter starts counting recompiles
        (and with engine.fail_on_recompile refuses them). Returns how many pipeline calls it ran."""
        calls = 0
        images: list[list[Image.Image]] = []
        for manifest in self.registry.models:
            for width, height, steps, length, batch in optimize.warmup_plan(manifest, max_batch_images,
                                                                             max_batch_pixels):
                started = time.perf_counter()
                params = GenerationParams(
                    model=manifest.id, prompt="warm-up", width=width, height=height, steps=steps,
                    guidance_scale=manifest.defaults.guidance_scale, seeds=tuple(range(batch)),
                    max_sequence_length=length,
                )
                images = self.generate([params]).images
                calls += 1
                log.info(
                    "warm-up model=%s size=%dx%d steps=%d max_sequence_length=%d batch=%d seconds=%.2f",
                    manifest.id, width, height, steps, length, batch, time.perf_counter() - started,
                )
            params = GenerationParams(
                model=manifest.id, prompt="warm-up", width=64, height=64, steps=1,
                guidance_scale=manifest.defaults.guidance_scale, seeds=(0,),
                max_sequence_length=manifest.defaults.max_sequence_length,
            )
            calls += self._warm_conditioning(params)
            checker = self._checkers.get(manifest.id)
            if checker is not None:
                checker.check(images[0])
        self.compile_counter.mark_ready(self.settings.fail_on_recompile,
                                        any(optimize.compiles(m) for m in self.registry.models))
        return calls

    def compile_report(self) -> dict[str, Any]:
        """``graphs`` torch.compile built in this process, ``recompiles_after_ready`` (graphs built after
        warm-up: each a request that paid for a compile) and the compile ``stance``."""
        return self.compile_counter.snapshot()

    def generate(self, batch: Sequence[GenerationParams]) -> Generation:
        """Run compatible requests as one pipeline call: each request's images in order, and the call's
        text_encode / denoise / vae_decode seconds (server/engine/timing.py)."""
        first = batch[0]
        keys = {p.batch_key() for p in batch}
        if len(keys) != 1:
            raise ValueError("a batch must hold compatible requests only")
        pipe = self._pipes[first.model]

        prompts = [p.prompt for p in batch for _ in p.seeds]
        seeds = [seed for p in batch for seed in p.seeds]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs: dict[str, Any] = {"prompt": prompts}
        if first.negative_prompt is not None:
            kwargs["negative_prompt"] = [p.negative_prompt for p in batch for _ in p.seeds]
            kwargs["true_cfg_scale"] = first.true_cfg_scale
        # The batch's LoRA set (one per batch: it is in the batch key), or none: nothing else stays active.
        self.loras.activate(first.model, first.loras)
        pipe = self._conditioned(pipe, batch, kwargs)

        tiling = placement.vae_tiling(pipe, first.width, first.height,
                                      self.registry.get(first.model).engine.vae_tiling_pixels)
        with torch.inference_mode(), tiling, stage_timer(pipe, self.device) as stage_times:
            if first.conditioning in ("redux", "img2img+redux"):
                self._add_redux_tokens(pipe, batch, kwargs)
            try:
                images = pipe(
                    height=first.height,
                    width=first.width,
                    num_inference_steps=first.steps,
                    guidance_scale=first.guidance_scale,
                    generator=generators,
                    max_sequence_length=first.max_sequence_length,
                    output_type="pil",
                    **kwargs,
                ).images
            except RuntimeError as exc:
                if RECOMPILE_REFUSED not in str(exc):
                    raise
                raise InvalidRequest(
                    f"{first.model} is compiled for the shapes its warm-up ran, and this request's "
                    f"({first.width}x{first.height}, {len(generators)} images per call, text length "
                    f"{first.max_sequence_length}) would compile anew, which this server refuses "
                    "(engine.fail_on_recompile); use a size of the model's engine.warmup.sizes",
                    param="width") from None
        out: list[list[Image.Image]] = []
        start = 0
        for params in batch:
            out.append(images[start : start + params.n])
            start += params.n
        return Generation(out, stage_times.as_dict())

    # -- image conditioning (image_url, reference_images) --------------------------------------------

    def _load_conditioning(self, manifest: ModelManifest) -> None:
        pipe = self._pipes[manifest.id]
        if manifest.family == "flux" and manifest.capabilities.image_to_image:
            from diffusers import FluxImg2ImgPipeline

            # Same modules, no copy: img2img is another way of calling the loaded model.
            img2img = FluxImg2ImgPipeline.from_pipe(pipe)
            img2img.set_progress_bar_config(disable=True)
            self._img2img[manifest.id] = img2img
        if manifest.redux_prior is not None:
            self._redux[manifest.id] = load_redux_prior(manifest, self.settings, self.device)

    def _warm_conditioning(self, text: GenerationParams) -> int:
        """One call per conditioning path a model has, with a plain grey image; returns how many."""
        from PIL import Image as PILImage

        grey = ConditioningImage.from_pil(PILImage.new("RGB", (text.width, text.height), (128, 128, 128)))
        manifest = self.registry.get(text.model)
        variants: list[dict[str, Any]] = []
        if text.model in self._img2img:
            variants.append({"conditioning": "img2img", "image": grey,
                             "strength": manifest.defaults.img2img_strength})
        if manifest.family == "flux-kontext":
            variants.append({"conditioning": "kontext", "image": grey})
        if text.model in self._redux:
            variants.append({"conditioning": "redux", "references": (grey,)})
        for changes in variants:
            self.generate([dataclasses.replace(text, **changes)])
        return len(variants)

    def _conditioned(self, pipe: Any, batch: Sequence[GenerationParams], kwargs: dict[str, Any]) -> Any:
        """The pipeline for the batch's conditioning, with its per-image input images in ``kwargs``."""
        first = batch[0]
        if first.conditioning in ("img2img", "img2img+redux"):
            inputs: list[Image.Image] = []
            for p in batch:
                assert p.image is not None  # img2img is in the batch key: every request has its input image
                inputs += [p.image.to_pil()] * p.n
            kwargs["image"] = inputs
            # diffusers runs the last int(steps x strength) steps; skip at least one, or the input image
            # would be fully re-noised (e.g. strength 0.8 at 4 steps) and silently ignored.
            strength = first.strength or 1.0
            if first.steps >= 2:
                strength = min(strength, (first.steps - 1 - 1e-6) / first.steps)
            kwargs["strength"] = strength
            return self._img2img[first.model]
        if self.registry.get(first.model).family == "flux-kontext":
            # Kontext rescales its output to max_area unless told the requested size is the area.
            kwargs["max_area"] = first.width * first.height
        if first.conditioning == "kontext":
            # The input image, then the references, side by side: one conditioning image per prompt, all
            # of one height and sized without cropping by the API (server/api/kontext.py), never resized
            # again here.
            per_job = [stitch([i.to_pil() for i in ([p.image] if p.image else []) + list(p.references)])
                       for p in batch]
            kwargs["image"] = [img for p, img in zip(batch, per_job) for _ in p.seeds]
            kwargs["_auto_resize"] = False
        return pipe

    def _add_redux_tokens(self, pipe: Any, batch: Sequence[GenerationParams], kwargs: dict[str, Any]) -> None:
        """Replace the prompts by their embeddings with each request's Redux image tokens appended."""
        first = batch[0]
        prior = self._redux[first.model]
        device = pipe._execution_device
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            prompt=kwargs.pop("prompt"), prompt_2=None, device=device,
            max_sequence_length=first.max_sequence_length,
        )
        # One SigLIP call for every reference in the batch; each request's tokens, in order, follow
        # its prompt tokens (several references: their tokens one after another).
        refs = [r.to_pil() for p in batch for r in p.references]
        tokens = prior.image_embedder(prior.encode_image(refs, device, 1)).image_embeds
        tokens = tokens.to(device=device, dtype=prompt_embeds.dtype)
        per_ref = len(first.references)
        rows = []
        for j, p in enumerate(batch):
            job_tokens = tokens[j * per_ref : (j + 1) * per_ref].reshape(1, -1, tokens.shape[-1])
            rows += [job_tokens] * p.n
        kwargs["prompt_embeds"] = torch.cat([prompt_embeds, torch.cat(rows, dim=0)], dim=1)
        kwargs["pooled_prompt_embeds"] = pooled

    def screen(
        self, batch: Sequence[GenerationParams], outputs: Sequence[Sequence[Image.Image]]
    ) -> list[DarkroomError | None]:
        """The image safety stage: one checker call for the batch; per request, None or its refusal."""
        checker = self._checkers.get(batch[0].model) if batch else None
        return screen_batch(checker, batch, outputs, self.safety_counters)
