"""The one batch-filling rule, used by both queue backends (server/queue/memory.py,
server/queue/redis_worker.py).

A worker takes the oldest job, then waits at most the batch window for compatible jobs (equal
``GenerationParams.batch_key()``) to join it, up to a cap on images (``scheduler.max_batch_images``) and on
pixels (``scheduler.max_batch_pixels``: the images times their width x height; compatible jobs share a
size, so it caps images at that size). Jobs it passes over keep their place in line. A lone job never waits
longer than the window, and always runs whole, even past a cap (its ``n`` is bounded by the model's
``max_n``).

On the in-process queue the window is adaptive (``scheduler.adaptive_window``): it is waited only while
another job may well join, that is while the API is receiving a request (``Arrivals.arriving``) or recent
traffic is bursty (at least a quarter of the gaps between the arrivals of the last second were within one
window). So a lone request on a quiet server starts at once instead of paying the window, and bursts still
batch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, MutableSequence
from typing import TypeVar

from ..jobs import Job
from ..params import images_per_call

J = TypeVar("J", bound=Job)

# The share of recent arrival gaps within one window above which more arrivals are expected.
BURSTY = 0.25


class Arrivals:
    """What a queue knows of jobs to come. Not thread-safe: used under its queue's lock."""

    def __init__(self) -> None:
        self.arriving = 0  # requests the API is receiving and validating now (not yet queued)
        self._times: deque[float] = deque(maxlen=32)

    def record(self, now: float) -> None:
        self._times.append(now)

    def expect_more(self, window_s: float, now: float) -> bool:
        """Whether waiting ``window_s`` for another job is worth it."""
        if self.arriving > 0:
            return True
        horizon = max(1.0, 100 * window_s)
        recent = [t for t in self._times if now - t <= horizon]
        gaps = [later - earlier for earlier, later in zip(recent, recent[1:])]
        return bool(gaps) and sum(gap <= window_s for gap in gaps) >= BURSTY * len(gaps)


def fill_batch(
    first: J,
    pending: MutableSequence[J],
    max_images: int,
    window_s: float,
    more: Callable[[int, float], None],
    stopped: Callable[[], bool],
    max_pixels: int | None = None,
    expect_more: Callable[[], bool] | None = None,
) -> list[Job]:
    """``first`` plus the compatible jobs of ``pending`` (taken out of it, oldest first), within the window.

    ``more(room, remaining_s)`` waits up to ``remaining_s`` seconds for jobs to arrive in ``pending`` (room:
    images the batch can still take); ``stopped()`` ends the wait early (the queue is closing).
    ``max_pixels``: the most pixels (images x width x height) a batch may hold; None: no cap.
    ``expect_more()`` (the adaptive window, ``Arrivals.expect_more``), when given, ends the wait as soon as
    no other job is expected.
    """
    max_images = images_per_call(max_images, max_pixels, first.params.width, first.params.height)
    batch: list[Job] = [first]
    images, key = first.params.n, first.params.batch_key()
    until = time.monotonic() + window_s
    while True:
        for job in list(pending):
            if images >= max_images:
                break
            if job.params.batch_key() == key and images + job.params.n <= max_images:
                pending.remove(job)
                batch.append(job)
                images += job.params.n
        remaining = until - time.monotonic()
        if images >= max_images or remaining <= 0 or stopped():
            return batch
        if expect_more is not None and not expect_more():
            return batch
        more(max_images - images, remaining)
