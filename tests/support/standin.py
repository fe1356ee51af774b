"""A stand-in engine: it satisfies the worker's ``DeviceEngine`` protocol (server/worker/loop.py) with no
model, so everything around the engine (the worker loop, the queue, the API in-process) is tested quickly.

Each image is a solid colour made from its seed (red channel ``seed % 256``), at the requested size; calls
are recorded, and the calls numbered in ``fail_calls`` (1-based) raise ``error``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from PIL import Image

from server.engine.timing import Generation
from server.metrics import SafetyCounters
from server.params import GenerationParams


class StandInEngine:
    """Fails the calls it is told to fail; no image checker (nothing is refused)."""

    device = "cpu"

    def __init__(self, fail_calls: Sequence[int] = (), error: Exception | None = None,
                 load_error: Exception | None = None, delay_s: float = 0.0) -> None:
        self.fail_calls = set(fail_calls)
        self.error = error or RuntimeError("CUDA error: an illegal memory access was encountered")
        self.load_error = load_error
        # Seconds each call takes, so tests can keep a worker busy.
        self.delay_s = delay_s
        self.calls: list[list[GenerationParams]] = []
        self.loaded = self.warmed = False
        self.safety_counters = SafetyCounters()
        self._lock = threading.Lock()

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
        if self.delay_s:
            time.sleep(self.delay_s)
        if call in self.fail_calls:
            raise self.error
        return Generation([
            [Image.new("RGB", (p.width, p.height), (seed % 256, 40, 200)) for seed in p.seeds]
            for p in batch
        ])

    def screen(self, batch: Sequence[GenerationParams],
               outputs: Sequence[Sequence[Image.Image]]) -> list[None]:
        """No image checker: nothing is refused."""
        return [None] * len(batch)
