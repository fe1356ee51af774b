"""Tiny random-weight FLUX.1 Canny/Depth pipelines and a tiny depth-estimation model, built fully offline.

FLUX.1 Canny [dev] and Depth [dev] are FLUX.1 [dev] with a transformer whose input takes the control image's
latents beside the noisy ones (``FluxControlPipeline`` concatenates them on the channel axis): ``in_channels``
is doubled (128 for the real models: 64 packed latent channels each) while ``out_channels`` stays one set
(64). The tiny versions reuse the tiny FLUX.1's text encoders, tokenizers, VAE and scheduler
(``server/engine/tiny.py``) with a control transformer of ``in_channels`` 32 and ``out_channels`` 16, and a
VAE encoder loud enough that the control image's latents differ visibly between inputs.

The depth model stands in for ``LiheYoung/depth-anything-large-hf`` (the model BFL's and diffusers' FLUX.1
Depth examples preprocess with): a ``DepthAnythingForDepthEstimation`` with a two-layer DINOv2 backbone and a
``DPTImageProcessor`` configured like Depth Anything's (keep aspect ratio, sides a multiple of the patch
size), loadable with ``transformers.pipeline("depth-estimation", model=folder)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from .tiny import _components, _is_complete, _reinit_, _save_atomically, ensure_built, write_atomically

logger = logging.getLogger(__name__)

TINY_FLUX_CANNY_NAME = "tiny-flux-canny-v1"
"""Folder name used by :func:`ensure_tiny_flux_canny`; bump the suffix when the recipe changes."""
TINY_FLUX_DEPTH_NAME = "tiny-flux-depth-v1"
"""Folder name used by :func:`ensure_tiny_flux_depth`."""
TINY_DEPTH_MODEL_NAME = "tiny-depth-anything-v1"
"""Folder name used by :func:`ensure_tiny_depth_model`."""

_DEPTH_PATCH = 14  # DINOv2's patch size (Depth Anything's processor makes sides a multiple of it)
_DEPTH_SIZE = 56  # 4 x 4 patches (Depth Anything: 518 px, 37 x 37)


def control_components(seed: int) -> dict[str, object]:
    """Every component of a tiny ``FluxControlPipeline`` (deterministic in ``seed``)."""
    components = _components(seed)
    text_dim = components["text_encoder_2"].config.d_model  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed + 100)
    torch.manual_seed(seed + 100)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=32,  # 16 packed latent channels of the image + 16 of the control image
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    # The gains of the tiny FLUX.1 (see tiny._components), and a loud VAE encoder so control images differ.
    _reinit_(transformer, gen, gain=3.0)
    _reinit_(transformer.time_text_embed.timestep_embedder, gen, gain=4.0)
    _reinit_(transformer.context_embedder, gen, gain=3.0)
    _reinit_(transformer.time_text_embed.text_embedder, gen, gain=3.0)
    _reinit_(components["vae"].encoder, gen, gain=4.0)  # type: ignore[attr-defined]
    # The control image acts through the tokens' content, which loud AdaLN modulation (scale and shift from
    # the timestep and pooled prompt) and the blocks' outputs drown: quieter modulation, a louder output
    # layer, a loud input projection (so the residual stream carries each token's content) whose control
    # columns are louder still make control images change the output by several grey levels on either
    # seed, while seed, prompt, steps and guidance still change it by tens (swept on 64 px, 2 steps).
    _reinit_(transformer.proj_out, gen, gain=0.5)
    for block in transformer.transformer_blocks:
        _reinit_(block.norm1, gen, gain=1.0)
    for block in transformer.single_transformer_blocks:
        _reinit_(block.norm, gen, gain=1.0)
    _reinit_(transformer.norm_out, gen, gain=1.0)
    with torch.no_grad():
        transformer.x_embedder.weight.mul_(10.0)
        transformer.x_embedder.weight[:, 16:] *= 9.0
    components["transformer"] = transformer.eval()
    return components


def build_tiny_flux_control(path: Path, seed: int) -> Path:
    """Save a tiny random ``FluxControlPipeline`` to ``path``; return its absolute path."""
    from diffusers import FluxControlPipeline

    path = Path(path).expanduser().resolve()
    if _is_complete(path):
        return path
    _save_atomically(FluxControlPipeline(**control_components(seed)), path)  # type: ignore[arg-type]
    logger.info("built tiny FLUX.1 control pipeline (seed=%d) at %s", seed, path)
    return path


def build_tiny_flux_canny(path: Path) -> Path:
    """The tiny FLUX.1 Canny [dev] (a control pipeline of its own seed)."""
    return build_tiny_flux_control(path, seed=10)


def build_tiny_flux_depth(path: Path) -> Path:
    """The tiny FLUX.1 Depth [dev] (the same architecture as the Canny one, other weights)."""
    return build_tiny_flux_control(path, seed=20)


def build_tiny_depth_model(path: Path, seed: int = 30) -> Path:
    """Save a tiny random Depth Anything (model + image processor) to ``path``; return its absolute path."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    try:  # transformers 5 without torchvision: the PIL processor, named directly to avoid a warning
        from transformers import DPTImageProcessorPil as Processor  # type: ignore[attr-defined]
    except ImportError:
        from transformers import DPTImageProcessor as Processor

    path = Path(path).expanduser().resolve()
    if _is_complete(path, "config.json"):
        return path
    torch.manual_seed(seed)
    backbone = Dinov2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        patch_size=_DEPTH_PATCH, image_size=_DEPTH_SIZE, out_features=["stage1", "stage2"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, patch_size=_DEPTH_PATCH, reassemble_hidden_size=16,
        reassemble_factors=[2, 1], neck_hidden_sizes=[8, 16], fusion_hidden_size=8, head_hidden_size=8,
    )
    model = DepthAnythingForDepthEstimation(config)
    _reinit_(model, torch.Generator().manual_seed(seed), gain=1.5)
    processor = Processor(
        size={"height": _DEPTH_SIZE, "width": _DEPTH_SIZE}, keep_aspect_ratio=True,
        ensure_multiple_of=_DEPTH_PATCH, do_pad=False, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )

    def write(tmp: Path) -> None:
        model.eval().save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))

    write_atomically(path, write)
    logger.info("built tiny depth-estimation model (seed=%d) at %s", seed, path)
    return path


def ensure_tiny_flux_canny(cache_dir: Path) -> Path:
    """Return ``cache_dir / TINY_FLUX_CANNY_NAME``, building it once even with concurrent callers."""
    return ensure_built(cache_dir, TINY_FLUX_CANNY_NAME, build_tiny_flux_canny)


def ensure_tiny_flux_depth(cache_dir: Path) -> Path:
    """Return ``cache_dir / TINY_FLUX_DEPTH_NAME``, building it once even with concurrent callers."""
    return ensure_built(cache_dir, TINY_FLUX_DEPTH_NAME, build_tiny_flux_depth)


def ensure_tiny_depth_model(cache_dir: Path) -> Path:
    """Return ``cache_dir / TINY_DEPTH_MODEL_NAME``, building it once even with concurrent callers."""
    return ensure_built(cache_dir, TINY_DEPTH_MODEL_NAME, build_tiny_depth_model, marker="config.json")
