"""What LoRA hotswap slots cost on the full FLUX.1 transformer: memory, and FLOPs on every call.

A slot is a resident rank-r LoRA on each covered layer, computed on every call (LoRA or not) because a
compiled graph cannot skip it: per layer and token, r x (in + out) multiply-adds, and r x (in + out)
parameters. The transformer is built on the ``meta`` device (its shapes only: no memory, no weights), so
this runs anywhere in seconds.

    python scripts/hotswap_cost.py                      # FLUX.1-dev, 1024x1024, the defaults vs the old slots
    python scripts/hotswap_cost.py --rank 64 --slots 4 --size 1024

Token routing (which tokens pass each layer): a double block's image-stream layers see the image tokens,
its context-stream layers (``add_*_proj``, ``to_add_out``, ``ff_context``) the text tokens; single blocks
see both; modulation layers (``norm*.linear``) and the time/guidance/pooled-text embedders see one token
per image (their input is the conditioning vector), the input/output projections the image tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_engine import transformer_flops  # noqa: E402

from server.config import DEFAULT_HOTSWAP_TARGETS  # noqa: E402
from server.engine.lora_slots import covered  # noqa: E402
from server.engine.random_flux import transformer_config  # noqa: E402

CONTEXT_STREAM = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff_context.")


def tokens_through(name: str, image_tokens: int, text_tokens: int) -> int:
    """How many tokens of one image pass the transformer layer ``name`` per step."""
    if name.startswith("transformer_blocks."):
        inner = name.split(".", 2)[2]
        if inner.startswith("norm1"):
            return 1
        return text_tokens if inner.startswith(CONTEXT_STREAM) else image_tokens
    if name.startswith("single_transformer_blocks."):
        return 1 if name.split(".", 2)[2].startswith("norm.") else image_tokens + text_tokens
    if name in ("x_embedder", "proj_out"):
        return image_tokens
    if name == "context_embedder":
        return text_tokens
    return 1  # time_text_embed.*, norm_out.linear: the conditioning vector


def build_transformer(variant: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**transformer_config(variant, scale_down=False))


def cost(transformer: torch.nn.Module, targets: tuple[str, ...] | None, rank: int, slots: int,
         image_tokens: int, text_tokens: int) -> dict[str, Any]:
    """Slots of ``rank`` on the layers ``targets`` covers (None: every Linear of the transformer)."""
    layers = params = macs = 0
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if targets is not None and not covered(name, targets):
            continue
        layers += 1
        per_slot = rank * (module.in_features + module.out_features)
        params += per_slot * slots
        macs += per_slot * slots * tokens_through(name, image_tokens, text_tokens)
    return {"layers": layers, "params": params, "bytes_bf16": 2 * params, "flops_per_step": 2 * macs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=["dev", "schnell"], default="dev")
    parser.add_argument("--size", type=int, default=1024, help="width = height in pixels")
    parser.add_argument("--text-tokens", type=int, help="default: 512 dev, 256 schnell")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--slots", type=int, default=2)
    args = parser.parse_args(argv)
    text = args.text_tokens or (512 if args.variant == "dev" else 256)
    image = (args.size // 16) ** 2
    transformer = build_transformer(args.variant)
    config = transformer_config(args.variant, scale_down=False)
    base = transformer_flops(config, args.size, args.size, text)
    rows = [
        ("before: every Linear, rank 64 x 4 slots", cost(transformer, None, 64, 4, image, text)),
        (f"now: LoRA layers, rank {args.rank} x {args.slots} slots",
         cost(transformer, DEFAULT_HOTSWAP_TARGETS, args.rank, args.slots, image, text)),
        (f"one slot of rank {args.rank} on the LoRA layers",
         cost(transformer, DEFAULT_HOTSWAP_TARGETS, args.rank, 1, image, text)),
    ]
    print(f"FLUX.1-{args.variant} transformer, {args.size}x{args.size} ({image} image + {text} text tokens); "
          f"base {base / 1e12:.2f} TFLOP per image per step")
    header = f"{'slots':44s} {'layers':>6s} {'params M':>9s} {'GiB bf16':>9s} {'TFLOP/step':>10s} {'% FLOPs':>8s}"
    print(header)
    print("-" * len(header))
    for label, row in rows:
        print(f"{label:44s} {row['layers']:6d} {row['params'] / 1e6:9.1f} {row['bytes_bf16'] / 2**30:9.3f} "
              f"{row['flops_per_step'] / 1e12:10.3f} {100 * row['flops_per_step'] / base:8.2f}")
    print("Every slot runs on every call (a LoRA or none); the FLOPs are the LoRA matmuls' (rank-thin, so "
          "they take more time than their share of FLOPs on a GPU).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
