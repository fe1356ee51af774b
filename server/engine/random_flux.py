"""FLUX.1-schnell and FLUX.1-dev at full size with random weights, built in memory on the device.

For benchmarks on a machine that has a GPU but not the real weights (nothing can be downloaded there, and
writing ~34 GB of weights to disk and reading them back does not fit a short device run). A manifest
names one as ``source: {builtin: flux-schnell-random}`` and the engine loads it through the normal path;
only where the modules come from differs. Random weights cost the same FLOPs and memory as real ones;
their images are noise.

The architectures are the published configs (black-forest-labs/FLUX.1-schnell and FLUX.1-dev, diffusers
layout): the transformer has 19 double and 38 single blocks of hidden size 3072 (24 heads x 128),
joint_attention_dim 4096, pooled 768, 64 input channels; the T5-v1.1-XXL encoder (vocabulary 32128);
CLIP-L's text model (vocabulary 49408); the 16-channel FLUX VAE. The ``-small`` builtins keep every
component's structure (one block of each kind, narrow widths, same head dim and rope axes) so a CPU runs
them in seconds.

Where the weights are made: the text encoders and the VAE directly on the device in the target dtype;
the transformer on the ``meta`` device (no memory at all), materialised later part by part by
``server/engine/placement.py`` (``to_empty`` on the device, then each layer's own ``reset_parameters``),
so fp8 quantization can follow each block and the device never holds the whole bf16 transformer when it
need not. The tokenizers are the offline ones of the tiny model (server/engine/tiny.py): their token ids
are all within the real vocabularies, and FLUX pads every prompt to ``max_sequence_length``, so sequence
lengths (and FLOPs) are those of the real tokenizers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
)
T5_XXL: dict[str, Any] = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
)
CLIP_L: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)
VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)
SCHEDULER: dict[str, dict[str, Any]] = {
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
}

# Scaled down: the same structure, one block of each kind, narrow widths (head dim and rope axes kept).
SMALL_TRANSFORMER = dict(TRANSFORMER, num_layers=1, num_single_layers=1, num_attention_heads=1,
                         joint_attention_dim=64, pooled_projection_dim=64)
SMALL_T5 = dict(T5_XXL, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
SMALL_CLIP = dict(CLIP_L, hidden_size=64, intermediate_size=128, projection_dim=64, num_hidden_layers=1,
                  num_attention_heads=2)
SMALL_VAE = dict(VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1)

# builtin name -> (variant, scaled down)
RANDOM_MODELS: dict[str, tuple[str, bool]] = {
    "flux-schnell-random": ("schnell", False),
    "flux-dev-random": ("dev", False),
    "flux-schnell-random-small": ("schnell", True),
    "flux-dev-random-small": ("dev", True),
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def transformer_config(variant: str, scale_down: bool) -> dict[str, Any]:
    """The FluxTransformer2DModel arguments of a variant (dev embeds guidance, schnell does not)."""
    return dict(SMALL_TRANSFORMER if scale_down else TRANSFORMER, guidance_embeds=variant == "dev")


def build_random_flux(variant: str, device: str, dtype: torch.dtype, *, scale_down: bool = False,
                      seed: int = 0, pipeline_cls: Any = None, transformer_on_meta: bool = True) -> Any:
    """A FLUX.1 pipeline (``pipeline_cls``, default ``FluxPipeline``) with random ``dtype`` weights.

    Text encoders and VAE are created on ``device``; the transformer on ``meta`` when
    ``transformer_on_meta`` (materialise it with :func:`materialize`), else on ``device`` too.
    Raises ``ValueError`` for an unknown variant.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .tiny import _clip_tokenizer, _t5_tokenizer

    if variant not in SCHEDULER:
        raise ValueError(f"unknown FLUX.1 variant {variant!r} (schnell or dev)")
    started = time.perf_counter()
    torch.manual_seed(seed)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    t5_ids = dict(pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                  decoder_start_token_id=t5_tok.pad_token_id)
    clip_ids = dict(bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                    pad_token_id=clip_tok.pad_token_id)
    with default_dtype(dtype):
        with torch.device("meta" if transformer_on_meta else device):
            transformer = FluxTransformer2DModel(**transformer_config(variant, scale_down))
        # Created in place on the device, already in the target dtype: no float32 copy anywhere.
        with torch.device(device):
            t5 = T5EncoderModel(T5Config(**(SMALL_T5 if scale_down else T5_XXL), **t5_ids))
            clip = CLIPTextModel(CLIPTextConfig(**(SMALL_CLIP if scale_down else CLIP_L), **clip_ids))
            vae = AutoencoderKL(**(SMALL_VAE if scale_down else VAE))
    cls = pipeline_cls or FluxPipeline
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER[variant]),
        vae=vae.eval(), text_encoder=clip.eval(), tokenizer=clip_tok, text_encoder_2=t5.eval(),
        tokenizer_2=t5_tok, transformer=transformer.eval(),
    )
    log.info("random FLUX.1-%s built%s device=%s dtype=%s seconds=%.2f", variant,
             " (scaled down)" if scale_down else "", device, str(dtype).removeprefix("torch."),
             time.perf_counter() - started)
    return pipe


def is_meta(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is on the meta device (not materialised yet)."""
    return any(p.is_meta for p in module.parameters())


@torch.no_grad()
def materialize(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Allocate a meta module's parameters on ``device`` and give them their layers' own random init.

    Every layer with parameters is re-initialised by its ``reset_parameters`` (Linear: Kaiming-uniform,
    norms: ones), the same as building the module on the device. Raises ``TypeError`` for a layer with
    parameters and no ``reset_parameters`` (its init would be unknown) or a meta buffer (its value would be
    lost).
    """
    if any(b.is_meta for b in module.buffers()):
        raise TypeError(f"{type(module).__name__} has meta buffers, which cannot be re-created")
    module.to_empty(device=device)
    for layer in module.modules():
        if next(layer.parameters(recurse=False), None) is None:
            continue
        reset = getattr(layer, "reset_parameters", None)
        if reset is None:
            raise TypeError(f"{type(layer).__name__} has parameters but no reset_parameters")
        reset()
    return module


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
