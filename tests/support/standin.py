"""A stand-in engine: it satisfies the worker's ``DeviceEngine`` protocol (server/worker/loop.py) with no
model, so everything around the engine (the worker loop, the queue, the API in-process, worker processes) is
tested quickly.

Each image is a solid colour made from its seed (red channel ``seed % 256``), at the requested size (or, with
``texture``, a noisy gradient that costs a real encoder real work, for benchmarks); calls are recorded. Faults
are injected the way a real pipeline raises them:

- ``fail_calls`` (1-based call numbers) raise ``error`` (e.g. a sticky "CUDA error: an illegal memory
  access");
- every prompt and negative prompt is encoded to UTF-8 first, as a tokenizer does, so a lone surrogate
  (``"\\ud800"``) raises ``UnicodeEncodeError`` for the whole call; a prompt containing ``poison`` raises
  ``poison_error`` (by default a plain RuntimeError; e.g. a sticky CUDA error to kill a worker process);
- a call of more than ``max_images`` images raises ``torch.OutOfMemoryError``, as a GPU would;
- ``hang_calls`` (and calls with a prompt containing ``hang_on``) block until ``release`` is set (or
  ``hang_s`` passes): a hung pipeline call;
- ``delay_s``: every call holds the "device" that long in a sleep that releases the GIL, like a GPU kernel;
- ``screen_gate``: the safety screen (post-processing) waits for it: a slow consumer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from server.engine.timing import Generation
from server.metrics import SafetyCounters
from server.params import GenerationParams


class StandInEngine:
    """Fails the calls it is told to fail; no image checker (nothing is refused)."""

    device = "cpu"

    def __init__(self, fail_calls: Sequence[int] = (), error: Exception | None = None,
                 load_error: Exception | None = None, delay_s: float = 0.0, *, poison: str | None = None,
                 poison_error: Exception | None = None,
                 max_images: int | None = None, hang_calls: Sequence[int] = (), hang_on: str | None = None,
                 hang_s: float = 3600.0,
                 texture: bool = False, device: str = "cpu") -> None:
        self.device = device
        self.fail_calls = set(fail_calls)
        self.error = error or RuntimeError("the stand-in pipeline failed")
        self.load_error = load_error
        # Seconds each call takes, so tests can keep a worker busy.
        self.delay_s = delay_s
        self.poison = poison
        self.poison_error = poison_error or RuntimeError("the stand-in tokenizer cannot read this prompt")
        self.max_images = max_images
        self.hang_calls = set(hang_calls)
        self.hang_on = hang_on
        self.hang_s = hang_s
        self.release = threading.Event()
        self.screen_gate: threading.Event | None = None
        self.texture = texture
        self.calls: list[list[GenerationParams]] = []
        self.freed = 0
        self.loaded = self.warmed = False
        self.safety_counters = SafetyCounters()
        self._lock = threading.Lock()
        self._textures: dict[tuple[int, int], Image.Image] = {}

    def load(self) -> None:
        if self.load_error is not None:
            raise self.load_error
        self.loaded = True

    def warmup(self, max_batch_images: int = 1, max_batch_pixels: int | None = None) -> int:
        self.warmed = True
        return 0  # no pipeline calls

    def compile_report(self) -> dict[str, object]:
        return {"graphs": 0, "recompiles_after_ready": 0, "stance": "default"}  # nothing compiles here

    def generate(self, batch: Sequence[GenerationParams]) -> Generation:
        """No stage timer: the worker reports only safety and encoding for these calls."""
        with self._lock:
            self.calls.append(list(batch))
            call = len(self.calls)
        for p in batch:  # what a tokenizer does first
            p.prompt.encode("utf-8")
            (p.negative_prompt or "").encode("utf-8")
            if self.poison is not None and self.poison in p.prompt:
                raise self.poison_error
        hang = self.hang_on is not None and any(self.hang_on in p.prompt for p in batch)
        if call in self.hang_calls or hang:
            self.release.wait(self.hang_s)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.max_images is not None and sum(p.n for p in batch) > self.max_images:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (stand-in)")
        if call in self.fail_calls:
            raise self.error
        return Generation([[self._image(p, seed) for seed in p.seeds] for p in batch])

    def _image(self, p: GenerationParams, seed: int) -> Image.Image:
        if not self.texture:
            return Image.new("RGB", (p.width, p.height), (seed % 256, 40, 200))
        size = (p.width, p.height)
        if size not in self._textures:
            rng = np.random.default_rng(0)
            ramp = np.linspace(0, 200, p.width, dtype=np.float32)[None, :, None]
            noise = rng.normal(0, 12, (p.height, p.width, 3)).astype(np.float32)
            self._textures[size] = Image.fromarray(np.clip(ramp + noise + 20, 0, 255).astype(np.uint8), "RGB")
        return self._textures[size].copy()

    def screen(self, batch: Sequence[GenerationParams],
               outputs: Sequence[Sequence[Image.Image]]) -> list[None]:
        """No image checker: nothing is refused."""
        if self.screen_gate is not None:
            self.screen_gate.wait()
        return [None] * len(batch)

    def loras_ready(self, params: GenerationParams) -> bool:
        return True

    def fetch_loras(self, params: GenerationParams) -> None:
        """Nothing to fetch: every LoRA is ready (``loras_ready``)."""

    def free_memory(self) -> None:
        self.freed += 1

    def stats(self) -> dict[str, float]:
        return {}


def stand_in_engine(device: str = "cpu", **options: Any) -> StandInEngine:
    """A stand-in engine for ``device``; with ``functools.partial`` a picklable factory that worker processes
    can call (server/worker/wiring.py ``engine_for``)."""
    return StandInEngine(device=device, **options)
