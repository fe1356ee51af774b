"""The request body of ``POST /v1/images/generations`` and its resolution into engine parameters.

Fields and defaults follow Together's API; OpenAI-style callers may send ``size: "WxH"`` and
``response_format: "b64_json"``. Unknown fields are ignored, as Together does. A field this server
does not serve yet is accepted by the schema and refused with a 400 that names it.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import LimitSettings, LoraSettings
from ..errors import InvalidRequest, Unsupported
from ..params import GenerationParams
from ..registry import ModelManifest
from .conditioning import conditioning_kind
from .loras import resolve_loras

MAX_SEED = 2**63 - 1


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    path: str
    scale: float = 1.0


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    steps: int | None = Field(default=None, ge=1, strict=True)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, strict=True)
    n: int = Field(default=1, ge=1, strict=True)
    width: int | None = Field(default=None, ge=1, strict=True)
    height: int | None = Field(default=None, ge=1, strict=True)
    size: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    response_format: Literal["base64", "b64_json", "url"] | None = None
    output_format: Literal["jpeg", "jpg", "png", "webp"] | None = None
    image_url: str | None = None
    reference_images: list[str] | None = None
    image_loras: list[LoraSpec] | None = None
    disable_safety_checker: bool | None = None

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        parts = value.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError("size must look like '1024x768' (width x height)")
        return value


def parse_request(body: Any) -> ImageRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return ImageRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"]]
        field = loc[0] if loc else None
        where = ".".join(loc) or "body"
        if error["type"] == "missing":
            message = f"'{where}' is required"
        else:
            message = f"invalid '{where}': {error['msg']}"
        raise InvalidRequest(message, param=field) from None


def _unsupported(req: ImageRequest) -> None:
    # Fields the schema accepts that this server does not serve yet (none at the moment).
    pending: dict[str, bool] = {}
    for field, given in pending.items():
        if given:
            raise Unsupported(f"'{field}' is not supported by this server yet", param=field)


def explicit_size(req: ImageRequest) -> bool:
    """Whether the request names its output size (width, height or a WxH size), rather than the default."""
    return req.width is not None or req.height is not None or req.size not in (None, "auto")


def _size(req: ImageRequest, manifest: ModelManifest) -> tuple[int, int]:
    width, height = req.width, req.height
    if req.size and req.size != "auto" and width is None and height is None:
        width, height = (int(p) for p in req.size.lower().split("x"))
    return width or manifest.defaults.width, height or manifest.defaults.height


def _check_limits(req: ImageRequest, width: int, height: int, steps: int, manifest: ModelManifest,
                  server_limits: LimitSettings) -> None:
    limits = manifest.effective_limits(server_limits)
    name = manifest.id
    if req.n > limits.max_n:
        raise InvalidRequest(f"'n' must be at most {limits.max_n} for {name}", param="n")
    if steps > limits.max_steps:
        raise InvalidRequest(f"'steps' must be at most {limits.max_steps} for {name}", param="steps")
    if len(req.prompt) > limits.max_prompt_chars:
        raise InvalidRequest(
            f"'prompt' is longer than {limits.max_prompt_chars} characters", param="prompt"
        )
    if req.negative_prompt is not None and len(req.negative_prompt) > limits.max_prompt_chars:
        raise InvalidRequest(
            f"'negative_prompt' is longer than {limits.max_prompt_chars} characters",
            param="negative_prompt",
        )
    for field, value, most in (("width", width, limits.max_width), ("height", height, limits.max_height)):
        if value % limits.size_multiple:
            raise InvalidRequest(
                f"'{field}' must be a multiple of {limits.size_multiple} for {name} (got {value})",
                param=field,
            )
        if not limits.min_size <= value <= most:
            raise InvalidRequest(
                f"'{field}' must be between {limits.min_size} and {most} for {name} (got {value})",
                param=field,
            )
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            f"width x height must be at most {limits.max_pixels} pixels for {name}", param="width"
        )


def resolve_params(
    req: ImageRequest, manifest: ModelManifest, server_limits: LimitSettings,
    loras: LoraSettings | None = None,
) -> GenerationParams:
    """Apply the model's defaults and limits; every refusal is a 400 naming the field."""
    _unsupported(req)
    caps = manifest.capabilities
    if req.negative_prompt is not None and not caps.negative_prompt:
        raise Unsupported(f"model {manifest.id} does not support 'negative_prompt'", param="negative_prompt")
    width, height = _size(req, manifest)
    steps = req.steps or manifest.defaults.steps
    _check_limits(req, width, height, steps, manifest, server_limits)
    # image_url / reference_images against the model's capabilities; the images are fetched later.
    conditioning, strength = conditioning_kind(req.image_url, req.reference_images, manifest)
    # image_loras: count, scales and the form of each path (the files are fetched later).
    lora_settings = loras or LoraSettings()
    lora_refs = resolve_loras(req.image_loras, manifest.id, caps.loras, lora_settings,
                              hotswap=manifest.uses_lora_slots(lora_settings))

    base_seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
    if base_seed + req.n - 1 > MAX_SEED:
        raise InvalidRequest(f"'seed' must be at most {MAX_SEED - req.n + 1} with n={req.n}", param="seed")
    fmt = req.output_format or "jpeg"
    return GenerationParams(
        model=manifest.id,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt or None,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=(
            req.guidance_scale if req.guidance_scale is not None else manifest.defaults.guidance_scale
        ),
        true_cfg_scale=manifest.defaults.true_cfg_scale,
        seeds=tuple(base_seed + i for i in range(req.n)),
        output_format="jpeg" if fmt == "jpg" else fmt,
        # One T5 length per call (it is in the batch key): the model's smallest fitting bucket.
        max_sequence_length=manifest.sequence_length(req.prompt, req.negative_prompt),
        conditioning=conditioning,
        strength=strength,
        loras=lora_refs,
    )


def response_kind(req: ImageRequest, default: str) -> Literal["b64_json", "url"]:
    fmt = req.response_format or default
    return "url" if fmt == "url" else "b64_json"
