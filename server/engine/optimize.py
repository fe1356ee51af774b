"""Per-model engine optimizations from a manifest's ``engine:`` block (server/registry.py EngineOptions).

Around LoRA preparation: ``prepare`` (attention backend, fused QKV) changes the modules, then placement
(server/engine/placement.py: fp8, offload, VAE slicing) puts them on the device, before LoRA hotswap slots
are created; ``compile`` runs last, so a compiled graph already sees the slots
and switching LoRAs recompiles nothing. Every option defaults to off: without an ``engine:`` block a
model runs exactly as before.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..config import EngineSettings
from ..params import images_per_call
from ..registry import EngineOptions, ModelManifest

log = logging.getLogger(__name__)


class EngineOptionError(RuntimeError):
    """An engine option that cannot be applied here (a missing package, a device that lacks support)."""


def prepare(manifest: ModelManifest, pipe: Any) -> None:
    """Attention backend and fused QKV of the transformer (fp8 is applied while placing it on the device:
    server/engine/placement.py)."""
    options = manifest.engine
    transformer = pipe.transformer
    if options.attention_backend:
        try:
            transformer.set_attention_backend(options.attention_backend)
        except Exception as exc:  # noqa: BLE001 - an unknown name or a backend whose package is absent
            raise EngineOptionError(
                f"{manifest.id}: engine.attention_backend {options.attention_backend!r} is not available: {exc}"
            ) from exc
        log.info("attention backend model=%s backend=%s", manifest.id, options.attention_backend)
    if options.fuse_qkv:
        transformer.fuse_qkv_projections()
        log.info("fused qkv projections model=%s", manifest.id)


def compile_cache_dir(options: EngineOptions, settings: EngineSettings) -> Path:
    """The model's compile.cache_dir, else engine.compile_cache_dir, else <engine.cache_dir>/inductor."""
    chosen = options.compile.cache_dir or settings.compile_cache_dir or settings.cache_dir / "inductor"
    return chosen.expanduser().resolve()


def compile_modules(manifest: ModelManifest, pipe: Any, settings: EngineSettings) -> None:
    """torch.compile the transformer (regional or full) and the VAE decoder, with a persistent cache."""
    options = manifest.engine
    spec = options.compile
    if not compiles(manifest):
        return
    inductor_cache = compile_cache_dir(options, settings)
    inductor_cache.mkdir(parents=True, exist_ok=True)
    # Read by inductor whenever it looks for its cache; the FX graph cache makes a restart's compile
    # mostly a cache load. One process-wide value: every model of a server shares it.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if spec.dynamic:
        # One symbol per dimension: with torch's default "duck" shapes, dimensions that happen to be equal
        # at the first call share a symbol, so a sequence bucket equal to a hidden size (128 = 128) would be
        # specialised to it and another bucket would compile again. Process-wide, read while tracing.
        import torch.fx.experimental._config as fx_config

        fx_config.use_duck_shape = False
    kwargs: dict[str, Any] = {"fullgraph": spec.fullgraph, "backend": spec.backend, "dynamic": spec.dynamic}
    if spec.mode:
        kwargs["mode"] = spec.mode
    if spec.transformer == "regional":
        pipe.transformer.compile_repeated_blocks(**kwargs)
    elif spec.transformer == "full":
        pipe.transformer.compile(**kwargs)
    if spec.vae_decoder:
        # Static: with VAE slicing the decoder always sees one image, so only the size varies (warmed).
        pipe.vae.decoder.compile(**{**kwargs, "dynamic": False})
    # torch.compile is lazy: the graphs are built on the first calls, i.e. during the warm-up.
    log.info(
        "compile requested model=%s transformer=%s vae_decoder=%s backend=%s cache=%s",
        manifest.id, spec.transformer, spec.vae_decoder, spec.backend, inductor_cache,
    )


def compiles(manifest: ModelManifest) -> bool:
    spec = manifest.engine.compile
    return spec.transformer != "none" or spec.vae_decoder


def largest_batch(manifest: ModelManifest, width: int, height: int, max_batch_images: int,
                  max_batch_pixels: int | None) -> int:
    """The most images one pipeline call of this size can hold: what the scheduler packs under
    ``scheduler.max_batch_images`` and ``scheduler.max_batch_pixels``, or one request's ``n`` (a job is
    never split, so a lone job up to the model's ``max_n`` runs whole even past the pixel cap)."""
    packed = images_per_call(max_batch_images, max_batch_pixels, width, height)
    return max(1, packed, manifest.limits.max_n)


def warmup_plan(manifest: ModelManifest, max_batch_images: int = 1,
                max_batch_pixels: int | None = None) -> list[tuple[int, int, int, int, int]]:
    """(width, height, steps, max_sequence_length, batch images) of each warm-up call of a model.

    Every configured size at every sequence bucket (and the full length). A compiled model also runs the
    batch sizes the scheduler can form at each size, so that after ``/ready`` no request compiles: with
    ``compile.dynamic`` (symbolic shapes, the default) batch 1 (torch specialises sizes of 1), 2 (the
    symbolic graph) and the largest (its memory peak, and no new graph); with static shapes every batch
    size from 1 to the largest. An eager model warms batch 1 only (there is nothing to compile).
    """
    options = manifest.engine.warmup
    sizes = options.sizes or [(64, 64)]
    lengths = list(dict.fromkeys([*manifest.engine.sequence_buckets, manifest.defaults.max_sequence_length]))
    if not manifest.engine.sequence_buckets:
        lengths = [manifest.defaults.max_sequence_length]
    plan = []
    for w, h in sizes:
        largest = largest_batch(manifest, w, h, max_batch_images, max_batch_pixels) if compiles(manifest) else 1
        if manifest.engine.compile.dynamic is False:
            batches = list(range(1, largest + 1))
        else:
            batches = sorted({1, min(2, largest), largest})
        plan += [(w, h, options.steps, length, batch) for length in lengths for batch in batches]
    return plan
