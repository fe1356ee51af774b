"""Plain data that crosses from the job layer into the engine: no torch, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable


@dataclass(frozen=True)
class GenerationParams:
    """One request, fully resolved against its model's defaults and limits."""

    model: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    output_format: str = "jpeg"
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0
    max_sequence_length: int = 512

    @property
    def n(self) -> int:
        return len(self.seeds)

    def batch_key(self) -> Hashable:
        """Jobs with equal keys can share one pipeline call.

        Everything that is one value per pipeline call is here; prompts, negative prompts and seeds are
        per image. True CFG runs for the whole batch or not at all, so its use is part of the key.
        """
        return (
            self.model,
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.true_cfg_scale if self.negative_prompt is not None else None,
            self.max_sequence_length,
            "text",
        )
