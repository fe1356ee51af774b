"""Tiny random-weight FLUX.2 [dev] and FLUX.2 [klein] pipelines, built fully offline.

The same classes as the real models (diffusers 0.42): ``Flux2Transformer2DModel``, ``AutoencoderKLFlux2``
(the FLUX.2 VAE layout: 2x2-patchified latents normalised by a BatchNorm's running statistics) and
``FlowMatchEulerDiscreteScheduler``; FLUX.2 [dev]'s text encoder is a ``Mistral3ForConditionalGeneration``
(Mistral Small 3.1: a Mistral language model with a Pixtral vision tower), FLUX.2 [klein]'s a
``Qwen3ForCausalLM`` with a ``Qwen2Tokenizer`` (``Qwen2TokenizerFast`` in the pipeline's annotations).

Sizes, so that a 64-128 px image takes a small fraction of a second on a CPU:

- text encoders of hidden size 16, as deep as the layers the pipelines read: FLUX.2 [dev] stacks the hidden
  states of layers (10, 20, 30) of Mistral (30 layers here, 40 in Mistral Small), [klein] those of layers
  (9, 18, 27) of Qwen3 (27 here, 36 in Qwen3-4B); so ``joint_attention_dim`` is 3 x 16 = 48;
- a transformer of one double-stream and one single-stream block, 2 heads of 16 (RoPE axes 4+4+4+4);
- a VAE of four 8-channel blocks (scale factor 8, as the real one) with 4 latent channels, so the transformer
  sees 4 x (2 x 2) = 16 channels per token (the real one: 32 x 4 = 128).

Tokenizers are built in code: byte-level BPE with no merges (every byte is a token, any text encodes) and the
special tokens and chat template each pipeline relies on. FLUX.2 [dev]'s real ``tokenizer`` is a
``PixtralProcessor``; transformers builds that class only with torchvision installed, and for prompts the
pipeline uses nothing of it but ``apply_chat_template`` on system + user conversations, so the tiny model
keeps a fast tokenizer with Mistral's control tokens and a chat template in that component (see
docs: FLUX.2 [dev] with real weights needs torchvision for its processor).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .tiny import _is_complete, _reinit_, _save_atomically, ensure_built

logger = logging.getLogger(__name__)

TINY_FLUX2_NAME = "tiny-flux2-v1"
"""Folder name used by :func:`ensure_tiny_flux2`; bump the suffix when the recipe changes."""
TINY_FLUX2_KLEIN_NAME = "tiny-flux2-klein-v1"
"""Folder name used by :func:`ensure_tiny_flux2_klein`."""

_TEXT_DIM = 16
# The layers whose hidden states the pipelines stack into the prompt embedding (their defaults).
_MISTRAL_LAYERS = 30  # Flux2Pipeline: text_encoder_out_layers=(10, 20, 30)
_QWEN3_LAYERS = 27  # Flux2KleinPipeline: text_encoder_out_layers=(9, 18, 27)
_MAX_LEN = 512  # both pipelines pad prompts to max_sequence_length (512 by default)

# Mistral's control tokens (the subset its chat template and the Pixtral processor name).
_MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                     "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# Mistral Small 3.1's layout: [SYSTEM_PROMPT]...[/SYSTEM_PROMPT] then [INST]...[/INST] per user turn;
# content is a list of {"type": "text" | "image"} parts (the form Flux2Pipeline's format_input builds).
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}[SYSTEM_PROMPT]{% else %}[INST]{% endif %}"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{ part['text'] }}{% else %}[IMG]{% endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'system' %}[/SYSTEM_PROMPT]{% else %}[/INST]{% endif %}"
    "{%- endfor %}"
)
# Qwen3's ChatML layout; with enable_thinking=False the generation prompt closes an empty think block.
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_QWEN_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def _byte_vocab(specials: list[str]) -> dict[str, int]:
    """Special tokens first, then the 256 byte-level symbols."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return {s: i for i, s in enumerate(specials + alphabet)}


def mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with Mistral's control tokens and a Mistral-style chat template."""
    backend = Tokenizer(models.BPE(vocab=_byte_vocab(_MISTRAL_SPECIALS), merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=_MISTRAL_SPECIALS[4:], model_max_length=_MAX_LEN,
        chat_template=_MISTRAL_TEMPLATE,
    )


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level ``Qwen2Tokenizer`` with Qwen3's ChatML control tokens and chat template."""
    tokenizer = Qwen2Tokenizer(vocab=_byte_vocab(_QWEN_SPECIALS), merges=[], model_max_length=_MAX_LEN)
    tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIALS[1:]})
    tokenizer.chat_template = _QWEN_TEMPLATE
    return tokenizer


