"""A tiny random-weight FLUX pipeline, built fully offline.

Why: tests and demo deployments need a real ``FluxPipeline`` (same loading code,
same call signature, same output shapes) without downloading gigabytes of weights
or touching the Hugging Face Hub. Everything here, tokenizers included, is built
in code from a seed, so the result is deterministic and takes about a second.

The images are noise, but the weights are scaled so that every user-visible input
(seed, prompt, negative prompt, steps, guidance, size) visibly changes the output.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

logger = logging.getLogger(__name__)

TINY_FLUX_NAME = "tiny-flux-v1"
"""Folder name used by :func:`ensure_tiny_flux`; bump the suffix when the recipe changes."""
TINY_FLUX_EDIT_NAME = "tiny-flux-edit-v1"
"""Folder name used by :func:`ensure_tiny_flux_edit`: the tiny FLUX with an image-sensitive VAE encoder."""
TINY_REDUX_NAME = "tiny-flux-redux-v1"
"""Folder name used by :func:`ensure_tiny_redux` (a FLUX.1 Redux prior matching the tiny FLUX)."""

TEXT_DIM = 32  # CLIP pooled size == T5 d_model == transformer joint/pooled dims
_CLIP_MAX_LEN = 77  # the pipeline pads CLIP prompts to tokenizer.model_max_length
_T5_MAX_LEN = 512  # FluxPipeline pads T5 prompts to max_sequence_length (default 512)


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with no merges: every byte is a token, so any text encodes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    symbols = alphabet + [c + "</w>" for c in alphabet]
    vocab = {s: i for i, s in enumerate(symbols)}
    # EOS is the highest id, as in real CLIP, so argmax-based pooling also finds it.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_MAX_LEN)


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram over single characters (T5's layout: pad=0, eos=1, unk=2)."""
    chars = ["▁"] + sorted(set(string.printable.strip()))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=_T5_MAX_LEN)


def _reinit_(module: torch.nn.Module, gen: torch.Generator, gain: float, bias_std: float = 0.1) -> None:
    """Re-draw every Linear/Conv weight with fan-in-scaled normal noise times ``gain`` (biases: N(0, bias_std)).

    Default inits plus the zero-initialised output layers of FLUX give a transformer
    whose prediction barely depends on the prompt; larger, seeded weights make the
    inputs matter and keep the build reproducible.
    """
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * gain / fan_in**0.5)
                if m.bias is None:
                    continue
                if bias_std:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * bias_std)
                else:
                    m.bias.zero_()


