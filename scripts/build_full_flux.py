"""Build a full-size FLUX.1-schnell or FLUX.1-dev pipeline with random weights, offline, in diffusers format.

Nothing is downloaded: the architectures are the published configs (transformer: 19 double + 38 single
blocks, hidden 3072 = 24 heads x 128, joint_attention_dim 4096, pooled 768, in_channels 64; T5-v1.1-XXL
encoder; CLIP-L text model; the 16-channel FLUX VAE), built directly on the given device in bfloat16 and
saved so that Darkroom serves them through a manifest with ``source.path``. Random weights cost the same
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
import contextlib
import gc
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # noqa: E402

from server.engine.tiny import _clip_tokenizer, _t5_tokenizer  # noqa: E402

# The published configs (black-forest-labs/FLUX.1-schnell and FLUX.1-dev, diffusers layout).
TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
)
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)
SCHEDULER = {
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
}

# --scale-down: the same structure, one block of each kind, narrow widths (head dim and rope axes kept).
SMALL_TRANSFORMER = dict(TRANSFORMER, num_layers=1, num_single_layers=1, num_attention_heads=1,
                         joint_attention_dim=64, pooled_projection_dim=64)
SMALL_T5 = dict(T5_XXL, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
SMALL_CLIP = dict(CLIP_L, hidden_size=64, intermediate_size=128, projection_dim=64, num_hidden_layers=1,
                  num_attention_heads=2)
SMALL_VAE = dict(VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(variant: str, device: str, dtype: torch.dtype, scale_down: bool, seed: int) -> FluxPipeline:
    torch.manual_seed(seed)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    ids = dict(pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
               decoder_start_token_id=t5_tok.pad_token_id)
    clip_ids = dict(bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                    pad_token_id=clip_tok.pad_token_id)
    # Built in place on the device, already in the target dtype: no fp32 copy of 12B parameters anywhere.
    with torch.device(device), default_dtype(dtype):
        transformer = FluxTransformer2DModel(
            **(SMALL_TRANSFORMER if scale_down else TRANSFORMER), guidance_embeds=variant == "dev"
        )
        t5 = T5EncoderModel(T5Config(**(SMALL_T5 if scale_down else T5_XXL), **ids))
        clip = CLIPTextModel(CLIPTextConfig(**(SMALL_CLIP if scale_down else CLIP_L), **clip_ids))
        vae = AutoencoderKL(**(SMALL_VAE if scale_down else VAE))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER[variant]),
        vae=vae.eval(), text_encoder=clip.eval(), tokenizer=clip_tok, text_encoder_2=t5.eval(),
        tokenizer_2=t5_tok, transformer=transformer.eval(),
    )


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
