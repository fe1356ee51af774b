"""The job's vocabulary: what one request asks the engine for, as plain, hashable, serialisable data.

Both processes import it: the API resolves a request into ``GenerationParams`` (server/api/schemas.py), the
queue carries them across processes (server/queue/wire.py rebuilds only the dataclasses of this module), and
the engine runs them (server/engine/pipelines.py). No torch, no HTTP here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Literal

if TYPE_CHECKING:
    from PIL import Image

# What besides the prompt steers a request: nothing, an input image (FLUX.1 img2img or Kontext editing),
# Redux reference embeddings, or both of the first with the second; FLUX.2's reference images (image_url and
# reference_images, all in ``references``); a FLUX.1 Canny/Depth control image (``image``, the user's photo:
# the worker computes the edges or depth).
Conditioning = Literal["text", "img2img", "kontext", "redux", "img2img+redux", "references", "control"]


@dataclass(frozen=True)
class ConditioningImage:
    """A fetched, decoded RGB image as plain bytes, so params stay hashable and serialisable."""

    width: int
    height: int
    rgb: bytes

    @classmethod
    def from_pil(cls, image: Image.Image) -> ConditioningImage:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return cls(rgb.width, rgb.height, rgb.tobytes())

    def to_pil(self) -> Image.Image:
        from PIL import Image

        return Image.frombytes("RGB", (self.width, self.height), self.rgb)

    def __repr__(self) -> str:  # never dump the pixels into a log
        return f"ConditioningImage({self.width}x{self.height})"


@dataclass(frozen=True)
class LoraRef:
    """One entry of ``image_loras``: where the LoRA comes from (a URL or a registered name), and its scale.

    Plain data: a worker on another host resolves and fetches ``path`` itself (server/loras.py).
    """

    path: str
    scale: float = 1.0


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
    # The size the client asked for when the pipeline runs at the next size FLUX can make (width x height
    # above): the worker centre-crops each image to it before encoding. None: width x height.
    output_width: int | None = None
    output_height: int | None = None
    # JPEG / WebP quality 0-100 (openai's output_compression); None: the encoder's default.
    output_quality: int | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0
    max_sequence_length: int = 512
    # Run the image safety checker on this request's images (off only for an honored disable).
    check_safety: bool = True
    # Conditioning images, fetched and prepared by the API (see server/api/conditioning.py).
    conditioning: Conditioning = "text"
    image: ConditioningImage | None = None
    references: tuple[ConditioningImage, ...] = ()
    strength: float | None = None
    # image_loras, in request order; one adapter set (and its scales) per pipeline call.
    loras: tuple[LoraRef, ...] = ()

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the images the client gets."""
        return (self.output_width or self.width, self.output_height or self.height)

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
            # Which pipeline runs, its per-call strength, and how many reference tokens each prompt gets.
            self.conditioning,
            self.strength,
            self.image is not None,
            # FLUX.2 turns each reference into (width / 16) x (height / 16) tokens, and the rows of a call
            # need equal token counts: its references batch by size; elsewhere by count.
            tuple((r.width, r.height) for r in self.references) if self.conditioning == "references"
            else len(self.references),
            # The LoRA set and its scales are one per call.
            self.loras,
        )


def images_per_call(max_images: int, max_pixels: int | None, width: int, height: int) -> int:
    """The most images of ``width`` x ``height`` one pipeline call may hold under the scheduler's caps
    (``scheduler.max_batch_images``, ``scheduler.max_batch_pixels``; None: no pixel cap), at least 1. The
    batch-filling rule (server/queue/batching.py) and the compile warm-up (server/engine/optimize.py) both
    use it, so the warm-up compiles exactly the batch sizes the scheduler forms."""
    if max_pixels is None:
        return max_images
    return min(max_images, max(1, max_pixels // (width * height)))

