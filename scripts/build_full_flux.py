"""Build a full-size FLUX.1-schnell or FLUX.1-dev pipeline with random weights, offline, in diffusers format.

Nothing is downloaded: the architectures are the published configs (transformer: 19 double + 38 single
blocks, hidden 3072 = 24 heads x 128, joint_attention_dim 4096, pooled 768, in_channels 64; T5-v1.1-XXL
encoder; CLIP-L text model; the 16-channel FLUX VAE), kept in server/engine/random_flux.py, which also builds
them in memory, with no disk at all, for a manifest's ``source: {builtin: flux-schnell-random}``. Built
directly on the given device in bfloat16 and saved so that Darkroom serves them through a manifest with ``source.path``. Random weights cost the same
FLOPs as real ones; their images are noise. The tokenizers are the offline ones of the tiny model
(server/engine/tiny.py): they yield other token ids than the real ones, never other sequence lengths,
because FLUX pads every prompt to max_sequence_length.

    python scripts/build_full_flux.py --variant schnell --device cuda --out /data/flux-schnell-random
    python scripts/build_full_flux.py --variant dev --device cpu --scale-down --out /tmp/flux-smoke

``--scale-down`` keeps every component's structure but makes it small (one block of each kind, narrow
widths) so the script itself runs anywhere in seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.random_flux import build_random_flux, materialize, parameters  # noqa: E402


def build(variant: str, device: str, dtype: torch.dtype, scale_down: bool, seed: int) -> Any:
    """The architecture of server/engine/random_flux.py (the configs live there), built on ``device``."""
    pipe = build_random_flux(variant, device, dtype, scale_down=scale_down, seed=seed)
    materialize(pipe.transformer, device)  # created on meta in ``dtype``; now on the device
    return pipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=["schnell", "dev"], default="schnell")
    parser.add_argument("--device", default="cuda", help="where the weights are created (cuda, cuda:1, cpu)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (diffusers layout)")
    parser.add_argument("--scale-down", action="store_true", help="tiny widths, one block each: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if (args.out / "model_index.json").is_file():
        print(f"already built: {args.out}")
        return 0
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    pipe = build(args.variant, args.device, dtype, args.scale_down, args.seed)
    counts = {name: parameters(getattr(pipe, name))
              for name in ("transformer", "text_encoder_2", "text_encoder", "vae")}
    built_s = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(args.out), safe_serialization=True)
    info = {
        "variant": args.variant, "scale_down": args.scale_down, "dtype": args.dtype, "device": args.device,
        "parameters": counts, "random_weights": True, "build_seconds": round(built_s, 2),
        "save_seconds": round(time.perf_counter() - started - built_s, 2),
    }
    (args.out / "darkroom_random_weights.json").write_text(json.dumps(info, indent=2) + "\n")
    print("random weights: same FLOPs as real ones (images are noise)")
    for name, count in counts.items():
        print(f"{name:16s} {count / 1e9:8.3f} B parameters")
    print(f"built in {info['build_seconds']}s, saved in {info['save_seconds']}s to {args.out}")
    del pipe
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
