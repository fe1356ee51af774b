"""The in-process queue: bounded admission, and batches of compatible jobs for a worker.

A worker takes the oldest job, then waits at most the batch window for compatible jobs (equal
``batch_key``) to join it, up to a cap on images. Jobs it passes over keep their place in line.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from .errors import QueueFull
from .jobs import Job


class MemoryQueue:
    def __init__(self, max_jobs: int, retry_after_s: int = 1) -> None:
        self.max_jobs = max_jobs
        self.retry_after_s = retry_after_s
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, job: Job) -> None:
        with self._cond:
            if len(self._jobs) >= self.max_jobs:
                raise QueueFull(
                    f"the queue is full ({self.max_jobs} jobs waiting); retry later",
                    headers={"retry-after": str(self.retry_after_s), "x-should-retry": "true"},
                )
            self._jobs.append(job)
            self._cond.notify_all()

    def remove(self, job: Job) -> bool:
        with self._cond:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            return True

    def depth(self) -> int:
        with self._cond:
            return len(self._jobs)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list[Job]:
        """Take every waiting job out (used when no worker is left to run them)."""
        with self._cond:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs

    def take_batch(self, max_images: int, window_s: float, timeout_s: float = 0.5) -> list[Job]:
        """Block until a job is there (or ``timeout_s`` passes: empty list), then fill a batch."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._jobs or self._closed, timeout=timeout_s):
                return []
            if not self._jobs:
                return []
            first = self._jobs.popleft()
            batch, images, key = [first], first.params.n, first.params.batch_key()
            until = time.monotonic() + window_s
            while images < max_images:
                for job in list(self._jobs):
                    if job.params.batch_key() == key and images + job.params.n <= max_images:
                        self._jobs.remove(job)
                        batch.append(job)
                        images += job.params.n
                remaining = until - time.monotonic()
                if images >= max_images or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch
