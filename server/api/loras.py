"""``image_loras`` in a request: how many, what scales, and the form of each path, checked with no I/O.

The files themselves are fetched and checked later, through the LoRA store (server/loras.py): by the API
before the job is queued when ``loras.prefetch`` is on, and by the worker in any case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..config import LoraSettings
from ..errors import InvalidRequest, Unsupported
from ..loras import FIELD, shown_path
from ..params import LoraRef


def resolve_loras(specs: Sequence[Any] | None, model_id: str, supported: bool,
                  settings: LoraSettings, hotswap: bool | None = None) -> tuple[LoraRef, ...]:
    """``image_loras`` → plain ``LoraRef``s; what is wrong is refused with no I/O (400 naming the field).

    ``hotswap``: whether the model's LoRAs go into hotswap slots (``ModelManifest.uses_lora_slots``;
    default ``loras.hotswap``): then at most ``loras.hotswap_slots`` LoRAs per request.
    """
    if not specs:
        return ()
    if not supported:
        raise Unsupported(f"'{FIELD}' is not supported by model {model_id}", param=FIELD)
    most = settings.max_per_request(hotswap)
    if len(specs) > most:
        raise InvalidRequest(f"'{FIELD}' may hold at most {most} LoRAs for {model_id} (got {len(specs)})",
                             param=FIELD)
    refs: list[LoraRef] = []
    for i, spec in enumerate(specs):
        path, scale = str(spec.path).strip(), float(spec.scale)
        where = f"{FIELD}[{i}]"
        if not path:
            raise InvalidRequest(f"'{where}.path' must not be empty", param=FIELD)
        if not math.isfinite(scale) or not settings.min_scale <= scale <= settings.max_scale:
            raise InvalidRequest(
                f"'{where}.scale' for LoRA '{shown_path(path)}' must be between {settings.min_scale:g} and "
                f"{settings.max_scale:g} (got {scale:g})", param=FIELD)
        if path not in settings.registered:
            scheme = path.partition(":")[0].lower()
            if "://" not in path or scheme not in ("http", "https"):
                names = ", ".join(sorted(settings.registered)) or "none"
                raise InvalidRequest(
                    f"'{where}.path' '{shown_path(path)}' is neither an http(s) URL nor a LoRA registered on "
                    f"this server (registered: {names})", param=FIELD)
        if any(r.path == path for r in refs):
            raise InvalidRequest(f"LoRA '{shown_path(path)}' appears twice in '{FIELD}'; give it once with "
                                 "the sum of the scales", param=FIELD)
        refs.append(LoraRef(path=path, scale=scale))
    return tuple(refs)