def _components(seed: int) -> dict[str, object]:
    """Build every pipeline component from ``seed`` (deterministic, no I/O)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()

    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            projection_dim=TEXT_DIM,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=_CLIP_MAX_LEN,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=TEXT_DIM,
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    # Gains tuned by sweep: a strongly non-linear transformer makes guidance matter,
    # a loud timestep embedding curves the trajectory so the step count matters, louder
    # text projections make the prompt matter, and a quiet output layer keeps the
    # velocity comparable to the initial noise so the seed still matters.
    _reinit_(transformer, gen, gain=3.0)
    _reinit_(transformer.time_text_embed.timestep_embedder, gen, gain=4.0)
    _reinit_(transformer.context_embedder, gen, gain=3.0)
    _reinit_(transformer.time_text_embed.text_embedder, gen, gain=3.0)
    _reinit_(transformer.proj_out, gen, gain=0.2)
    _reinit_(vae.decoder, gen, gain=1.0)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "scheduler": scheduler,
        "vae": vae.eval(),
        "text_encoder": clip.eval(),
        "tokenizer": clip_tok,
        "text_encoder_2": t5.eval(),
        "tokenizer_2": t5_tok,
        "transformer": transformer.eval(),
    }


def _is_complete(path: Path, marker: str = "model_index.json") -> bool:
    """A model folder is complete once its marker file exists (folders are renamed in whole)."""
    return (path / marker).is_file()


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Write a model folder into a sibling temp folder, then rename it into place.

    Readers never see a half-written model; a leftover without its marker (an interrupted copy) is
    replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; other users (e.g. the server) must read it
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def ensure_built(cache_dir: Path, name: str, build: Callable[[Path], Path],
                 marker: str = "model_index.json") -> Path:
    """``cache_dir / name``, built once even with concurrent callers.

    An exclusive ``flock`` on a lock file in ``cache_dir`` serialises builders; the second process
    finds the finished model and returns without rebuilding.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    target = cache_dir / name
    if _is_complete(target, marker):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return build(target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_tiny_flux(path: Path, seed: int = 0) -> Path:
    """Save a tiny random FLUX pipeline to ``path`` (diffusers layout); return its absolute path.

    Builds in a sibling temp dir and renames it into place, so readers never see a
    half-written model. An existing complete model at ``path`` is returned as is.
    """
    path = Path(path).expanduser().resolve()
    if _is_complete(path):
        logger.debug("tiny FLUX already present at %s", path)
        return path
    _save_atomically(FluxPipeline(**_components(seed)), path)  # type: ignore[arg-type]
    logger.info("built tiny FLUX (seed=%d) at %s", seed, path)
    return path


def ensure_tiny_flux(cache_dir: Path) -> Path:
    """Return ``cache_dir / TINY_FLUX_NAME``, building it once even with concurrent callers."""
    return ensure_built(cache_dir, TINY_FLUX_NAME, build_tiny_flux)


# -- a tiny FLUX.1 Redux prior ---------------------------------------------------------------------
# The real prior is SigLIP so400m (384 px, 729 tokens of 1152) and a ReduxImageEncoder projecting them
# to T5's 4096; here: a one-layer SigLIP on 32 px images (16 tokens of 32) projected to the tiny T5's 32,
# so the Redux tokens can be appended to the tiny FLUX's prompt tokens. The tiny Kontext model needs no
# builder: FLUX.1 Kontext has FLUX.1's architecture, so FluxKontextPipeline loads the tiny FLUX as is.

_SIGLIP_DIM = 32
_SIGLIP_SIZE = 32


def _siglip_processor() -> object:
    try:  # transformers 5 without torchvision: the PIL processor, named directly to avoid a warning
        from transformers import SiglipImageProcessorPil as Processor  # type: ignore[attr-defined]
    except ImportError:
        from transformers import SiglipImageProcessor as Processor
    return Processor(size={"height": _SIGLIP_SIZE, "width": _SIGLIP_SIZE})


def _redux_components(seed: int) -> dict[str, object]:
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    encoder = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=_SIGLIP_DIM,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=_SIGLIP_SIZE,
            patch_size=8,
        )
    )
    embedder = ReduxImageEncoder(redux_dim=_SIGLIP_DIM, txt_in_features=TEXT_DIM)
    _reinit_(encoder, gen, gain=1.0)
    # Loud projections, so the reference tokens visibly steer the tiny transformer.
    _reinit_(embedder, gen, gain=3.0)
    return {
        "image_encoder": encoder.eval(),
        "feature_extractor": _siglip_processor(),
        "image_embedder": embedder.eval(),
    }


def _save_atomically(pipe: object, path: Path) -> Path:
    return write_atomically(
        path, lambda tmp: pipe.save_pretrained(str(tmp), safe_serialization=True)  # type: ignore[attr-defined]
    )


def build_tiny_redux(path: Path, seed: int = 1) -> Path:
    """Save a tiny random FLUX.1 Redux prior (FluxPriorReduxPipeline layout) to ``path``."""
    from diffusers import FluxPriorReduxPipeline

    path = Path(path).expanduser().resolve()
    if _is_complete(path):
        return path
    pipe = FluxPriorReduxPipeline(**_redux_components(seed))  # type: ignore[arg-type]
    _save_atomically(pipe, path)
    logger.info("built tiny FLUX Redux prior (seed=%d) at %s", seed, path)
    return path


def build_tiny_flux_edit(path: Path, seed: int = 0) -> Path:
    """The tiny FLUX of :func:`build_tiny_flux` (same seed, same weights) with a louder VAE encoder.

    Text-to-image never runs the VAE encoder, so the default tiny FLUX keeps its default-initialised
    one, whose latents barely differ between images. Image conditioning (img2img, Kontext) encodes the
    input image, so this variant re-draws the encoder so that input images visibly steer the output.
    """
    path = Path(path).expanduser().resolve()
    if _is_complete(path):
        return path
    components = _components(seed)
    _reinit_(components["vae"].encoder, torch.Generator().manual_seed(seed + 1), gain=4.0)  # type: ignore[attr-defined]
    _save_atomically(FluxPipeline(**components), path)  # type: ignore[arg-type]
    logger.info("built tiny FLUX (edit variant, seed=%d) at %s", seed, path)
    return path


def ensure_tiny_redux(cache_dir: Path) -> Path:
    """Return ``cache_dir / TINY_REDUX_NAME``, building it once even with concurrent callers."""
    return ensure_built(cache_dir, TINY_REDUX_NAME, build_tiny_redux)


def ensure_tiny_flux_edit(cache_dir: Path) -> Path:
    """Return ``cache_dir / TINY_FLUX_EDIT_NAME``, building it once even with concurrent callers."""
    return ensure_built(cache_dir, TINY_FLUX_EDIT_NAME, build_tiny_flux_edit)
