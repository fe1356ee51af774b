"""Safety models: the image checkers (run once per batch on decoded images) and the prompt classifier.

Two image formats, as operators deploy them:

- ``sd-safety-checker``: diffusers' ``StableDiffusionSafetyChecker``, the CLIP concept checker of Stable
  Diffusion (e.g. ``CompVis/stable-diffusion-safety-checker``), with its ``CLIPImageProcessor``. Scored
  exactly as diffusers' ``forward`` does (cosine similarity to each concept minus its threshold, plus
  ``adjustment``, rounded to 3 decimals; a special-care hit adds 0.01), but batched and without blacking
  out images: a flagged image is refused, never returned.
- ``image-classification``: any transformers ``AutoModelForImageClassification`` (e.g. a ViT NSFW
  classifier) with its ``AutoImageProcessor``; flagged when P(``label``) >= ``threshold``.

Weights load with ``from_pretrained`` from a Hub id, a local folder or a tiny builtin built offline,
so tests run the production code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from ..config import CheckerSource, ImageCheckerSpec, SafetySettings, TextClassifierSpec
from ..errors import DarkroomError, InternalError, SafetyFlagged
from ..metrics import SafetyCounters
from ..params import GenerationParams
from ..registry import Registry
from .loading import LOAD_LOCK
from .weights import resolve_dtype, source_location

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Verdict:
    """One image's outcome. ``score``: P(label) for a classifier, the highest concept score (flagged
    above 0) for the SD checker."""

    flagged: bool
    score: float


class ImageChecker(Protocol):
    name: str

    def check(self, images: Sequence[Image.Image]) -> list[Verdict]: ...


def _describe(source: CheckerSource) -> str:
    return source.hub or (str(source.path) if source.path else f"builtin:{source.builtin}")


def _label_index(config: Any, label: str, where: str) -> int:
    labels = {str(name).lower(): int(idx) for idx, name in config.id2label.items()}
    if label.lower() not in labels:
        raise ValueError(f"{where} has no label {label!r}; its labels: {sorted(config.id2label.values())}")
    return labels[label.lower()]


def _probabilities(logits: torch.Tensor, config: Any) -> torch.Tensor:
    logits = logits.float()
    if getattr(config, "problem_type", None) == "multi_label_classification":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def _quiet_loading() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _checker_identity(spec: ImageCheckerSpec, device: str) -> tuple[str, str, torch.dtype]:
    assert spec.source is not None
    dtype = resolve_dtype(spec.dtype, device, cuda_auto=torch.float16)
    return f"{spec.format}:{_describe(spec.source)}", device, dtype


def _load_with_processor(
    model_cls: Any, spec: ImageCheckerSpec, cache_dir: Path, device: str, dtype: torch.dtype
) -> tuple[Any, Any]:
    """A checker model and its image processor, from the same source (each may sit in a subfolder)."""
    from transformers import AutoImageProcessor

    assert spec.source is not None
    _quiet_loading()
    location, kwargs = source_location(spec.source, cache_dir)
    sub = spec.source.subfolder
    psub = spec.source.processor_subfolder or sub
    model = model_cls.from_pretrained(
        location, dtype=dtype, **kwargs, **({"subfolder": sub} if sub else {})
    ).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(location, **kwargs, **({"subfolder": psub} if psub else {}))
    return model, processor


class SDConceptChecker:
    """diffusers' StableDiffusionSafetyChecker, scored in one batched call."""

    def __init__(self, spec: ImageCheckerSpec, cache_dir: Path, device: str) -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        self.name, self.device, self.dtype = _checker_identity(spec, device)
        self.adjustment = spec.adjustment
        self.model, self.processor = _load_with_processor(
            StableDiffusionSafetyChecker, spec, cache_dir, device, self.dtype
        )

    @torch.inference_mode()
    def scores(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Each image's highest concept score, as diffusers computes it (flagged when above 0)."""
        m = self.model
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        embeds = m.visual_projection(m.vision_model(pixels.to(self.device, self.dtype))[1])
        embeds = torch.nn.functional.normalize(embeds.float())
        special = embeds @ torch.nn.functional.normalize(m.special_care_embeds.float()).T
        concept = embeds @ torch.nn.functional.normalize(m.concept_embeds.float()).T
        special_scores = torch.round(
            special - m.special_care_embeds_weights.float() + self.adjustment, decimals=3
        )
        special_care = (special_scores > 0).any(dim=1, keepdim=True)
        concept_scores = torch.round(
            concept - m.concept_embeds_weights.float() + self.adjustment + 0.01 * special_care,
            decimals=3,
        )
        return concept_scores.max(dim=1).values.cpu()

    def check(self, images: Sequence[Image.Image]) -> list[Verdict]:
        return [Verdict(bool(s > 0), float(s)) for s in self.scores(images).tolist()]


class ClassifierChecker:
    """A transformers image classifier: flagged when P(label) >= threshold."""

    def __init__(self, spec: ImageCheckerSpec, cache_dir: Path, device: str) -> None:
        from transformers import AutoModelForImageClassification

        self.name, self.device, self.dtype = _checker_identity(spec, device)
        self.threshold = spec.threshold
        self.model, self.processor = _load_with_processor(
            AutoModelForImageClassification, spec, cache_dir, device, self.dtype
        )
        self.index = _label_index(self.model.config, spec.label, self.name)

    @torch.inference_mode()
    def scores(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """P(label) of each image."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        logits = self.model(pixel_values=pixels.pixel_values.to(self.device, self.dtype)).logits
        return _probabilities(logits, self.model.config)[:, self.index].cpu()

    def check(self, images: Sequence[Image.Image]) -> list[Verdict]:
        return [Verdict(s >= self.threshold, float(s)) for s in self.scores(images).tolist()]


def load_image_checker(spec: ImageCheckerSpec, cache_dir: Path, device: str) -> ImageChecker | None:
    if spec.format == "none":
        return None
    started = time.perf_counter()
    checker: ImageChecker
    with LOAD_LOCK:
        if spec.format == "sd-safety-checker":
            checker = SDConceptChecker(spec, cache_dir, device)
        else:
            checker = ClassifierChecker(spec, cache_dir, device)
    log.info("safety checker loaded checker=%s device=%s seconds=%.2f", checker.name, device,
             time.perf_counter() - started)
    return checker


def image_checker_spec(
    safety: SafetySettings, manifest_spec: ImageCheckerSpec | None
) -> ImageCheckerSpec | None:
    """The operator's checker wins over the manifest's; None when no image stage runs for the model."""
    if not safety.enabled:
        return None
    spec = safety.image_checker or manifest_spec
    return None if spec is None or spec.format == "none" else spec


def load_image_checkers(
    registry: Registry, safety: SafetySettings, cache_dir: Path, device: str
) -> dict[str, ImageChecker | None]:
    """One checker per model id (models naming the same checker share one instance)."""
    loaded: dict[str, ImageChecker | None] = {}
    by_model: dict[str, ImageChecker | None] = {}
    for manifest in registry.models:
        spec = image_checker_spec(safety, manifest.safety.image_checker)
        if spec is None:
            if safety.enabled:
                log.warning("no image safety checker for model=%s (prompt stage only)", manifest.id)
            by_model[manifest.id] = None
            continue
        key = spec.model_dump_json()
        if key not in loaded:
            loaded[key] = load_image_checker(spec, cache_dir, device)
        by_model[manifest.id] = loaded[key]
    return by_model


def screen_batch(
    checker: ImageChecker | None,
    batch: Sequence[GenerationParams],
    outputs: Sequence[Sequence[Image.Image]],
    counters: SafetyCounters,
) -> list[DarkroomError | None]:
    """One checker call for every image of the batch that needs checking; per job, None or its error.

    A job is refused when any of its images is flagged. A checker that fails refuses (500) the jobs it
    should have checked: nothing unchecked is returned.
    """
    refusals: list[DarkroomError | None] = [None] * len(batch)
    wanted = [i for i, params in enumerate(batch) if params.check_safety]
    if checker is None or not wanted:
        return refusals
    images = [image for i in wanted for image in outputs[i]]
    try:
        verdicts = checker.check(images)
        if len(verdicts) != len(images):
            raise RuntimeError(f"checker returned {len(verdicts)} verdicts for {len(images)} images")
    except Exception:  # noqa: BLE001 - fail closed, but only for this batch
        log.exception("safety checker failed checker=%s", checker.name)
        for i in wanted:
            refusals[i] = InternalError("the safety checker failed; see the server log")
        counters.add("image_checker_errors")
        return refusals
    counters.add("images_checked", len(images))
    start = 0
    for i in wanted:
        mine = verdicts[start : start + batch[i].n]
        start += batch[i].n
        flagged = sum(v.flagged for v in mine)
        if flagged:
            counters.add("images_flagged", flagged)
            counters.add("requests_flagged_image")
            refusals[i] = SafetyFlagged(
                f"the safety checker flagged {flagged} of the {len(mine)} generated image(s); "
                "nothing was returned or stored. Try a different prompt or seed.",
                code="image_flagged",
            )
    return refusals


class TextClassifier:
    """A transformers text-classification model: P(label) of a prompt, flagged at >= threshold."""

    def __init__(self, spec: TextClassifierSpec, cache_dir: Path) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        _quiet_loading()
        started = time.perf_counter()
        self.name = f"text-classification:{_describe(spec.source)}"
        self.device = spec.device
        self.threshold = spec.threshold
        self.max_length = spec.max_length
        with LOAD_LOCK:
            location, kwargs = source_location(spec.source, cache_dir)
            sub = {"subfolder": spec.source.subfolder} if spec.source.subfolder else {}
            self.model = AutoModelForSequenceClassification.from_pretrained(
                location, **kwargs, **sub
            ).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(location, **kwargs, **sub)
        self.index = _label_index(self.model.config, spec.label, self.name)
        log.info("prompt classifier loaded classifier=%s device=%s seconds=%.2f", self.name, self.device,
                 time.perf_counter() - started)

    @torch.inference_mode()
    def score(self, text: str) -> float:
        limit = min(self.max_length, getattr(self.tokenizer, "model_max_length", self.max_length))
        tokens = self.tokenizer([text], return_tensors="pt", truncation=True, max_length=limit)
        logits = self.model(**{k: v.to(self.device) for k, v in tokens.items()}).logits
        return float(_probabilities(logits, self.model.config)[0, self.index])

    def flags(self, text: str) -> tuple[bool, float]:
        score = self.score(text)
        return score >= self.threshold, score
