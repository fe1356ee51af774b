"""What one ``darkroom serve`` process runs: the registry, the queue, storage and a worker per device."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from ..engine.pipelines import Engine, resolve_devices
from ..fetch import Fetcher
from ..loras import LoraStore
from ..queue import MemoryQueue
from ..registry import Registry
from ..safety import PromptGuard
from ..storage import LocalStorage
from ..storage_s3 import S3Storage, open_storage
from ..worker import Worker, fail_waiting

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    registry: Registry
    queue: MemoryQueue | Any  # or a RedisQueue (server/queue_redis.py)
    storage: LocalStorage | S3Storage
    workers: list[Worker] = field(default_factory=list)
    prompt_guard: PromptGuard | None = None
    # The one guarded fetcher for URLs in requests (image_url, reference_images).
    fetcher: Fetcher | None = None
    # image_loras: the disk cache of LoRA files, shared by the API (prefetch) and this process's engines.
    lora_store: LoraStore | None = None
    # API keys and their rate limiter (server/api/keys.py, server/api/ratelimit.py).
    keys: Any = None
    limiter: Any = None
    _watchdog: threading.Thread | None = None

    def __post_init__(self) -> None:
        if self.fetcher is None:
            self.fetcher = Fetcher(self.settings.fetch)
        if self.lora_store is None:
            self.lora_store = LoraStore.from_settings(self.settings)
        if self.prompt_guard is None:
            self.prompt_guard = PromptGuard(self.settings.safety, self.settings.engine.cache_dir)
        from .keys import KeyStore, open_limiter

        if self.keys is None:
            self.keys = KeyStore(self.settings, self.registry)
        if self.limiter is None:
            self.limiter = open_limiter(self.settings)

    @classmethod
    def build(cls, settings: Settings, with_workers: bool = True) -> Runtime:
        """``with_workers=False``: an API pod (`darkroom api`), whose jobs run in worker pods."""
        registry = Registry.from_settings(settings.models_dir, settings.models)
        if settings.queue.backend == "redis":
            from ..queue_redis import RedisQueue
            from ..worker_process import redis_workers

            runtime = cls(settings, registry, RedisQueue(settings.queue), open_storage(settings.storage))
            if with_workers:  # `darkroom serve` on Redis: this process's GPUs join the shared queue
                runtime.workers += redis_workers(settings, registry)
            return runtime
        queue = MemoryQueue(settings.queue.max_jobs, settings.queue.retry_after_s)
        runtime = cls(settings, registry, queue, open_storage(settings.storage))
        for device in resolve_devices(settings.engine.devices):
            engine = Engine(registry, settings.engine, device, settings.safety, loras=runtime.lora_store)
            runtime.workers.append(
                Worker(engine, queue, settings.scheduler, settings.engine.cpu_threads)
            )
        return runtime

    def start(self) -> None:
        if self.keys.open:
            log.warning("no API keys configured: any bearer key is accepted")
        start_queue = getattr(self.queue, "start", None)
        if start_queue is not None:
            start_queue()
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
            fail_waiting(self.queue, "; ".join(w.load_error or "" for w in self.workers))

    def stop(self) -> None:
        self.queue.close()
        for worker in self.workers:
            worker.stop()
            if worker.queue is not self.queue:  # a worker's own Redis source: return unstarted jobs
                worker.queue.close()
        if self.fetcher is not None:
            self.fetcher.close()
        if self.lora_store is not None:
            self.lora_store.close()
        if self.limiter is not None:
            self.limiter.close()

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
            engine_counters = getattr(worker.engine, "safety_counters", None)
            for name, value in (engine_counters.snapshot() if engine_counters else {}).items():
                counts[name] = counts.get(name, 0) + value
        return {"enabled": self.settings.safety.enabled, "prompt_stage": self.guard.state(),
                "counters": counts}

    def pipeline_calls(self) -> int:
        return sum(w.engine.calls for w in self.workers if isinstance(getattr(w.engine, "calls", None), int))

    def readiness(self) -> tuple[bool, dict[str, str]]:
        states = {
            w.name: ("ready" if w.ready.is_set() else f"failed: {w.load_error}" if w.failed else "loading")
            for w in self.workers
        }
        ready = all(w.ready.is_set() for w in self.workers) and self.guard.loaded.is_set()
        queue_status = getattr(self.queue, "status", None)
        if queue_status is not None:  # Redis: not ready while it is unreachable
            queue_ok, states["queue"] = queue_status()
            ready = ready and queue_ok
        return ready, states
