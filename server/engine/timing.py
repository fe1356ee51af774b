"""Per-stage timings of one diffusers pipeline call: text encoding, denoising and VAE decoding.

For the length of the call, ``pipe.encode_prompt`` and ``pipe.vae.decode`` are shadowed by timing wrappers
on the instances (the classes are untouched, and the wrappers are removed afterwards). Denoising is the
time between the end of the last prompt encoding and the start of the VAE decode: the latent preparation
and the transformer steps. On CUDA the device is synchronized at each boundary so kernels are counted in
the stage that queued them. ``Engine.generate`` returns them with its images (``Generation``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image


@dataclasses.dataclass(frozen=True)
class Generation:
    """What one pipeline call returns: each request's images, in batch order, and the call's seconds per
    stage (``text_encode``, ``denoise``, ``vae_decode``; empty when nothing was timed)."""

    images: list[list[Image.Image]]
    stages: dict[str, float] = dataclasses.field(default_factory=dict)


class StageTimes:
    def __init__(self) -> None:
        self.text_encode = 0.0
        self.vae_decode = 0.0
        self.encode_end: float | None = None
        self.decode_start: float | None = None

    def as_dict(self) -> dict[str, float]:
        out = {"text_encode": self.text_encode}
        if self.encode_end is not None and self.decode_start is not None:
            out["denoise"] = max(0.0, self.decode_start - self.encode_end)
        out["vae_decode"] = self.vae_decode
        return out


def _sync(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def stage_timer(pipe: Any, device: str) -> Iterator[StageTimes]:
    times = StageTimes()
    sync = _sync(device)
    targets: list[tuple[Any, str]] = []

    def wrap(owner: Any, name: str, on_done: Callable[[float, float], None]) -> None:
        original = getattr(owner, name, None)
        if original is None or name in vars(owner):
            return  # absent, or already wrapped (a nested call): leave it

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync()
            started = time.perf_counter()
            result = original(*args, **kwargs)
            sync()
            on_done(started, time.perf_counter())
            return result

        object.__setattr__(owner, name, timed)
        targets.append((owner, name))

    def encoded(started: float, ended: float) -> None:
        times.text_encode += ended - started
        times.encode_end = ended

    def decoded(started: float, ended: float) -> None:
        times.vae_decode += ended - started
        if times.decode_start is None:
            times.decode_start = started

    wrap(pipe, "encode_prompt", encoded)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        wrap(vae, "decode", decoded)
    try:
        yield times
    finally:
        for owner, name in targets:
            with contextlib.suppress(AttributeError):
                object.__delattr__(owner, name)
