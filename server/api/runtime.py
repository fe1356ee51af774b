"""What one API process runs: the registry, the queue, storage, the guards, and (``darkroom serve``) its own
workers, one per device.

The API never builds a worker itself: ``darkroom serve`` passes ``Runtime.build`` a factory
(server/worker/wiring.py ``serve_workers``) and an API pod (``darkroom api``) passes none, so this package
imports neither the worker nor the engine (nor torch). Workers are known only through ``WorkerHandle``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import Settings
from ..fetch import Fetcher
from ..loras import LoraStore
from ..metrics import WorkerStatus, compile_summary
from ..queue.memory import MemoryQueue
from ..queue.protocol import BatchSource, JobQueue
from ..queue.submit import fail_waiting
from ..registry import Registry
from .keys import KeyStore, open_limiter
from .lanes import Lanes
from .ratelimit import Limiter
from .safety import PromptGuard
from .storage import LocalStorage
from .storage_s3 import S3Storage, open_storage

log = logging.getLogger(__name__)


class WorkerHandle(WorkerStatus, Protocol):
    """What the runtime needs from a worker of its own process (server/worker/loop.py ``Worker``)."""

    source: BatchSource

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the batch in hand, then stop taking jobs."""

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for the worker: it returns early only when it failed for good (loading, or its device in
        a server without worker processes), or on stop."""


# (settings, registry, the API's queue, the process's LoRA store) -> this process's workers.
WorkerFactory = Callable[[Settings, Registry, JobQueue, LoraStore], Sequence[WorkerHandle]]


@dataclass
class Runtime:
    settings: Settings
    registry: Registry
    queue: JobQueue
    storage: LocalStorage | S3Storage
    workers: list[WorkerHandle] = field(default_factory=list)
    prompt_guard: PromptGuard | None = None
    # The one guarded fetcher for URLs in requests (image_url, reference_images).
    fetcher: Fetcher | None = None
    # image_loras: the disk cache of LoRA files, shared by the API (prefetch) and this process's engines.
    lora_store: LoraStore | None = None
    # API keys and their rate limiter (server/api/keys.py, server/api/ratelimit.py).
    keys: KeyStore | None = None
    limiter: Limiter | None = None
    # The bounded executors of blocking work a request may bring (server/api/lanes.py).
    lanes: Lanes | None = None
    _watchdog: threading.Thread | None = None

    def __post_init__(self) -> None:
        if self.fetcher is None:
            self.fetcher = Fetcher(self.settings.fetch)
        if self.lora_store is None:
            self.lora_store = LoraStore.from_settings(self.settings)
        if self.prompt_guard is None:
            self.prompt_guard = PromptGuard(self.settings.safety, self.settings.engine.cache_dir)
        if self.keys is None:
            self.keys = KeyStore(self.settings, self.registry)
        if self.limiter is None:
            self.limiter = open_limiter(self.settings)
        if self.lanes is None:
            self.lanes = Lanes(self.settings)

    @classmethod
    def build(cls, settings: Settings, workers: WorkerFactory | None = None) -> Runtime:
        """The runtime of an API process from its settings.

        ``workers`` builds this process's own workers (``darkroom serve``); None: an API pod
        (``darkroom api``), whose jobs run in worker pods.
        """
        registry = Registry.from_settings(settings.models_dir, settings.models, settings.aliases)
        queue: JobQueue
        if settings.queue.backend == "redis":
            # The redis package is an extra (darkroom[scale]): imported only when the queue is on Redis.
            from ..queue.redis_api import RedisQueue

            queue = RedisQueue(settings.queue)
        else:
            queue = MemoryQueue(settings.queue.max_jobs, settings.queue.retry_after_s,
                                settings.scheduler.adaptive_window)
        runtime = cls(settings, registry, queue, open_storage(settings.storage))
        if workers is not None:
            assert runtime.lora_store is not None
            runtime.workers += workers(settings, registry, queue, runtime.lora_store)
        return runtime

    def start(self) -> None:
        if self.keys is not None and self.keys.open:
            log.warning("no API keys configured: any bearer key is accepted")
        self.queue.start()
        for worker in self.workers:
            worker.start()
        self.guard.start_loading()
        self._watchdog = threading.Thread(target=self._watch_loading, name="load-watch", daemon=True)
        self._watchdog.start()

    def _watch_loading(self) -> None:
        """If every worker fails to load, answer the waiting jobs with 503 instead of leaving them."""
        for worker in self.workers:
            worker.join()  # returns early only when loading failed or on stop
        if self.workers and all(w.failed for w in self.workers):
            fail_waiting(self.queue, "; ".join(w.state for w in self.workers))

    def stop(self) -> None:
        self.queue.close()
        for worker in self.workers:
            worker.stop()
            if worker.source is not self.queue:  # a worker's own Redis source: return unstarted jobs
                worker.source.close()
        if self.fetcher is not None:
            self.fetcher.close()
        if self.lora_store is not None:
            self.lora_store.close()
        if self.lanes is not None:
            self.lanes.close()

    async def aclose(self) -> None:
        """Release what the event loop holds (Redis connections of the queue and the limiter)."""
        await self.queue.aclose()
        if self.limiter is not None:
            await self.limiter.aclose()

    @property
    def guard(self) -> PromptGuard:
        assert self.prompt_guard is not None
        return self.prompt_guard

    def accepting(self) -> bool:
        # An API pod has no workers of its own; its jobs wait in Redis for worker pods.
        return (not self.workers or any(not w.failed for w in self.workers)) and not self.guard.failed

    def safety_report(self) -> dict[str, object]:
        """Plain counters of the safety stages, summed over the API and every worker."""
        counts = self.guard.counters.snapshot()
        for worker in self.workers:
            for name, value in worker.safety_counters.snapshot().items():
                counts[name] = counts.get(name, 0) + value
        return {"enabled": self.settings.safety.enabled, "prompt_stage": self.guard.state(),
                "counters": counts}

    def pipeline_calls(self) -> int:
        return sum(w.calls for w in self.workers)

    def compile_report(self) -> dict[str, Any]:
        """torch.compile's graphs and recompiles after ready of this process's workers (metrics.py)."""
        return compile_summary(self.workers)

    def readiness(self) -> tuple[bool, dict[str, str]]:
        states = {w.name: w.state for w in self.workers}
        ready = all(w.ready.is_set() for w in self.workers) and self.guard.loaded.is_set()
        queue_status = self.queue.status()
        if queue_status is not None:  # Redis: not ready while it is unreachable
            queue_ok, states["queue"] = queue_status
            ready = ready and queue_ok
        return ready, states
