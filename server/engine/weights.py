"""Where ``from_pretrained`` reads any model's weights (pipelines, Redux priors, safety models), and in which
dtype: the one place that turns a ``WeightsSource`` (server/config/safety.py) into a location.

A builtin source is a tiny random-weight model, built offline on first use into ``engine.cache_dir``
(server/engine/tiny.py, tiny_flux2.py, tiny_control.py, tiny_safety.py); a path is made absolute (diffusers
and transformers take a relative one for a Hub id); a Hub id goes with its revision.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import WeightsSource
from .random_flux import RANDOM_MODELS
from .tiny import ensure_tiny_flux, ensure_tiny_flux_edit, ensure_tiny_redux
from .tiny_control import ensure_tiny_depth_model, ensure_tiny_flux_canny, ensure_tiny_flux_depth
from .tiny_flux2 import ensure_tiny_flux2, ensure_tiny_flux2_klein
from .tiny_safety import TINY_CHECKERS, ensure_tiny_checker

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_BUILTINS: dict[str, Callable[[Path], Path]] = {
    "tiny-flux": ensure_tiny_flux,
    "tiny-flux-edit": ensure_tiny_flux_edit,
    "tiny-redux": ensure_tiny_redux,
    "tiny-flux2": ensure_tiny_flux2,
    "tiny-flux2-klein": ensure_tiny_flux2_klein,
    "tiny-flux-canny": ensure_tiny_flux_canny,
    "tiny-flux-depth": ensure_tiny_flux_depth,
    "tiny-depth-anything": ensure_tiny_depth_model,
    **{name: (lambda cache, name=name: ensure_tiny_checker(name, cache)) for name in TINY_CHECKERS},
}


def ensure_builtin(name: str, cache_dir: Path) -> Path:
    """The folder of the tiny builtin ``name`` under ``cache_dir``, built once (concurrent callers wait)."""
    if name in RANDOM_MODELS:
        raise ValueError(f"builtin {name} is built in memory at load time (server/engine/random_flux.py) "
                         "and has no folder")
    if name not in _BUILTINS:
        raise ValueError(f"unknown builtin weights {name!r}; known: {', '.join(sorted(_BUILTINS))}")
    return _BUILTINS[name](cache_dir)


def source_location(source: WeightsSource, cache_dir: Path) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` reads ``source``, and the keyword arguments that go with it."""
    if source.builtin is not None:
        return str(ensure_builtin(source.builtin, cache_dir)), {}
    if source.path is not None:
        # An absolute path: a relative one is taken for a Hub id.
        return str(source.path.expanduser().resolve()), {}
    return str(source.hub), ({"revision": source.revision} if source.revision else {})


def resolve_dtype(name: str, device: str, cuda_auto: torch.dtype = torch.bfloat16) -> torch.dtype:
    """``name`` (float32, bfloat16, float16), or for ``auto``: ``cuda_auto`` on a CUDA device, else float32."""
    if name != "auto":
        return DTYPES[name]
    return cuda_auto if device.startswith("cuda") else torch.float32