def _mistral3(vocab_size: int, pad_id: int) -> Mistral3ForConditionalGeneration:
    text = MistralConfig(
        vocab_size=vocab_size, hidden_size=_TEXT_DIM, intermediate_size=32, num_hidden_layers=_MISTRAL_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=pad_id, bos_token_id=1, eos_token_id=2, sliding_window=None,
        # Large random weights: the prompt follows a 168-character system message and a causal encoder
        # lets it change only the positions after it; at the default 0.02 the attention is so uniform
        # that "a cat" and "a dog" give nearly the same embedding.
        initializer_range=1.0,
    )
    vision = PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=1, image_size=64, patch_size=16)
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=8,
                            spatial_merge_size=1, vision_feature_layer=-1)
    return Mistral3ForConditionalGeneration(config)


def _qwen3(vocab_size: int, pad_id: int) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab_size, hidden_size=_TEXT_DIM, intermediate_size=32, num_hidden_layers=_QWEN3_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=pad_id, eos_token_id=pad_id, tie_word_embeddings=True,
    ))


def _image_components(seed: int, guidance_embeds: bool) -> dict[str, object]:
    """Transformer, VAE and scheduler of a tiny FLUX.2 (deterministic in ``seed``)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * _TEXT_DIM,
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        mid_block_add_attention=False,
    )
    # Seeded, louder weights (see tiny._reinit_): the prompt, the seed, the steps, guidance and every
    # reference image visibly change the output; a loud VAE encoder makes the references' latents differ.
    _reinit_(transformer, gen, gain=3.0)
    _reinit_(transformer.time_guidance_embed, gen, gain=4.0)
    _reinit_(transformer.context_embedder, gen, gain=3.0)
    _reinit_(transformer.proj_out, gen, gain=0.2)
    _reinit_(vae.decoder, gen, gain=1.0)
    _reinit_(vae.encoder, gen, gain=4.0)
    # FLUX.2 RMS-normalises queries and keys, so projection gains cannot sharpen attention; the norms' scales
    # can. At 1 a random model attends almost uniformly and a 16-token reference drowns among hundreds of
    # text tokens; at 3 each image token attends to a few tokens, so every reference (and its position in
    # the list, through RoPE's time axis) visibly steers the output.
    with torch.no_grad():
        for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
            for name, norm in block.attn.named_children():
                if name.startswith("norm_"):
                    norm.weight.fill_(3.0)
    # The BatchNorm's running statistics de-normalise the latents before decoding: non-trivial values,
    # so that path is exercised as with real weights.
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=gen) * 0.1)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=gen) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return {"scheduler": scheduler, "vae": vae.eval(), "transformer": transformer.eval()}


def flux2_components(seed: int = 0) -> dict[str, object]:
    """Every component of a tiny ``Flux2Pipeline`` (FLUX.2 [dev]: guidance-distilled, Mistral encoder)."""
    components = _image_components(seed, guidance_embeds=True)
    tokenizer = mistral_tokenizer()
    torch.manual_seed(seed + 1)
    components["text_encoder"] = _mistral3(len(tokenizer), tokenizer.pad_token_id).eval()
    components["tokenizer"] = tokenizer
    return components


def flux2_klein_components(seed: int = 2) -> dict[str, object]:
    """Every component of a tiny ``Flux2KleinPipeline`` (no guidance embedding; true CFG unless distilled)."""
    components = _image_components(seed, guidance_embeds=False)
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed + 1)
    components["text_encoder"] = _qwen3(len(tokenizer), tokenizer.pad_token_id).eval()
    components["tokenizer"] = tokenizer
    return components


def build_tiny_flux2(path: Path, seed: int = 0) -> Path:
    """Save a tiny random ``Flux2Pipeline`` (diffusers layout) to ``path``; return its absolute path."""
    from diffusers import Flux2Pipeline

    path = Path(path).expanduser().resolve()
    if _is_complete(path):
        return path
    _save_atomically(Flux2Pipeline(**flux2_components(seed)), path)  # type: ignore[arg-type]
    logger.info("built tiny FLUX.2 (seed=%d) at %s", seed, path)
    return path


def build_tiny_flux2_klein(path: Path, seed: int = 2) -> Path:
    """Save a tiny random ``Flux2KleinPipeline`` (base, i.e. not step-distilled: true CFG) to ``path``."""
    from diffusers import Flux2KleinPipeline

    path = Path(path).expanduser().resolve()
    if _is_complete(path):
        return path
    pipe = Flux2KleinPipeline(**flux2_klein_components(seed), is_distilled=False)  # type: ignore[arg-type]
    _save_atomically(pipe, path)
    logger.info("built tiny FLUX.2 [klein] (seed=%d) at %s", seed, path)
    return path


def ensure_tiny_flux2(cache_dir: Path) -> Path:
    """Return ``cache_dir / TINY_FLUX2_NAME``, building it once even with concurrent callers."""
    return ensure_built(cache_dir, TINY_FLUX2_NAME, build_tiny_flux2)


def ensure_tiny_flux2_klein(cache_dir: Path) -> Path:
    """Return ``cache_dir / TINY_FLUX2_KLEIN_NAME``, building it once even with concurrent callers."""
    return ensure_built(cache_dir, TINY_FLUX2_KLEIN_NAME, build_tiny_flux2_klein)
