"""The safety checker: the prompt stage (API), the image stage (worker) and who may turn it off (``safety``);
and ``WeightsSource``, where any model's weights come from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class WeightsSource(BaseModel):
    """Where a model's weights come from: exactly one of a Hub repo id (at ``revision``), a local folder, or a
    tiny random-weight builtin built offline. Model manifests (server/registry.py ``ModelSource``) and
    safety models (``CheckerSource``) narrow ``builtin`` to their own builders; server/engine/weights.py
    reads any."""

    model_config = ConfigDict(extra="forbid")
    # How a refusal names the source.
    what: ClassVar[str] = "source"

    hub: str | None = None
    revision: str | None = None
    path: Path | None = None
    builtin: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> WeightsSource:
        if len([x for x in (self.hub, self.path, self.builtin) if x is not None]) != 1:
            raise ValueError(f"{self.what} needs exactly one of hub, path, builtin")
        return self


class CheckerSource(WeightsSource):
    """Where a safety model's weights come from: exactly one of a Hub id, a local folder, a tiny builtin."""

    what: ClassVar[str] = "a checker source"

    builtin: Literal["tiny-sd-safety-checker", "tiny-nsfw-vit", "tiny-text-classifier"] | None = None
    # Folders inside the repo/folder, as in a Stable Diffusion pipeline ("safety_checker",
    # "feature_extractor"); None: the weights and the image processor sit at the top.
    subfolder: str | None = None
    processor_subfolder: str | None = None

class ImageCheckerSpec(BaseModel):
    """The image stage: a model run once per batch on the decoded images, before encoding.

    ``sd-safety-checker``: diffusers' StableDiffusionSafetyChecker (CLIP concept checker); an image is
    flagged when a concept score (cosine similarity minus the concept's threshold, plus ``adjustment``)
    is above 0, exactly as diffusers scores it; raise ``adjustment`` for a stricter filter.
    ``image-classification``: a transformers image classifier; flagged when the probability of
    ``label`` is at least ``threshold``. ``none``: no image stage.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["sd-safety-checker", "image-classification", "none"]
    source: CheckerSource | None = None
    label: str = "nsfw"
    threshold: float = 0.5
    adjustment: float = 0.0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="after")
    def _source_given(self) -> ImageCheckerSpec:
        if self.format != "none" and self.source is None:
            raise ValueError(f"an image checker of format {self.format!r} needs a source")
        return self


class TextClassifierSpec(BaseModel):
    """A transformers text-classification model for prompts: flagged when P(label) >= threshold."""

    model_config = ConfigDict(extra="forbid")

    source: CheckerSource
    label: str = "nsfw"
    threshold: float = 0.5
    max_length: int = 512
    device: str = "cpu"


# Prompts that ask for sexual content involving minors. Operators replace or extend these lists.
_MINOR = r"(child|children|kids?|minors?|underage|under-age|preteens?|pre-teens?|toddlers?|infants?)"
_SEXUAL = r"(nude|naked|nudity|porn\w*|sexual\w*|sex|explicit|lewd|erotic\w*|nsfw)"
DEFAULT_PROMPT_BLOCKLIST = ["child porn", "child pornography", "csam", "lolicon", "shotacon"]
DEFAULT_PROMPT_PATTERNS = [rf"\b{_MINOR}\b.*\b{_SEXUAL}\b", rf"\b{_SEXUAL}\b.*\b{_MINOR}\b"]


class PromptCheckSettings(BaseModel):
    """The prompt stage, run in the API before a job is queued (no GPU work for a flagged prompt)."""

    model_config = ConfigDict(extra="forbid")

    # Words or phrases matched whole and case-insensitively in the normalised prompt (any run of spaces, `_`
    # or punctuation matches a space; server/api/safety.py ``normalize``).
    blocklist: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPT_BLOCKLIST))
    # Python regular expressions, searched case-insensitively in the prompt and its normalised copy.
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPT_PATTERNS))
    classifier: TextClassifierSpec | None = None

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return value


class SafetySettings(BaseModel):
    """The safety checker: on by default; ``disable_safety_checker`` needs the operator's consent."""

    model_config = ConfigDict(extra="forbid")

    # Off: no stage runs for anyone, and disable_safety_checker is accepted as a no-op.
    enabled: bool = True
    # Who may send disable_safety_checker: true: nobody (403), everybody, or the keys in disable_keys.
    allow_disable: Literal["never", "always", "per_key"] = "never"
    disable_keys: list[SecretStr] = Field(default_factory=list)
    # Set for you when auth.keys / auth.keys_file configure a key store: with per_key, a key from the store
    # is allowed by its own disable_safety_checker permission, and disable_keys may be empty.
    key_permissions: bool = False
    prompt: PromptCheckSettings = Field(default_factory=PromptCheckSettings)
    # The image checker for every model; None: each model's manifest names its own (safety.image_checker).
    image_checker: ImageCheckerSpec | None = None

    @model_validator(mode="after")
    def _keys_for_per_key(self) -> SafetySettings:
        if self.allow_disable == "per_key" and not self.disable_keys and not self.key_permissions:
            raise ValueError("safety.allow_disable: per_key needs safety.disable_keys "
                             "(or API keys with disable_safety_checker in auth.keys / auth.keys_file)")
        return self
