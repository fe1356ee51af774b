"""The two contracts of a queue backend: what the API needs from it, and what a worker needs from it.

``MemoryQueue`` (server/queue/memory.py) is both at once, in one process. On Redis the API side is
``RedisQueue`` (server/queue/redis_api.py) and each worker reads through its own ``RedisSource``
(server/queue/redis_worker.py).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from ..jobs import Job


class JobQueue(Protocol):
    """What the API needs from a queue backend. The coroutines run on the event loop and never block it (a
    Redis backend bounds each by ``queue.redis_timeout_s``); the plain methods return at once."""

    def start(self) -> None:
        """Begin background work (the Redis listener and prober); never waits for the backend."""

    async def admit(self, job: Job) -> None:
        """Admit and enqueue a job: ``QueueFull`` (503, overloaded) when too many wait,
        ``ServiceUnavailable`` (503) when the backend is unreachable or does not answer in time."""

    async def reserve_withdrawal(self, job: Job) -> bool:
        """Claim a queued job back before any worker starts it; False once a worker has (let it finish)."""

    async def remove(self, job: Job) -> bool:
        """Take a withdrawn job out of the queue; False when it was no longer there."""

    def depth(self) -> int:
        """Jobs waiting for a worker (not yet running); for Redis, as last seen (at most ~1 s old)."""

    def drain(self) -> list[Job]:
        """Take out every waiting job this process alone can run (none on a shared queue)."""

    def arriving(self) -> contextlib.AbstractContextManager[None]:
        """Around the API's handling of a request until its job is admitted: a backend whose batch window
        adapts to arrivals (the in-process queue) waits for it; others do nothing."""

    def status(self) -> tuple[bool, str] | None:
        """(reachable, description) for /ready; None when the backend has nothing to report."""

    def close(self) -> None:
        """Stop; jobs still waiting on this process's side are answered."""

    async def aclose(self) -> None:
        """Release what the event loop holds (connections); after ``close``."""


class BatchSource(Protocol):
    """What a worker needs from where its jobs come from."""

    def take_batch(self, max_images: int, window_s: float, timeout_s: float = 0.5,
                   max_pixels: int | None = None) -> list[Job]:
        """Block up to ``timeout_s`` for a job (empty list: none came), then fill a batch of compatible jobs
        (server/queue/batching.py) within ``window_s``, up to ``max_images`` and ``max_pixels``."""

    def healthy(self) -> bool:
        """Whether the source can deliver jobs (Redis answers)."""

    def close(self) -> None:
        """Stop taking jobs; jobs taken but not started go back to the queue."""
