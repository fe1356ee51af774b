"""What one ``darkroom serve`` process runs: the registry, the queue, storage and a worker per device."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from ..config import Settings
from ..engine.pipelines import Engine, resolve_devices
from ..queue import MemoryQueue
from ..registry import Registry
from ..storage import LocalStorage
from ..worker import Worker, fail_waiting

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    registry: Registry
    queue: MemoryQueue
    storage: LocalStorage
    workers: list[Worker] = field(default_factory=list)
    _watchdog: threading.Thread | None = None

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        registry = Registry.from_settings(settings.models_dir, settings.models)
        queue = MemoryQueue(settings.queue.max_jobs, settings.queue.retry_after_s)
        runtime = cls(settings, registry, queue, LocalStorage(settings.storage))
        for device in resolve_devices(settings.engine.devices):
            engine = Engine(registry, settings.engine, device)
            runtime.workers.append(
                Worker(engine, queue, settings.scheduler, settings.engine.cpu_threads)
            )
        return runtime

    def start(self) -> None:
        if not self.settings.server.api_keys:
            log.warning("no API keys configured: any bearer key is accepted")
        for worker in self.workers:
            worker.start()
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

    def accepting(self) -> bool:
        return any(not w.failed for w in self.workers)

    def readiness(self) -> tuple[bool, dict[str, str]]:
        states = {
            w.name: ("ready" if w.ready.is_set() else f"failed: {w.load_error}" if w.failed else "loading")
            for w in self.workers
        }
        return all(w.ready.is_set() for w in self.workers), states
