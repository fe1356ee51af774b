"""Tiny random-weight safety checkers of every supported format, built fully offline.

Why: the safety stages must run the same loading and scoring code in tests as in production, where the
weights come from a Hub id or a local folder. These builders write real model folders (config, weights,
image processor or tokenizer) that ``from_pretrained`` loads like any downloaded checker:

- ``tiny-sd-safety-checker``: diffusers' ``StableDiffusionSafetyChecker`` (the classic CLIP concept checker)
  plus a ``CLIPImageProcessor``. Its concept and special-care thresholds are 1.0, the value diffusers
  initialises them to, so a cosine similarity (always below 1) never exceeds them: with the default
  ``adjustment: 0`` it never flags, and ``adjustment`` moves every score up (2.0 and more flags everything).
- ``tiny-nsfw-vit``: a ``ViTForImageClassification`` with labels ``{0: "normal", 1: "nsfw"}`` (the layout of
  popular NSFW image classifiers) plus a ``ViTImageProcessor``.
- ``tiny-text-classifier``: a ``BertForSequenceClassification`` with labels ``{0: "safe", 1: "nsfw"}`` and a
  byte-level tokenizer built in code.

Scores of random models are arbitrary but deterministic, so tests make them flag by threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from .loading import LOAD_LOCK
from .tiny import _clip_tokenizer, _reinit_, ensure_built, write_atomically

logger = logging.getLogger(__name__)

TINY_CHECKERS = ("tiny-sd-safety-checker", "tiny-nsfw-vit", "tiny-text-classifier")
_VERSION = "v1"  # bump when a recipe changes, so caches rebuild
_IMAGE_SIZE = 32


def _build_sd_checker(out: Path, seed: int) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 16,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": _IMAGE_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    model = StableDiffusionSafetyChecker(config).eval()
    _reinit_(model, gen, gain=2.0, bias_std=0.0)
    with torch.no_grad():
        model.concept_embeds.copy_(torch.randn(model.concept_embeds.shape, generator=gen))
        model.special_care_embeds.copy_(torch.randn(model.special_care_embeds.shape, generator=gen))
        model.concept_embeds_weights.fill_(1.0)
        model.special_care_embeds_weights.fill_(1.0)
    model.save_pretrained(str(out), safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": _IMAGE_SIZE}, crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
    ).save_pretrained(str(out))


def _build_nsfw_vit(out: Path, seed: int) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = ViTConfig(
        image_size=_IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=2,
        id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(config).eval()
    # Louder than default weights spread the scores of different images apart (about 0.80 to 0.90 for
    # the tiny FLUX model's noise), so a threshold can separate two images.
    _reinit_(model, gen, gain=2.0, bias_std=0.0)
    _reinit_(model.classifier, gen, gain=2.0, bias_std=0.0)
    model.save_pretrained(str(out), safe_serialization=True)
    ViTImageProcessor(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE}).save_pretrained(str(out))


def _build_text_classifier(out: Path, seed: int) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokenizer = _clip_tokenizer()  # byte-level: any text encodes, built with no files
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=tokenizer.model_max_length, num_labels=2,
        pad_token_id=tokenizer.pad_token_id, id2label={0: "safe", 1: "nsfw"},
        label2id={"safe": 0, "nsfw": 1},
    )
    model = BertForSequenceClassification(config).eval()
    _reinit_(model, gen, gain=2.0, bias_std=0.0)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


_BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "tiny-sd-safety-checker": _build_sd_checker,
    "tiny-nsfw-vit": _build_nsfw_vit,
    "tiny-text-classifier": _build_text_classifier,
}


def build_tiny_checker(name: str, path: Path, seed: int = 0) -> Path:
    """Write the tiny checker ``name`` to ``path`` (atomically: a temp folder renamed into place)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny checker {name!r}; known: {', '.join(TINY_CHECKERS)}")
    path = Path(path).expanduser().resolve()
    if (path / "config.json").is_file():
        return path

    def write(tmp: Path) -> None:
        with LOAD_LOCK:
            _BUILDERS[name](tmp, seed)

    write_atomically(path, write)
    logger.info("built tiny checker %s (seed=%d) at %s", name, seed, path)
    return path


def ensure_tiny_checker(name: str, cache_dir: Path) -> Path:
    """``cache_dir/<name>-v1``, built once even with concurrent callers (an flock serialises builders)."""
    return ensure_built(cache_dir, f"{name}-{_VERSION}", lambda target: build_tiny_checker(name, target),
                        marker="config.json")
