"""The one batch-filling rule, used by both queue backends (server/queue/memory.py,
server/queue/redis_worker.py).

A worker takes the oldest job, then waits at most the batch window for compatible jobs (equal
``GenerationParams.batch_key()``) to join it, up to a cap on images (``scheduler.max_batch_images``) and on
pixels (``scheduler.max_batch_pixels``: the images times their width x height; compatible jobs share a
size, so it caps images at that size). Jobs it passes over keep their place in line. A lone job never waits
longer than the window, and always runs whole, even past a cap (its ``n`` is bounded by the model's
``max_n``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableSequence
from typing import TypeVar

from ..jobs import Job

J = TypeVar("J", bound=Job)


def fill_batch(
    first: J,
    pending: MutableSequence[J],
    max_images: int,
    window_s: float,
    more: Callable[[int, float], None],
    stopped: Callable[[], bool],
    max_pixels: int | None = None,
) -> list[Job]:
    """``first`` plus the compatible jobs of ``pending`` (taken out of it, oldest first), within the window.

    ``more(room, remaining_s)`` waits up to ``remaining_s`` seconds for jobs to arrive in ``pending`` (room:
    images the batch can still take); ``stopped()`` ends the wait early (the queue is closing).
    ``max_pixels``: the most pixels (images x width x height) a batch may hold; None: no cap.
    """
    if max_pixels is not None:
        max_images = min(max_images, max(1, max_pixels // (first.params.width * first.params.height)))
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
        more(max_images - images, remaining)
