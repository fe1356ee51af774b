"""Random-weight LoRAs for the tiny FLUX (server/engine/tiny.py), for tests and benchmarks of ``image_loras``.

Test fixtures, not server code: diffusers/peft format (``tiny_flux_lora``; FLUX.2: ``tiny_flux2_lora``, and
``tiny_flux2_lora_ai_toolkit`` in BFL names), kohya format with the original
FLUX layer names (``tiny_flux_lora_kohya``), a CLIP text-encoder LoRA (``tiny_clip_lora``), and a Stable
Diffusion UNet LoRA that a FLUX server must refuse (``sd_unet_lora``); ``lora_file_bytes`` makes a
.safetensors file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from server.config import FetchSettings, LoraSettings
from server.engine.tiny import TEXT_DIM
from server.loras import LoraStore

# Layer name -> (in_features, out_features) of the tiny FLUX transformer's Linear layers that LoRAs
# usually target (attention and feed-forward of the double and single blocks).
TINY_FLUX_LORA_LAYERS: dict[str, tuple[int, int]] = {
    **{f"transformer_blocks.0.attn.{n}": (32, 32) for n in (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")},
    "transformer_blocks.0.ff.net.0.proj": (32, 128),
    "transformer_blocks.0.ff.net.2": (128, 32),
    "transformer_blocks.0.ff_context.net.0.proj": (32, 128),
    "transformer_blocks.0.ff_context.net.2": (128, 32),
    **{f"single_transformer_blocks.0.attn.{n}": (32, 32) for n in ("to_q", "to_k", "to_v")},
    "single_transformer_blocks.0.proj_mlp": (32, 128),
    "single_transformer_blocks.0.proj_out": (160, 32),
}


def tiny_flux_lora(seed: int, rank: int = 4, gain: float = 1.0,
                   layers: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """A random LoRA for the tiny FLUX in diffusers/peft format (``transformer.<layer>.lora_A/B.weight``).

    B is random too (trained LoRAs start it at zero), scaled by ``gain``: at 1.0 the images change
    visibly (tens of grey levels on average), so tests can tell LoRAs, scales and no-LoRA apart.
    """
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in layers or tuple(TINY_FLUX_LORA_LAYERS):
        fan_in, fan_out = TINY_FLUX_LORA_LAYERS[name]
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * gain
    return state


# The tiny FLUX's layers in the original (BFL) layout that kohya and ComfyUI LoRAs name: name -> (in, out);
# qkv is fused there (diffusers splits it into to_q, to_k, to_v).
TINY_BFL_LAYERS: dict[str, tuple[int, int]] = {
    "double_blocks.0.img_attn.qkv": (32, 96),
    "double_blocks.0.img_attn.proj": (32, 32),
    "double_blocks.0.img_mlp.0": (32, 128),
    "double_blocks.0.txt_attn.proj": (32, 32),
    "single_blocks.0.linear2": (160, 32),
}
# The same layers as diffusers names them (a fused layer: its parts, in order).
BFL_TO_DIFFUSERS: dict[str, tuple[str, ...]] = {
    "double_blocks.0.img_attn.qkv": tuple(f"transformer_blocks.0.attn.to_{x}" for x in "qkv"),
    "double_blocks.0.img_attn.proj": ("transformer_blocks.0.attn.to_out.0",),
    "double_blocks.0.img_mlp.0": ("transformer_blocks.0.ff.net.0.proj",),
    "double_blocks.0.txt_attn.proj": ("transformer_blocks.0.attn.to_add_out",),
    "single_blocks.0.linear2": ("single_transformer_blocks.0.proj_out",),
}
# The tiny CLIP-L and T5 attention layers (both 32 wide), as kohya and ComfyUI name them.
CLIP_LAYERS = tuple(f"text_model.encoder.layers.0.self_attn.{n}"
                    for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
T5_LAYERS = tuple(f"encoder.block.0.layer.0.SelfAttention.{n}" for n in "qkvo")


def kohya_lora(layers: dict[str, tuple[int, int]], prefix: str, seed: int, rank: int = 4, gain: float = 2.0,
               alpha: float | None = 2.0, naming: str = "kohya") -> dict[str, torch.Tensor]:
    """A random LoRA in kohya/sd-scripts naming (``<prefix><layer with _>.lora_down.weight``, ``.lora_up``,
    ``.alpha``) or, with ``naming="comfyui"``, ComfyUI's (``<prefix><dotted layer>.lora_down.weight``)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, (fan_in, fan_out) in layers.items():
        key = prefix + (name.replace(".", "_") if naming == "kohya" else name)
        state[f"{key}.lora_down.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        state[f"{key}.lora_up.weight"] = torch.randn(fan_out, rank, generator=gen) * gain
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def tiny_flux_lora_kohya(seed: int, rank: int = 4, gain: float = 2.0, alpha: float = 2.0,
                         naming: str = "kohya") -> dict[str, torch.Tensor]:
    """A random LoRA for the tiny FLUX in kohya (sd-scripts) format, with the original FLUX layer names
    (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``.alpha``, ...) that diffusers converts;
    ``naming="comfyui"``: the same weights as ComfyUI names them (``diffusion_model.double_blocks.0...``)."""
    prefix = "lora_unet_" if naming == "kohya" else "diffusion_model."
    return kohya_lora(TINY_BFL_LAYERS, prefix, seed, rank, gain, alpha, naming)


def kohya_as_diffusers(state: dict[str, torch.Tensor], prefix: str = "lora_unet_",
                       target: str = "transformer.") -> dict[str, torch.Tensor]:
    """What a kohya transformer LoRA (``tiny_flux_lora_kohya``) is in diffusers/peft names, computed here as
    sd-scripts defines it (the LoRA acts as up @ down x alpha / rank; a fused layer's up splits by rows), as
    an oracle for diffusers' converter."""
    out: dict[str, torch.Tensor] = {}
    for bfl, parts in BFL_TO_DIFFUSERS.items():
        key = prefix + bfl.replace(".", "_")
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
        scale = float(state[f"{key}.alpha"]) / down.shape[0] if f"{key}.alpha" in state else 1.0
        for part, rows in zip(parts, up.chunk(len(parts), dim=0)):
            out[f"{target}{part}.lora_A.weight"] = down * scale
            out[f"{target}{part}.lora_B.weight"] = rows.contiguous()
    return out


def sd_unet_lora(seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    """A kohya LoRA for a Stable Diffusion UNet: another architecture, which a FLUX server must refuse."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in ("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"):
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, 320, generator=gen)
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(320, rank, generator=gen)
        state[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank))
    return state


def lora_file_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as the bytes of a .safetensors file."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def tiny_clip_lora(seed: int, rank: int = 4, gain: float = 2.0) -> dict[str, torch.Tensor]:
    """A random LoRA for the tiny FLUX's CLIP text encoder only (``text_encoder.<layer>.lora_A/B.weight``)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        key = f"text_encoder.text_model.encoder.layers.0.self_attn.{name}"
        state[f"{key}.lora_A.weight"] = torch.randn(rank, TEXT_DIM, generator=gen) / TEXT_DIM**0.5
        state[f"{key}.lora_B.weight"] = torch.randn(TEXT_DIM, rank, generator=gen) * gain
    return state


# -- FLUX.2 (server/engine/tiny_flux2.py: the tiny [dev] and [klein] transformers have the same layers) --

TINY_FLUX2_LORA_LAYERS: dict[str, tuple[int, int]] = {
    **{f"transformer_blocks.0.attn.{n}": (32, 32) for n in (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")},
    "transformer_blocks.0.ff.linear_in": (32, 128),  # SwiGLU: gate and value halves
    "transformer_blocks.0.ff.linear_out": (64, 32),
    "transformer_blocks.0.ff_context.linear_in": (32, 128),
    "transformer_blocks.0.ff_context.linear_out": (64, 32),
    # The single-stream block's fused projections: q, k, v (3 x 32) and the MLP's SwiGLU input (2 x 64).
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj": (32, 224),
    "single_transformer_blocks.0.attn.to_out": (96, 32),
}


def tiny_flux2_lora(seed: int, rank: int = 4, gain: float = 1.0) -> dict[str, torch.Tensor]:
    """A random LoRA for the tiny FLUX.2 transformers in diffusers/peft format."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, (fan_in, fan_out) in TINY_FLUX2_LORA_LAYERS.items():
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * gain
    return state


def tiny_flux2_lora_ai_toolkit(seed: int, rank: int = 4, gain: float = 1.0
                               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A random LoRA for the tiny FLUX.2 in ai-toolkit format (BFL's layer names under ``diffusion_model.``,
    the format of most FLUX.2 LoRAs on the Hub), and the same LoRA in diffusers format (what diffusers'
    converter must make of it: a fused qkv's A shared by q, k and v, its B split in three)."""
    gen = torch.Generator().manual_seed(seed)
    original: dict[str, torch.Tensor] = {}
    diffusers: dict[str, torch.Tensor] = {}

    def pair(name: str, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        b = torch.randn(fan_out, rank, generator=gen) * gain
        original[f"diffusion_model.{name}.lora_A.weight"] = a
        original[f"diffusion_model.{name}.lora_B.weight"] = b
        return a, b

    for stream, projections in (("img_attn", ("to_q", "to_k", "to_v")),
                                ("txt_attn", ("add_q_proj", "add_k_proj", "add_v_proj"))):
        a, b = pair(f"double_blocks.0.{stream}.qkv", 32, 96)
        for projection, part in zip(projections, b.chunk(3)):
            diffusers[f"transformer.transformer_blocks.0.attn.{projection}.lora_A.weight"] = a.clone()
            diffusers[f"transformer.transformer_blocks.0.attn.{projection}.lora_B.weight"] = part.clone()
    for name, target, fan_in, fan_out in (("linear1", "to_qkv_mlp_proj", 32, 224),
                                          ("linear2", "to_out", 96, 32)):
        a, b = pair(f"single_blocks.0.{name}", fan_in, fan_out)
        diffusers[f"transformer.single_transformer_blocks.0.attn.{target}.lora_A.weight"] = a
        diffusers[f"transformer.single_transformer_blocks.0.attn.{target}.lora_B.weight"] = b
    return original, diffusers


def lora_store(tmp_path: Path, **changes: Any) -> LoraStore:
    """A LoRA store caching in ``tmp_path / "loras"`` that may fetch from loopback origins (the tests'
    ``ImageOrigin``), with ``changes`` to its ``loras.*`` settings."""
    settings = LoraSettings(cache_dir=tmp_path / "loras", **changes)
    return LoraStore(settings, FetchSettings(allow_hosts=["127.0.0.1"]), tmp_path)
