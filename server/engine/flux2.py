"""FLUX.2 [dev] and [klein] pipelines that take each prompt's own reference images in one batched call.

diffusers' ``Flux2Pipeline`` and ``Flux2KleinPipeline`` take ``image`` as ONE list of reference images that
every prompt of the call shares (``prepare_image_latents`` encodes the list once and repeats it over the
batch). A server batches requests from different users, each with its own references, so these subclasses
read ``image`` as the concatenation of every row's references, ``k`` per row in row order
(``len(image) == batch_size * k``), and give each row its own reference tokens. Everything else is the
upstream pipeline: each reference is VAE-encoded alone (the latent mode, no noise), packed, and placed at its
own time offset of the RoPE ids (10, 20, ... in list order, so order matters as upstream); the rows' token
counts must match (the worker batches only references of equal sizes, position by position). With one row
the result is exactly upstream's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from ..config import EngineSettings
from ..params import GenerationParams
from ..registry import ModelManifest
from .runner import FamilyRunner, grey, load_pipeline, per_image


class _PerRowReferences:
    """Mixin over a FLUX.2 pipeline: ``image`` holds ``k`` references per row, not ``k`` for all rows."""

    def prepare_image_latents(self, images: list[torch.Tensor], batch_size: int, generator: Any,
                              device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference tokens ``(batch_size, k x tokens, C)`` and their ids ``(batch_size, k x tokens, 4)``.

        ``images`` are the preprocessed references of every row, row after row. Raises ``ValueError`` when
        they do not split evenly over the rows or when rows would get different token counts.
        """
        if len(images) % batch_size:
            raise ValueError(f"{len(images)} reference images do not split evenly over {batch_size} images")
        per_row = len(images) // batch_size
        upstream = super().prepare_image_latents  # type: ignore[misc]
        rows = [upstream(images[i * per_row:(i + 1) * per_row], 1, generator, device, dtype)
                for i in range(batch_size)]
        if len({latents.shape for latents, _ in rows}) != 1:
            raise ValueError("the rows of a batch need reference images of the same sizes")
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


class Flux2RowsPipeline(_PerRowReferences, Flux2Pipeline):
    """``Flux2Pipeline`` (FLUX.2 [dev]) with per-row reference images; loads from the same folders."""


class Flux2KleinRowsPipeline(_PerRowReferences, Flux2KleinPipeline):
    """``Flux2KleinPipeline`` (FLUX.2 [klein]) with per-row reference images; loads from the same folders."""


class Flux2Runner(FamilyRunner):
    """FLUX.2 [dev] (``family: flux2``) and [klein] (``family: flux2-klein``).

    ``references`` (the API put ``image_url`` first, then ``reference_images``) become the pipeline's
    ``image`` list, each request's own (see ``Flux2RowsPipeline``). FLUX.2 [dev] is guidance-distilled: the
    request's ``guidance_scale`` is embedded, and it has no negative conditioning. FLUX.2 [klein] base models
    run true classifier-free guidance at ``guidance_scale`` > 1 against an empty prompt, or against the
    request's ``negative_prompt`` (encoded here, passed as ``negative_prompt_embeds``); distilled [klein]
    models ignore guidance and take no negative prompt.
    """

    def __init__(self, manifest: ModelManifest, settings: EngineSettings, device: str) -> None:
        super().__init__(manifest, settings, device)
        self.klein = isinstance(self.pipe, Flux2KleinPipeline)
        if self.klein and self.pipe.config.is_distilled and manifest.capabilities.negative_prompt:
            raise ValueError(f"{manifest.id}: these FLUX.2 [klein] weights are step-distilled (no classifier-"
                             "free guidance, so no negative prompt); set capabilities.negative_prompt: false")

    def load(self) -> Any:
        cls = Flux2RowsPipeline if self.manifest.family == "flux2" else Flux2KleinRowsPipeline
        return load_pipeline(cls, self.manifest, self.settings, self.device)

    def route(self, batch: Sequence[GenerationParams], kwargs: dict[str, Any]) -> Any:
        if batch[0].conditioning == "references":
            kwargs["image"] = [ref.to_pil() for p in batch for _ in p.seeds for ref in p.references]
        return self.pipe

    def embed(self, pipe: Any, batch: Sequence[GenerationParams], kwargs: dict[str, Any]) -> None:
        first = batch[0]
        if not self.klein or first.guidance_scale <= 1 or all(p.negative_prompt is None for p in batch):
            return  # no guidance to use one, or no negative prompt: the pipeline's own empty prompt
        negatives = per_image(batch, [p.negative_prompt or "" for p in batch])
        embeds, _ = pipe.encode_prompt(prompt=negatives, device=pipe._execution_device,
                                       max_sequence_length=first.max_sequence_length)
        kwargs["negative_prompt_embeds"] = embeds

    def warm_variants(self, text: GenerationParams) -> list[GenerationParams]:
        if not self.manifest.capabilities.reference_images:
            return []
        return [dataclasses.replace(text, conditioning="references", references=(grey(64, 64),))]
