"""Model manifests: what a served model is, where its weights come from, what it can do.

One YAML file per model under ``models/``. The API validates requests against a manifest's
capabilities and limits; the engine loads weights from its source. Nothing here touches torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import ImageCheckerSpec, LimitSettings
from .errors import ModelNotFound

log = logging.getLogger(__name__)


class WeightsSource(BaseModel):
    """Exactly one of: a Hub repo id, a local diffusers folder, or a built-in offline builder."""

    model_config = ConfigDict(extra="forbid")

    hub: str | None = None
    revision: str | None = None
    path: Path | None = None
    builtin: Literal["tiny-flux", "tiny-flux-edit", "tiny-redux"] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> WeightsSource:
        given = [x for x in (self.hub, self.path, self.builtin) if x is not None]
        if len(given) != 1:
            raise ValueError("source needs exactly one of hub, path, builtin")
        return self


class Capabilities(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_to_image: bool = True
    negative_prompt: bool = True
    guidance: bool = True
    image_to_image: bool = False
    reference_images: bool = False
    loras: bool = False
    # Whether disable_safety_checker may be honored for this model (the operator must allow it too).
    safety_checker_optional: bool = True


class ModelSafety(BaseModel):
    """Which image checker this model's images go through (unless the config names one for all models)."""

    model_config = ConfigDict(extra="forbid")

    image_checker: ImageCheckerSpec | None = None


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = 20
    guidance_scale: float = 3.5
    # Scale of true classifier-free guidance, applied when a negative prompt is given.
    true_cfg_scale: float = 4.0
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = 512
    # img2img (FLUX.1 text-to-image models given image_url): how much of the input is re-noised,
    # 0 < strength <= 1; 1 ignores the image, small values keep it nearly unchanged.
    img2img_strength: float = Field(default=0.75, gt=0, le=1)


class ModelLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_steps: int = 50
    max_n: int = 4
    min_size: int = 64
    max_width: int = 2048
    max_height: int = 2048
    max_pixels: int = 2048 * 2048
    size_multiple: int = 16
    max_prompt_chars: int = 4000
    max_reference_images: int = 4


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    # flux: FLUX.1 text-to-image (image_url → img2img); flux-kontext: FLUX.1 Kontext (image_url → editing).
    family: Literal["flux", "flux-kontext"] = "flux"
    source: WeightsSource
    # FLUX.1 Redux prior (SigLIP + ReduxImageEncoder) that turns reference_images into prompt tokens.
    redux_prior: WeightsSource | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    owned_by: str = "darkroom"
    capabilities: Capabilities = Field(default_factory=Capabilities)
    defaults: Defaults = Field(default_factory=Defaults)
    limits: ModelLimits = Field(default_factory=ModelLimits)
    safety: ModelSafety = Field(default_factory=ModelSafety)

    @model_validator(mode="after")
    def _conditioning_is_servable(self) -> ModelManifest:
        if self.capabilities.reference_images and self.family == "flux" and self.redux_prior is None:
            raise ValueError(f"{self.id}: reference_images needs a redux_prior for family flux")
        return self

    def effective_limits(self, server: LimitSettings) -> ModelLimits:
        """The tighter of the manifest's and the operator's limits."""
        return self.limits.model_copy(
            update={
                "max_steps": min(self.limits.max_steps, server.max_steps),
                "max_n": min(self.limits.max_n, server.max_n),
                "max_width": min(self.limits.max_width, server.max_width),
                "max_height": min(self.limits.max_height, server.max_height),
                "max_pixels": min(self.limits.max_pixels, server.max_pixels),
                "max_prompt_chars": min(self.limits.max_prompt_chars, server.max_prompt_chars),
            }
        )


def load_manifests(directory: Path) -> dict[str, ModelManifest]:
    """Every ``*.yaml`` manifest in a folder, keyed by id."""
    manifests: dict[str, ModelManifest] = {}
    for file in sorted(directory.glob("*.yaml")):
        manifest = ModelManifest.model_validate(yaml.safe_load(file.read_text()))
        if manifest.id in manifests:
            raise ValueError(f"duplicate model id {manifest.id!r} in {file}")
        manifests[manifest.id] = manifest
    return manifests


class Registry:
    """The models this server serves, looked up by id or alias."""

    def __init__(self, manifests: list[ModelManifest]) -> None:
        if not manifests:
            raise ValueError("a registry needs at least one model")
        self.models = manifests
        self._by_name: dict[str, ModelManifest] = {}
        for manifest in manifests:
            for name in (manifest.id, *manifest.aliases):
                if name in self._by_name:
                    raise ValueError(f"model name {name!r} is used twice")
                self._by_name[name] = manifest

    @property
    def default(self) -> ModelManifest:
        return self.models[0]

    def get(self, name: str | None) -> ModelManifest:
        if name is None:
            return self.default
        try:
            return self._by_name[name]
        except KeyError:
            served = ", ".join(m.id for m in self.models)
            raise ModelNotFound(
                f"model {name!r} is not served here; available: {served}", param="model"
            ) from None

    @classmethod
    def from_settings(cls, models_dir: Path, served: list[str]) -> Registry:
        available = load_manifests(models_dir)
        lookup = {name: m for m in available.values() for name in (m.id, *m.aliases)}
        missing = [name for name in served if name not in lookup]
        if missing:
            raise ValueError(
                f"no manifest in {models_dir} for {', '.join(missing)}; "
                f"known: {', '.join(sorted(available))}"
            )
        chosen = list(dict.fromkeys(lookup[name].id for name in served))
        return cls([available[model_id] for model_id in chosen])
