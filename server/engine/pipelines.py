"""Diffusers pipelines for the served models, one set per device, and the batched call.

The same loading code serves the tiny built-in model, a local folder and a Hub id: only where the
weights come from differs. A batch is one pipeline call with one prompt and one generator per image,
so an image depends on its own seed and prompt, not on what it was batched with.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import EngineSettings, SafetySettings
from ..errors import DarkroomError
from ..images import stitch
from ..loras import LoraStore, parse_source
from ..metrics import SafetyCounters
from ..params import ConditioningImage, GenerationParams
from ..registry import ModelManifest, Registry
from . import optimize
from .adapters import LoraManager
from .loading import LOAD_LOCK
from .prompt_cache import PromptCache
from .safety import ImageChecker, load_image_checkers, screen_batch
from .timing import Generation, stage_timer
from .weights import resolve_dtype, source_location

log = logging.getLogger(__name__)

def resolve_devices(requested: Sequence[str]) -> list[str]:
    """Expand ``auto`` into every CUDA device, or the CPU when there is none. A GPU named twice gets one
    worker; ``cpu`` named N times gets N workers (e.g. ``[cpu, cpu]``: two worker processes on one host)."""
    out: list[str] = []
    for name in requested:
        if name == "auto":
            expanded = ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available()
                        else ["cpu"])
        else:
            expanded = [name]
        for device in expanded:
            if device in out and (device != "cpu" or name == "auto"):
                continue
            out.append(device)
    return out


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

    location, kwargs = weights_location(manifest, settings.cache_dir)
    dtype = resolve_dtype(manifest.dtype, device)
    started = time.perf_counter()
    # FLUX.1 Kontext has FLUX.1's components; only the pipeline (how the input image enters) differs.
    cls = FluxKontextPipeline if manifest.family == "flux-kontext" else FluxPipeline
    pipe = cls.from_pretrained(location, dtype=dtype, **kwargs)
    pipe.to(device)
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
    """The pipelines of one device. ``generate`` is called from that device's worker thread only; ``screen``
    from its post-processing thread (server/worker/post.py; the checkers are models of their own); the
    LoRA file methods from its prefetch pool (server/worker/prefetch.py)."""

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
        # Repeated prompts skip the text encoders (server/engine/prompt_cache.py).
        self.prompts = PromptCache(settings.prompt_cache_bytes)

    def load(self) -> None:
        for manifest in self.registry.models:
            with LOAD_LOCK:  # see loading.py: concurrent from_pretrained calls corrupt each other
                self._pipes[manifest.id] = load_pipeline(manifest, self.settings, self.device)
                # Attention backend, fused QKV, fp8: before the LoRA slots and the img2img pipeline.
                optimize.prepare(manifest, self._pipes[manifest.id], self.device)
                self._load_conditioning(manifest)
            if manifest.capabilities.loras:
                self.loras.prepare(manifest.id, self._pipes[manifest.id])
            # Last, so the compiled graphs already hold the LoRA slots (switching LoRAs: no recompile).
            optimize.compile_modules(manifest, self._pipes[manifest.id], self.settings.cache_dir)
        self._checkers = load_image_checkers(
            self.registry, self.safety, self.settings.cache_dir, self.device
        )

    def warmup(self) -> int:
        """Calls per model before the worker is ready, so the first user request does not pay for lazy
        init or compilation: each of the manifest's engine.warmup sizes at each sequence bucket (by
        default one 64x64 call), then one small call per conditioning path. Returns how many pipeline
        calls it ran."""
        calls = 0
        for manifest in self.registry.models:
            for width, height, steps, length in optimize.warmup_plan(manifest):
                started = time.perf_counter()
                params = GenerationParams(
                    model=manifest.id, prompt="warm-up", width=width, height=height, steps=steps,
                    guidance_scale=manifest.defaults.guidance_scale, seeds=(0,),
                    max_sequence_length=length,
                )
                images = self.generate([params]).images
                calls += 1
                log.info(
                    "warm-up model=%s size=%dx%d steps=%d max_sequence_length=%d seconds=%.2f",
                    manifest.id, width, height, steps, length, time.perf_counter() - started,
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
        return calls

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

        with torch.inference_mode(), stage_timer(pipe, self.device) as stage_times:
            # After the LoRAs are active: a LoRA's text-encoder weights are part of the embeddings.
            self._embed_prompts(pipe, first, kwargs)
            if first.conditioning in ("redux", "img2img+redux"):
                self._add_redux_tokens(pipe, batch, kwargs)
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
            # The input image, then the references, side by side: one conditioning image per prompt,
            # all of the output's height (prepared so by the API), never resized again here.
            per_job = [stitch([i.to_pil() for i in ([p.image] if p.image else []) + list(p.references)])
                       for p in batch]
            kwargs["image"] = [img for p, img in zip(batch, per_job) for _ in p.seeds]
            kwargs["_auto_resize"] = False
        return pipe

    def _embed_prompts(self, pipe: Any, first: GenerationParams, kwargs: dict[str, Any]) -> None:
        """Replace the prompts (and negative prompts) in ``kwargs`` by their embeddings, from the prompt cache
        where it has them; nothing changes with the cache off (``engine.prompt_cache_bytes: 0``)."""
        if not self.prompts.enabled or self.registry.get(first.model).family not in ("flux", "flux-kontext"):
            return
        device = pipe._execution_device
        fields = [("prompt", "prompt_embeds", "pooled_prompt_embeds")]
        # With Redux the prompt embeddings gain image tokens, and diffusers refuses negative embeddings of
        # another shape: negative prompts then stay strings, encoded by the pipeline.
        if "redux" not in first.conditioning:
            fields.append(("negative_prompt", "negative_prompt_embeds", "negative_pooled_prompt_embeds"))
        for field, embeds, pooled in fields:
            if field in kwargs:
                kwargs[embeds], kwargs[pooled] = self.prompts.embeddings(
                    pipe, first.model, kwargs.pop(field), first.max_sequence_length, first.loras, device)

    def _add_redux_tokens(self, pipe: Any, batch: Sequence[GenerationParams], kwargs: dict[str, Any]) -> None:
        """Append each request's Redux image tokens to its prompt embeddings."""
        first = batch[0]
        prior = self._redux[first.model]
        device = pipe._execution_device
        if "prompt_embeds" in kwargs:  # from the prompt cache
            prompt_embeds, pooled = kwargs.pop("prompt_embeds"), kwargs.pop("pooled_prompt_embeds")
        else:
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

    # -- what the worker's stages need beside generate (server/worker/loop.py DeviceEngine) ------------

    def loras_ready(self, params: GenerationParams) -> bool:
        """Whether every LoRA file of ``params`` is on this machine: registered, or in the disk cache."""
        store = self.loras.store
        return all(parse_source(ref.path, store.settings).local is not None
                   or store.file_for(ref.path).is_file() for ref in params.loras)

    def fetch_loras(self, params: GenerationParams) -> None:
        """Download the LoRA files of ``params`` into the disk cache (the worker's prefetch pool)."""
        self.loras.store.prefetch(params.loras)

    def free_memory(self) -> None:
        """After an out-of-memory error: drop garbage and the CUDA caching allocator's free blocks."""
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def stats(self) -> dict[str, float]:
        return self.prompts.stats()

    def screen(
        self, batch: Sequence[GenerationParams], outputs: Sequence[Sequence[Image.Image]]
    ) -> list[DarkroomError | None]:
        """The image safety stage: one checker call for the batch; per request, None or its refusal."""
        checker = self._checkers.get(batch[0].model) if batch else None
        return screen_batch(checker, batch, outputs, self.safety_counters)
