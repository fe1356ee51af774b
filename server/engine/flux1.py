"""FLUX.1 families: ``flux`` (FluxPipeline, with img2img and Redux references) and ``flux-kontext``.

- img2img (``image_url`` on a FLUX.1 text-to-image model): ``FluxImg2ImgPipeline.from_pipe`` shares the loaded
  modules; the strength is capped so at least one step keeps the input image;
- Redux (``reference_images`` where the manifest names a ``redux_prior``): SigLIP + the Redux image encoder
  turn each reference into tokens appended to its request's prompt tokens;
- Kontext (``image_url`` and ``reference_images`` on a Kontext model): the input image and the references side
  by side, one conditioning image per prompt;
- a negative prompt runs true classifier-free guidance (``true_cfg_scale``), as FluxPipeline does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import FluxImg2ImgPipeline, FluxKontextPipeline, FluxPipeline, FluxPriorReduxPipeline
from PIL import Image

from ..images import stitch
from ..params import GenerationParams
from .runner import FamilyRunner, SharedModels, grey, per_image
from .weights import resolve_dtype, source_location

log = logging.getLogger(__name__)


def _negative(batch: Sequence[GenerationParams], kwargs: dict[str, Any]) -> None:
    """True CFG for the whole batch when it has negative prompts (its use is in the batch key)."""
    first = batch[0]
    if first.negative_prompt is not None:
        kwargs["negative_prompt"] = per_image(batch, [p.negative_prompt for p in batch])
        kwargs["true_cfg_scale"] = first.true_cfg_scale


class FluxRunner(FamilyRunner):
    """FLUX.1 text-to-image (``family: flux``), with img2img and Redux references where the manifest says."""

    pipeline_class = FluxPipeline
    img2img: Any = None
    redux: Any = None

    def attach(self, shared: SharedModels) -> None:
        if self.manifest.capabilities.image_to_image:
            # Same modules, no copy: img2img is another way of calling the loaded model.
            self.img2img = FluxImg2ImgPipeline.from_pipe(self.pipe)
            self.img2img.set_progress_bar_config(disable=True)
        if self.manifest.redux_prior is not None:
            self.redux = self._load_redux_prior()

    def _load_redux_prior(self) -> Any:
        """The FLUX.1 Redux prior (SigLIP image encoder + ReduxImageEncoder) the manifest names."""
        assert self.manifest.redux_prior is not None
        location, kwargs = source_location(self.manifest.redux_prior, self.settings.cache_dir)
        dtype = resolve_dtype(self.manifest.dtype, self.device)
        # Only the image side: the prompt is encoded by the model's own pipeline.
        prior = FluxPriorReduxPipeline.from_pretrained(
            location, dtype=dtype, text_encoder=None, tokenizer=None, text_encoder_2=None,
            tokenizer_2=None, **kwargs,
        )
        prior.to(self.device)
        log.info("redux prior loaded model=%s from=%s", self.manifest.id, location)
        return prior

    def route(self, batch: Sequence[GenerationParams], kwargs: dict[str, Any]) -> Any:
        first = batch[0]
        _negative(batch, kwargs)
        if first.conditioning not in ("img2img", "img2img+redux"):
            return self.pipe
        inputs: list[Image.Image] = []
        for p in batch:
            assert p.image is not None  # img2img is in the batch key: every request has its input image
            inputs += [p.image.to_pil()] * p.n
        kwargs["image"] = inputs
        # diffusers runs the last int(steps x strength) steps; skip at least one, or the input image
        # would be fully re-noised (e.g. strength 0.8 at 4 steps) and silently ignored.
        strength = first.strength or 1.0
        if first.steps >= 2:
            strength = min(strength, (first.steps - 1 - 1e-6) / first.steps)
        kwargs["strength"] = strength
        return self.img2img

    def embed(self, pipe: Any, batch: Sequence[GenerationParams], kwargs: dict[str, Any]) -> None:
        """Replace the prompts by their embeddings (the prompt cache's when it has them) with each request's
        Redux image tokens appended."""
        first = batch[0]
        if first.conditioning not in ("redux", "img2img+redux"):
            return
        device = pipe._execution_device
        if "prompt_embeds" in kwargs:  # from the engine's prompt cache (server/engine/prompt_cache.py)
            prompt_embeds, pooled = kwargs.pop("prompt_embeds"), kwargs.pop("pooled_prompt_embeds")
        else:
            prompt_embeds, pooled, _ = pipe.encode_prompt(
                prompt=kwargs.pop("prompt"), prompt_2=None, device=device,
                max_sequence_length=first.max_sequence_length,
            )
        # One SigLIP call for every reference in the batch; each request's tokens, in order, follow
        # its prompt tokens (several references: their tokens one after another).
        refs = [r.to_pil() for p in batch for r in p.references]
        tokens = self.redux.image_embedder(self.redux.encode_image(refs, device, 1)).image_embeds
        tokens = tokens.to(device=device, dtype=prompt_embeds.dtype)
        per_ref = len(first.references)
        rows = []
        for j, p in enumerate(batch):
            job_tokens = tokens[j * per_ref : (j + 1) * per_ref].reshape(1, -1, tokens.shape[-1])
            rows += [job_tokens] * p.n
        kwargs["prompt_embeds"] = torch.cat([prompt_embeds, torch.cat(rows, dim=0)], dim=1)
        kwargs["pooled_prompt_embeds"] = pooled

    def warm_variants(self, text: GenerationParams) -> list[GenerationParams]:
        image = grey(text.width, text.height)
        variants = []
        if self.img2img is not None:
            variants.append(dataclasses.replace(text, conditioning="img2img", image=image,
                                                strength=self.manifest.defaults.img2img_strength))
        if self.redux is not None:
            variants.append(dataclasses.replace(text, conditioning="redux", references=(image,)))
        return variants


class KontextRunner(FamilyRunner):
    """FLUX.1 Kontext (``family: flux-kontext``): FLUX.1's components, driven by FluxKontextPipeline."""

    pipeline_class = FluxKontextPipeline

    def route(self, batch: Sequence[GenerationParams], kwargs: dict[str, Any]) -> Any:
        _negative(batch, kwargs)
        first = batch[0]
        # Kontext rescales its output to max_area unless told the requested size is the area.
        kwargs["max_area"] = first.width * first.height
        if first.conditioning == "kontext":
            # The input image, then the references, side by side: one conditioning image per prompt,
            # all of the output's height (prepared so by the API), never resized again here.
            per_job = [stitch([i.to_pil() for i in ([p.image] if p.image else []) + list(p.references)])
                       for p in batch]
            kwargs["image"] = per_image(batch, per_job)
            kwargs["_auto_resize"] = False
        return self.pipe

    def warm_variants(self, text: GenerationParams) -> list[GenerationParams]:
        return [dataclasses.replace(text, conditioning="kontext", image=grey(text.width, text.height))]
