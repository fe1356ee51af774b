"""Diffusers pipelines for the served models, one set per device, and the batched call.

The same loading code serves the tiny built-in model, a local folder and a Hub id: only where the
weights come from differs. A batch is one pipeline call with one prompt and one generator per image,
so an image depends on its own seed and prompt, not on what it was batched with. What differs between the
model families (pipeline class, conditioning inputs, negative prompts) is each family's runner
(server/engine/families.py).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ..config import EngineSettings, SafetySettings
from ..errors import DarkroomError, InvalidRequest
from ..lora_format import LOADERS
from ..loras import LoraStore
from ..metrics import SafetyCounters
from ..params import GenerationParams
from ..registry import Registry
from . import optimize, placement
from .adapters import LoraManager
from .compile_stats import RECOMPILE_REFUSED, CompileCounter
from .families import load_runner
from .loading import LOAD_LOCK
from .prompt_cache import PromptCache
from .runner import FamilyRunner, SharedModels, per_image
from .safety import ImageChecker, load_image_checkers, screen_batch
from .timing import Generation, stage_timer

log = logging.getLogger(__name__)

# The families whose pipelines encode prompts with FLUX.1's CLIP-L + T5 ``encode_prompt`` and take
# ``prompt_embeds`` / ``pooled_prompt_embeds``: the prompt-embedding cache serves them.
PROMPT_CACHE_FAMILIES = ("flux", "flux-kontext", "flux-control")


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
        # Per model: its family's runner (the pipeline and what its conditioning needs; engine/runner.py).
        self._runners: dict[str, FamilyRunner] = {}
        self._shared = SharedModels(settings, device)
        self._checkers: dict[str, ImageChecker | None] = {}
        self.safety_counters = SafetyCounters()
        # image_loras: the store (shared with the API in `darkroom serve`) and this device's adapters.
        if loras is None:
            from ..config import FetchSettings, LoraSettings

            loras = LoraStore(LoraSettings(), FetchSettings(), settings.cache_dir)
        self.loras = LoraManager(loras)
        # Repeated prompts skip the text encoders (server/engine/prompt_cache.py).
        self.prompts = PromptCache(settings.prompt_cache_bytes)
        # Graphs torch.compile built, and those built after warm-up (exported on /ready and /metrics).
        self.compile_counter = CompileCounter()

    def load(self) -> None:
        for manifest in self.registry.models:
            with LOAD_LOCK:  # see loading.py: concurrent from_pretrained calls corrupt each other
                runner = self._runners[manifest.id] = load_runner(manifest, self.settings, self.device)
                # Attention backend, fused QKV; then fp8, offload or the move to the device, VAE slicing:
                # all before the LoRA slots and the conditioning views (img2img) of the pipeline.
                optimize.prepare(manifest, runner.pipe)
                placement.place(manifest, runner.pipe, self.device)
                runner.attach(self._shared)
            if manifest.capabilities.loras:
                # A compiled transformer always gets hotswap slots (registry.ModelManifest.uses_lora_slots).
                self.loras.prepare(manifest.id, runner.pipe,
                                   hotswap=manifest.uses_lora_slots(self.loras.settings))
            # Last, so the compiled graphs already hold the LoRA slots (switching LoRAs: no recompile).
            optimize.compile_modules(manifest, runner.pipe, self.settings)
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
            runner = self._runners[manifest.id]
            for width, height, steps, length, batch in optimize.warmup_plan(manifest, max_batch_images,
                                                                             max_batch_pixels):
                started = time.perf_counter()
                params = runner.warm_request(GenerationParams(
                    model=manifest.id, prompt="warm-up", width=width, height=height, steps=steps,
                    guidance_scale=manifest.defaults.guidance_scale, seeds=tuple(range(batch)),
                    max_sequence_length=length,
                ))
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
            # One call per further conditioning path, with a plain grey image.
            for variant in runner.warm_variants(params):
                self.generate([variant])
                calls += 1
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

    def pipeline(self, model_id: str) -> Any:
        """A loaded model's main pipeline (benchmarks and tests inspect its modules)."""
        return self._runners[model_id].pipe

    def generate(self, batch: Sequence[GenerationParams]) -> Generation:
        """Run compatible requests as one pipeline call: each request's images in order, and the call's
        text_encode / denoise / vae_decode seconds (server/engine/timing.py)."""
        first = batch[0]
        keys = {p.batch_key() for p in batch}
        if len(keys) != 1:
            raise ValueError("a batch must hold compatible requests only")
        runner = self._runners[first.model]

        seeds = [seed for p in batch for seed in p.seeds]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs: dict[str, Any] = {"prompt": per_image(batch, [p.prompt for p in batch])}
        # The batch's LoRA set (one per batch: it is in the batch key), or none: nothing else stays active.
        self.loras.activate(first.model, first.loras)
        with torch.inference_mode():
            # The family's inputs: conditioning images (control images computed here), negative prompts.
            pipe = runner.route(batch, kwargs)
            tiling = placement.vae_tiling(pipe, first.width, first.height,
                                          self.registry.get(first.model).engine.vae_tiling_pixels)
            with tiling, stage_timer(pipe, self.device) as stage_times:
                # After the LoRAs are active: a LoRA's text-encoder weights are part of the embeddings.
                self._embed_prompts(pipe, first, kwargs)
                runner.embed(pipe, batch, kwargs)
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

    def _embed_prompts(self, pipe: Any, first: GenerationParams, kwargs: dict[str, Any]) -> None:
        """Replace the prompts (and negative prompts) in ``kwargs`` by their embeddings, from the prompt cache
        where it has them; nothing changes with the cache off (``engine.prompt_cache_bytes: 0``) or for a
        family with other text encoders (FLUX.2)."""
        if not self.prompts.enabled or self.registry.get(first.model).family not in PROMPT_CACHE_FAMILIES:
            return
        device = pipe._execution_device
        fields = [("prompt", "prompt_embeds", "pooled_prompt_embeds")]
        # With Redux the prompt embeddings gain image tokens, and diffusers refuses negative embeddings of
        # another shape: negative prompts then stay strings, encoded by the pipeline.
        if "redux" not in first.conditioning:
            fields.append(("negative_prompt", "negative_prompt_embeds", "negative_pooled_prompt_embeds"))
        loras = self.loras.text_encoder_loras(first.model, first.loras)
        for field, embeds, pooled in fields:
            if field in kwargs:
                kwargs[embeds], kwargs[pooled] = self.prompts.embeddings(
                    pipe, first.model, kwargs.pop(field), first.max_sequence_length, loras, device)

    # -- what the worker's stages need beside generate (server/worker/loop.py DeviceEngine) ------------

    def loras_ready(self, params: GenerationParams) -> bool:
        """Whether every LoRA file of ``params`` is on this machine: registered, or in the disk cache."""
        return all(self.loras.store.on_disk(ref.path) for ref in params.loras)

    def fetch_loras(self, params: GenerationParams) -> None:
        """Download the LoRA files of ``params`` into the disk cache (the worker's prefetch pool), checked as
        the model's diffusers loader converts them (as the API's prefetch does)."""
        self.loras.store.prefetch(params.loras, LOADERS.get(self.registry.get(params.model).family))

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
