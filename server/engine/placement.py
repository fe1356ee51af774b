"""Where a loaded pipeline's weights live: on the device (fp8-quantized part by part) or CPU-offloaded.

``place`` runs once per model after loading (and after the attention backend / fused QKV, before the LoRA
slots and compilation), in numbered steps:

1. fp8 (``engine.quantize: fp8``): torchao present and the device of compute capability 8.9 or newer,
   checked before anything moves, with an error naming the fix.
2. The transformer goes to the device one part at a time: each block of its two block lists, then each
   other child. A part loaded from disk is moved; a part of a random builtin (on ``meta``) is created
   there (server/engine/random_flux.py). With fp8 each part is quantized as soon as it lands, so the
   device's peak is the fp8 transformer plus one bf16 block, never the bf16 transformer (~24 GB).
3. The other components: ``offload: none`` moves them to the device; ``model`` hands the pipeline to
   diffusers' ``enable_model_cpu_offload`` (each component on the device only while it runs);
   ``sequential`` to ``enable_sequential_cpu_offload`` (layer by layer; CUDA only).
4. VAE slicing: a batch decodes one image at a time, so decode memory does not grow with the batch.

Per call, ``vae_tiling`` decodes in tiles when the image is above ``engine.vae_tiling_pixels``; a compiled
decoder runs its tiles eagerly (tile shapes vary with the image size and would each compile a graph).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..registry import ModelManifest
from .optimize import EngineOptionError
from .random_flux import is_meta, materialize

log = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)

Quantizer = Callable[[torch.nn.Module], None]


def fp8_quantizer(model_id: str, device: str) -> Quantizer:
    """torchao's dynamic float8 with one scale per row for activations and weights, for ``device``.

    ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` (torchao >= 0.10; checked against
    torchao 0.18), the setting diffusers' torchao guide recommends for FLUX. Raises ``EngineOptionError``
    when torchao is missing or the device is not CUDA of compute capability >= 8.9 (H100/H200, L40S, L4,
    RTX 4090): fp8 matmuls need it, and torchao would only fail at the first call otherwise.
    """
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise EngineOptionError(
            f"{model_id}: engine.quantize: fp8 needs the torchao package, which is not installed "
            "(pip install torchao==0.18.*)"
        ) from exc
    require_fp8_device(model_id, device)
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())

    def quantize(module: torch.nn.Module) -> None:
        quantize_(module, config)

    return quantize


def require_fp8_device(model_id: str, device: str) -> None:
    """Refuse fp8 on a device without fp8 matmuls, naming the device and the fix."""
    fix = "remove engine.quantize or serve this model on an H100/H200, L40S, L4 or RTX 4090"
    if not device.startswith("cuda"):
        raise EngineOptionError(
            f"{model_id}: engine.quantize: fp8 needs a CUDA device of compute capability 8.9 or newer; "
            f"this worker's device is {device} ({fix})"
        )
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise EngineOptionError(
            f"{model_id}: engine.quantize: fp8 needs compute capability 8.9 or newer; {device} is {name} "
            f"({capability[0]}.{capability[1]}) ({fix})"
        )


def transformer_parts(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer in the order it is placed: each block of every ``ModuleList``, then every other
    child (embedders, output norm and projection). Together they hold every parameter."""
    parts: list[torch.nn.Module] = []
    rest: list[torch.nn.Module] = []
    for child in transformer.children():
        (parts.extend(child) if isinstance(child, torch.nn.ModuleList) else rest.append(child))
    own = list(transformer.parameters(recurse=False))
    if own:
        raise TypeError(f"{type(transformer).__name__} holds parameters outside its children")
    return parts + rest


def place_transformer(transformer: torch.nn.Module, device: str, quantize: Quantizer | None) -> None:
    """Move (or materialise) the transformer onto ``device`` part by part, quantizing each as it lands."""
    for part in transformer_parts(transformer):
        if is_meta(part):
            materialize(part, device)
        else:
            part.to(device)
        if quantize is not None:
            quantize(part)


def place(manifest: ModelManifest, pipe: Any, device: str, quantize: Quantizer | None = None) -> None:
    """Put a loaded pipeline where ``manifest.engine`` says (the steps are in the module docstring).

    ``quantize``: the fp8 quantizer to use (default: torchao's, see :func:`fp8_quantizer`); tests pass
    a stand-in. Raises ``EngineOptionError`` for an option this device cannot serve.
    """
    options = manifest.engine
    started = time.perf_counter()
    # 1. fp8: checked before anything moves.
    if options.quantize == "fp8" and quantize is None:
        quantize = fp8_quantizer(manifest.id, device)
    elif options.quantize != "fp8":
        quantize = None
    if options.offload == "sequential" and not device.startswith("cuda"):
        raise EngineOptionError(
            f"{manifest.id}: engine.offload: sequential needs a CUDA device, not {device}")

    # 2. The transformer, part by part. Offloaded without fp8, it waits on the CPU for its hook.
    transformer = pipe.transformer
    if quantize is not None:
        place_transformer(transformer, device, quantize)
    elif options.offload == "none":
        place_transformer(transformer, device, None)
    elif is_meta(transformer):
        place_transformer(transformer, "cpu", None)

    # 3. Everything else.
    if options.offload == "none":
        pipe.to(device)
    elif options.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)

    # 4. Decode a batch image by image.
    pipe.vae.enable_slicing()
    log.info("model placed model=%s device=%s quantize=%s offload=%s seconds=%.2f", manifest.id, device,
             options.quantize, options.offload, time.perf_counter() - started)


@contextlib.contextmanager
def vae_tiling(pipe: Any, width: int, height: int, threshold: int) -> Iterator[bool]:
    """Decode this call in tiles when ``width x height > threshold``; yields whether it does.

    diffusers tiles only images larger than the VAE's tile (1024 px for FLUX.1) on a side, so at most
    one tile's activations are alive at a time. Under ``torch.compile`` the tiles run eagerly: their
    shapes depend on the image size, and each new one would compile a graph after warm-up.
    """
    vae = pipe.vae
    if width * height <= threshold:
        yield False
        return
    vae.enable_tiling()
    original = vae.tiled_decode

    def eager_tiled_decode(*args: Any, **kwargs: Any) -> Any:
        with torch.compiler.set_stance("force_eager"):
            return original(*args, **kwargs)

    vae.tiled_decode = eager_tiled_decode
    try:
        yield True
    finally:
        del vae.tiled_decode
        vae.disable_tiling()
