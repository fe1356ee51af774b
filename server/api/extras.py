"""Fields the official SDKs can send beyond Together's image schema, and the decision for each.

Nothing a client sends is dropped without a decision (README, "Request fields"):

- honoured: ``image_base64`` (together 1.x: the input image, as ``image_url``), ``aspect_ratio`` (sizing,
  server/api/sizing.py), ``output_compression`` (openai: JPEG/WebP quality 0-100; PNG is lossless, so there
  it is ignored with a log line), ``background`` (``opaque``/``auto``: FLUX images are opaque;
  ``transparent`` is a 400), ``user`` / ``safety_identifier`` (the request's log line), ``stream: false``.
- accepted and ignored, with one log line per request naming them: ``quality``, ``style``, ``moderation``
  (the operator's ``safety`` settings decide), ``complexity``, ``input_fidelity``, ``partial_images``
  (streaming only).
- refused with a 400 naming the field: ``stream: true`` (no streaming), ``frame_count`` /
  ``frame_duration_ms`` (GIF output), ``svg`` (SVG output); ``output_format`` ``gif``/``svg`` are refused
  by the schema.
- any other field: ignored, as Together does, and named in the same log line.

Field lists from the installed clients: openai ``types/image_generate_params.py`` and
``types/image_edit_params.py``, together 1.x ``resources/images.py`` (``image_base64``), together 3.x
``types/image_generate_params.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from ..errors import Unsupported
from .fields import Choice, Flag, Integer, Text, Url

IGNORED = ("quality", "style", "moderation", "complexity", "input_fidelity", "partial_images")
REFUSED = {
    "frame_count": "animated GIF output is not supported; output_format is jpeg, png or webp",
    "frame_duration_ms": "animated GIF output is not supported; output_format is jpeg, png or webp",
    "svg": "SVG output is not supported; output_format is jpeg, png or webp",
}
# Most names an ignored-fields log line lists.
_LOGGED_NAMES = 20


class SdkFields(BaseModel):
    """The fields of the openai and together 1.x clients that Together's schema does not have."""

    image_base64: Url | None = None
    aspect_ratio: Text | None = None
    background: Choice[Literal["transparent", "opaque", "auto"]] | None = None
    output_compression: Integer | None = Field(default=None, ge=0, le=100)
    user: Text | None = Field(default=None, max_length=256)
    safety_identifier: Text | None = Field(default=None, max_length=256)
    stream: Flag | None = None
    quality: Text | None = Field(default=None, max_length=64)
    style: Text | None = Field(default=None, max_length=64)
    moderation: Text | None = Field(default=None, max_length=64)
    complexity: Text | None = Field(default=None, max_length=64)
    input_fidelity: Text | None = Field(default=None, max_length=64)
    partial_images: Integer | None = Field(default=None, ge=0)
    frame_count: Integer | None = None
    frame_duration_ms: Integer | None = None
    svg: Any = None

    @model_validator(mode="after")
    def _refused(self) -> SdkFields:
        for name, reason in REFUSED.items():
            if getattr(self, name) is not None:
                raise_unsupported(name, reason)
        if self.stream:
            raise_unsupported("stream", "streaming is not supported; send stream false or leave it out")
        if self.background == "transparent":
            raise_unsupported("background", "FLUX images are opaque: 'background' may be 'opaque' or 'auto'")
        return self


def raise_unsupported(field: str, reason: str) -> None:
    """400 ``unsupported_parameter`` naming ``field`` (raised through pydantic: it is no ValueError)."""
    raise Unsupported(f"'{field}': {reason}", param=field)


@dataclass(frozen=True)
class Extras:
    """What the request's SDK fields decide beyond the generation itself."""

    # JPEG/WebP quality (openai's output_compression), None: the encoder's default.
    output_quality: int | None
    # Who the client says the end user is (openai's user / safety_identifier), for the request log.
    user: str | None
    # Fields accepted and ignored (named in one log line).
    ignored: tuple[str, ...]


def resolve_extras(fields: SdkFields, output_format: str, unknown: list[str]) -> Extras:
    """The decisions above for one validated request; ``unknown`` are the names of fields no SDK sends."""
    ignored = [name for name in IGNORED if getattr(fields, name) is not None]
    quality = fields.output_compression
    if quality is not None and output_format == "png":
        ignored.append("output_compression")  # lossless: nothing to set
        quality = None
    shown = [ascii(name)[1:-1] for name in unknown[:_LOGGED_NAMES]]
    return Extras(output_quality=quality, user=fields.safety_identifier or fields.user,
                  ignored=tuple(ignored + shown))
