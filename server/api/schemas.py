"""The request body of ``POST /v1/images/generations`` and its resolution into engine parameters.

Fields and defaults follow Together's API; OpenAI-style callers may send ``size: "WxH"`` and
``response_format: "b64_json"``; the fields only other SDKs send are decided in server/api/extras.py. Every
field has a strict type (server/api/fields.py): text is valid Unicode without NUL, numbers are JSON numbers,
booleans JSON booleans. Unknown fields are ignored, as Together does (and named in a log line).
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import LimitSettings, LoraSettings
from ..errors import InvalidRequest, Unsupported
from ..params import GenerationParams
from ..registry import ModelLimits, ModelManifest
from .conditioning import conditioning_kind
from .extras import SdkFields
from .fields import Choice, Flag, Integer, Number, Text, Url
from .loras import resolve_loras
from .sizing import MATCH_INPUT, Size, parse_aspect_ratio, parse_size, resolve_size

MAX_SEED = 2**63 - 1


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    path: Text
    scale: Number = 1.0


class ImageRequest(SdkFields):
    model_config = ConfigDict(extra="allow")

    prompt: Text = Field(min_length=1)
    model: Text | None = None
    steps: Integer | None = Field(default=None, ge=1)
    seed: Integer | None = Field(default=None, ge=0, le=MAX_SEED)
    n: Integer = Field(default=1, ge=1)
    width: Integer | None = Field(default=None, ge=1)
    height: Integer | None = Field(default=None, ge=1)
    size: Text | None = None
    negative_prompt: Text | None = None
    guidance_scale: Number | None = Field(default=None, ge=0, le=100)
    response_format: Choice[Literal["base64", "b64_json", "url"]] | None = None
    output_format: Choice[Literal["jpeg", "jpg", "png", "webp"]] | None = None
    image_url: Url | None = None
    reference_images: list[Url] | None = None
    image_loras: list[LoraSpec] | None = None
    disable_safety_checker: Flag | None = None

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @field_validator("aspect_ratio")
    @classmethod
    def _ratio_shape(cls, value: str | None) -> str | None:
        if value is not None:
            parse_aspect_ratio(value)
        return value

    def unknown_fields(self) -> list[str]:
        """Names of the fields sent that no schema here knows (ignored, as Together does)."""
        return sorted(self.model_extra or {})


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
        elif error["type"] in ("too_long", "string_too_long") and isinstance(error.get("input"), str):
            # pydantic counts "items" for a length limit on an annotated str: say characters.
            most = error.get("ctx", {}).get("max_length")
            message = f"invalid '{where}': must be at most {most} characters (got {len(error['input'])})"
        else:
            message = f"invalid '{where}': {error['msg'].removeprefix('Value error, ')}"
        raise InvalidRequest(message, param=field) from None


def input_image(req: ImageRequest) -> tuple[str | None, str]:
    """The input image's URL and the field it came from: ``image_url``, or together 1.x's ``image_base64``
    (plain base64 or a data URL) as a ``data:`` URL, so the guarded fetcher decodes it like any other."""
    if req.image_base64 is None:
        return req.image_url, "image_url"
    if req.image_url is not None:
        raise InvalidRequest("send the input image as 'image_url' or 'image_base64', not both",
                             param="image_base64")
    data = req.image_base64.strip()
    return (data if data[:5].lower() == "data:" else f"data:image/unknown;base64,{data}"), "image_base64"


def with_size(params: GenerationParams, size: Size) -> GenerationParams:
    """``params`` at another size (``match_input_image`` once the input image is known)."""
    exact = (size.width, size.height) == (size.gen_width, size.gen_height)
    return dataclasses.replace(
        params, width=size.gen_width, height=size.gen_height,
        output_width=None if exact else size.width, output_height=None if exact else size.height)


def names_size(req: ImageRequest) -> bool:
    """Whether the request states its output size or shape (``width``, ``height``, a ``WxH`` size or an
    ``aspect_ratio``), rather than leaving it to the model's defaults."""
    return (req.width is not None or req.height is not None or req.size not in (None, "auto")
            or req.aspect_ratio is not None)


def _check_limits(req: ImageRequest, steps: int, manifest: ModelManifest, limits: ModelLimits) -> None:
    name = manifest.id
    if req.n > limits.max_n:
        raise InvalidRequest(f"'n' must be at most {limits.max_n} for {name}", param="n")
    if steps > limits.max_steps:
        raise InvalidRequest(f"'steps' must be at most {limits.max_steps} for {name}", param="steps")
    for field, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        if text is not None and len(text) > limits.max_prompt_chars:
            raise InvalidRequest(f"'{field}' is longer than {limits.max_prompt_chars} characters",
                                 param=field)


def _check_conditioning(req: ImageRequest, image_url: str | None, image_field: str, conditioning: str,
                        steps: int, manifest: ModelManifest) -> None:
    """What an input image needs beyond the model's capability (conditioning_kind checks that)."""
    if req.aspect_ratio == MATCH_INPUT and not image_url:
        raise InvalidRequest(f"aspect_ratio '{MATCH_INPUT}' needs an input image ('image_url')",
                             param="aspect_ratio")
    # diffusers' img2img runs the last int(steps x strength) steps: at one step it starts from pure noise
    # and the input image would be silently ignored.
    if conditioning in ("img2img", "img2img+redux") and steps < 2:
        raise InvalidRequest(f"'{image_field}' needs at least 2 steps on {manifest.id} (got steps={steps})",
                             param="steps")


def resolve_params(
    req: ImageRequest, manifest: ModelManifest, server_limits: LimitSettings,
    loras: LoraSettings | None = None, *, image_url: str | None = None, image_field: str = "image_url",
) -> GenerationParams:
    """Apply the model's defaults and limits; every refusal is a 400 naming the field.

    ``image_url``: the input image when it does not come from the request's own ``image_url`` (an edit's
    upload, together 1.x's ``image_base64``: see ``input_image``), named ``image_field`` in errors.
    """
    caps = manifest.capabilities
    if req.negative_prompt is not None and not caps.negative_prompt:
        raise Unsupported(f"model {manifest.id} does not support 'negative_prompt'", param="negative_prompt")
    image_url = image_url if image_url is not None else req.image_url
    if image_url and image_field != "image_url" and not caps.image_to_image:
        raise Unsupported(f"'{image_field}' is not supported by model {manifest.id}", param=image_field)
    limits = manifest.effective_limits(server_limits)
    size = resolve_size(req.width, req.height, req.size, req.aspect_ratio, manifest, limits)
    steps = req.steps or manifest.defaults.steps
    _check_limits(req, steps, manifest, limits)
    # The input image / reference_images against the model's capabilities; the images are fetched later.
    conditioning, strength = conditioning_kind(image_url, req.reference_images, manifest)
    _check_conditioning(req, image_url, image_field, conditioning, steps, manifest)
    # image_loras: count, scales and the form of each path (the files are fetched later).
    lora_settings = loras or LoraSettings()
    lora_refs = resolve_loras(req.image_loras, manifest.id, caps.loras, lora_settings,
                              hotswap=manifest.uses_lora_slots(lora_settings))

    base_seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
    if base_seed + req.n - 1 > MAX_SEED:
        raise InvalidRequest(f"'seed' must be at most {MAX_SEED - req.n + 1} with n={req.n}", param="seed")
    fmt = req.output_format or "jpeg"
    params = GenerationParams(
        model=manifest.id,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt or None,
        width=size.gen_width,
        height=size.gen_height,
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
    return with_size(params, size)


def response_kind(req: ImageRequest, default: str) -> Literal["b64_json", "url"]:
    fmt = req.response_format or default
    return "url" if fmt == "url" else "b64_json"
