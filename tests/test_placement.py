"""Where weights live (server/engine/placement.py) and the in-memory random builtins, on CPU.

fp8 cannot run here (no CUDA), so its order is checked with a stand-in quantizer and ``meta`` as the
target device: each transformer part must be quantized as soon as it lands, before the next one moves
(the device's peak is then the fp8 transformer plus one bf16 block). The capability check runs against a
patched ``torch.cuda``. Model offload runs for real on CPU (diffusers' hooks with the CPU as the execution
device); sequential offload needs CUDA and is checked with a stand-in pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo.utils as dynamo_utils

from server.engine import placement
from server.engine.optimize import EngineOptionError
from server.params import GenerationParams

from .conftest import MODEL, mean_abs_diff
from .support.engines import cpu_engine, tiny_manifest


def params(**changes: Any) -> GenerationParams:
    base: dict[str, Any] = dict(model=MODEL, prompt="a red fox in the snow", width=64, height=64, steps=1,
                                guidance_scale=3.5, seeds=(11,), max_sequence_length=32)
    return GenerationParams(**{**base, **changes})


def test_fp8_quantizes_each_part_as_it_lands(tiny_cache: Path) -> None:
    from diffusers import FluxTransformer2DModel

    from server.engine.tiny import ensure_tiny_flux

    folder = ensure_tiny_flux(tiny_cache)
    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    parts = placement.transformer_parts(transformer)
    # The parts hold every parameter of the transformer, each once.
    assert sum(p.numel() for part in parts for p in part.parameters()) == sum(
        p.numel() for p in transformer.parameters())
    seen: list[int] = []

    def quantize(part: torch.nn.Module) -> None:
        i = next(j for j, p in enumerate(parts) if p is part)
        # This part is on the device; every later part is still on the CPU; earlier ones are quantized.
        assert all(p.is_meta for p in part.parameters())
        assert all(not p.is_meta for later in parts[i + 1:] for p in later.parameters())
        assert seen == list(range(i))
        seen.append(i)

    placement.place_transformer(transformer, "meta", quantize)
    assert seen == list(range(len(parts))) and len(parts) >= 4  # blocks first, then embedders and outputs


def test_fp8_needs_torchao_and_compute_capability_8_9(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EngineOptionError, match="compute capability 8.9.*this worker's device is cpu"):
        placement.require_fp8_device("m", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(EngineOptionError, match=r"cuda:0 is NVIDIA A100-SXM4-80GB \(8\.0\).*remove engine"):
        placement.require_fp8_device("m", "cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    placement.require_fp8_device("m", "cuda:0")  # L4 / L40S / RTX 4090: accepted
    # Checked at start, before any part moves: a refused fp8 leaves the CPU copy where it was.
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(EngineOptionError, match="torchao"):
            placement.fp8_quantizer("m", "cuda:0")


class _Stub:
    """A pipeline stand-in recording what placement asks of it."""

    def __init__(self) -> None:
        self.transformer = torch.nn.Sequential(torch.nn.Linear(4, 4))
        self.calls: list[tuple[str, Any]] = []
        stub = self

        class Vae:
            def enable_slicing(self) -> None:
                stub.calls.append(("vae.enable_slicing", None))

        self.vae = Vae()

    def to(self, device: str) -> None:
        self.calls.append(("to", device))

    def enable_model_cpu_offload(self, device: str) -> None:
        self.calls.append(("enable_model_cpu_offload", device))

    def enable_sequential_cpu_offload(self, device: str) -> None:
        self.calls.append(("enable_sequential_cpu_offload", device))


def test_offload_modes_reach_diffusers() -> None:
    for mode in ("model", "sequential"):
        expected = f"enable_{mode}_cpu_offload"
        stub = _Stub()
        placement.place(tiny_manifest({"offload": mode}), stub, "cuda:1")
        assert stub.calls == [(expected, "cuda:1"), ("vae.enable_slicing", None)]
        assert next(stub.transformer.parameters()).device.type == "cpu"  # left to the offload hooks
    stub = _Stub()
    placement.place(tiny_manifest(), stub, "cpu")
    assert stub.calls == [("to", "cpu"), ("vae.enable_slicing", None)]
    with pytest.raises(EngineOptionError, match="sequential needs a CUDA device"):
        placement.place(tiny_manifest({"offload": "sequential"}), _Stub(), "cpu")
    with pytest.raises(ValueError, match="offload: sequential .* cannot be combined"):
        tiny_manifest({"offload": "sequential", "compile": {"transformer": "regional"}})


def test_model_offload_serves_the_same_images(tiny_cache: Path) -> None:
    plain = cpu_engine(tiny_manifest(), tiny_cache)
    offloaded = cpu_engine(tiny_manifest({"offload": "model"}), tiny_cache)
    pipe = offloaded.pipeline(MODEL)
    assert pipe._all_hooks  # diffusers' offload hooks are in place
    assert pipe.vae.use_slicing and plain.pipeline(MODEL).vae.use_slicing
    a, b = plain.generate([params(seeds=(1, 2))]).images[0], offloaded.generate([params(seeds=(1, 2))]).images[0]
    assert [mean_abs_diff(x, y) for x, y in zip(a, b)] == [0.0, 0.0]


def test_vae_tiles_above_the_threshold_and_compiles_nothing_for_it(tiny_cache: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKL

    tiled: list[tuple[int, ...]] = []
    original = AutoencoderKL.tiled_decode

    def counting(self: Any, z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        tiled.append(tuple(z.shape))
        return original(self, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "tiled_decode", counting)
    engine = cpu_engine(tiny_manifest({"vae_tiling_pixels": 64 * 64,
                                  "compile": {"vae_decoder": True, "backend": "eager"}}), tiny_cache)
    vae = engine.pipeline(MODEL).vae
    (small,) = engine.generate([params()]).images[0]  # at the threshold: decoded whole (and compiled)
    assert tiled == [] and small.size == (64, 64)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    (large,) = engine.generate([params(width=96, height=96)]).images[0]  # above it: tiles (the tiny VAE's are 64 px)
    assert tiled == [(1, 4, 12, 12)] and large.size == (96, 96)
    # The tiles ran eagerly: no graph was compiled for their shapes.
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    assert vae.use_slicing and not vae.use_tiling and "tiled_decode" not in vars(vae)


def test_random_builtin_loads_through_a_manifest(tiny_cache: Path) -> None:
    from server.engine.random_flux import build_random_flux, parameters

    m = tiny_manifest(source={"builtin": "flux-schnell-random-small"}, id="bench/random", aliases=[])
    engine = cpu_engine(m, tiny_cache)
    pipe = engine.pipeline("bench/random")
    config = pipe.transformer.config
    assert (config.in_channels, config.attention_head_dim, config.num_layers, config.num_single_layers) == (
        64, 128, 1, 1)
    assert not config.guidance_embeds and pipe.vae.config.latent_channels == 16
    assert not any(p.is_meta for p in pipe.transformer.parameters())
    (image,) = engine.generate([params(model="bench/random", steps=1)]).images[0]
    assert image.size == (64, 64)
    # Nothing was written: the cache holds no folder for it.
    assert not any("random" in p.name for p in tiny_cache.iterdir())
    # The full-size architectures, on meta (shapes only): FLUX.1-dev's transformer has 11.9 B parameters
    # in 504 Linear layers, T5-v1.1-XXL 4.76 B, CLIP-L 123 M, the VAE 84 M.
    full = build_random_flux("dev", "meta", torch.bfloat16)
    assert 11.9e9 < parameters(full.transformer) < 12.0e9
    assert sum(isinstance(x, torch.nn.Linear) for x in full.transformer.modules()) == 504
    assert 4.76e9 < parameters(full.text_encoder_2) < 4.77e9
    assert 0.12e9 < parameters(full.text_encoder) < 0.13e9 and 0.08e9 < parameters(full.vae) < 0.09e9
