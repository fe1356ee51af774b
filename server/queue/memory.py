"""The in-process queue of ``darkroom serve``: bounded admission for the API, batches for the workers.

One object is both a ``JobQueue`` and the ``BatchSource`` of every worker of the process
(server/queue/protocol.py); batches are filled by the rule in server/queue/batching.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

from ..errors import QueueFull
from ..jobs import Job
from .batching import Arrivals, fill_batch


class MemoryQueue:
    """Thread-safe; the API's handlers put and withdraw, the workers' threads take batches.

    ``adaptive_window``: wait the batch window only while another job is expected (server/queue/batching.py).
    """

    def __init__(self, max_jobs: int, retry_after_s: int = 1, adaptive_window: bool = True) -> None:
        self.max_jobs = max_jobs
        self.retry_after_s = retry_after_s
        self.adaptive_window = adaptive_window
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._arrivals = Arrivals()

    def arriving(self) -> contextlib.AbstractContextManager[None]:
        """Around the API's handling of a request until its job is queued (or refused): a batch being filled
        waits for it (within the window) instead of starting without it. Nothing with the window fixed."""
        return self._arriving() if self.adaptive_window else contextlib.nullcontext()

    @contextlib.contextmanager
    def _arriving(self) -> Iterator[None]:
        with self._cond:
            self._arrivals.arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arrivals.arriving -= 1
                self._cond.notify_all()

    def requeue(self, jobs: Iterable[Job]) -> None:
        """Put started-then-returned jobs back at the head of the line, in order (a worker process died with
        them, server/worker/children.py); not counted against ``max_jobs``."""
        with self._cond:
            self._jobs.extendleft(reversed(list(jobs)))
            self._cond.notify_all()

    # the JobQueue protocol

    def start(self) -> None:
        pass

    async def admit(self, job: Job) -> None:
        self.put(job)

    def put(self, job: Job) -> None:
        """``admit`` for callers on a thread (the worker tests); never blocks."""
        with self._cond:
            if len(self._jobs) >= self.max_jobs:
                raise QueueFull(
                    f"the queue is full ({self.max_jobs} jobs waiting); retry later",
                    headers={"retry-after": str(self.retry_after_s), "x-should-retry": "true"},
                )
            self._jobs.append(job)
            if self.adaptive_window:  # what the adaptive window reads; nothing reads it otherwise
                self._arrivals.record(time.monotonic())
            self._cond.notify_all()

    async def reserve_withdrawal(self, job: Job) -> bool:
        return True  # no other process may have started it: the job's own state decides

    async def remove(self, job: Job) -> bool:
        with self._cond:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            return True

    def depth(self) -> int:
        with self._cond:
            return len(self._jobs)

    def status(self) -> tuple[bool, str] | None:
        return None  # nothing to reach

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    async def aclose(self) -> None:
        pass

    def drain(self) -> list[Job]:
        """Take every waiting job out (used when no worker is left to run them)."""
        with self._cond:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs

    # the BatchSource protocol

    def healthy(self) -> bool:
        return True

    def take_batch(self, max_images: int, window_s: float, timeout_s: float = 0.5,
                   max_pixels: int | None = None) -> list[Job]:
        """Block until a job is there (or ``timeout_s`` passes: empty list), then fill a batch."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._jobs or self._closed, timeout=timeout_s):
                return []
            if not self._jobs:
                return []
            first = self._jobs.popleft()
            expect_more = ((lambda: self._arrivals.expect_more(window_s, time.monotonic()))
                           if self.adaptive_window else None)
            return fill_batch(first, self._jobs, max_images, window_s,
                              lambda _room, remaining: self._cond.wait(remaining), lambda: self._closed,
                              max_pixels, expect_more)
