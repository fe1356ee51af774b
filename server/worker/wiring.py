"""The one place that puts an engine and a worker on each device of a process.

``darkroom serve`` (server/cli.py) hands ``serve_workers`` to the API's runtime; ``darkroom worker``
(server/worker/process.py) calls ``device_workers`` with a Redis consumer per device. Either way one LoRA
disk cache (server/loras.py) serves every engine of the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import Settings
from ..engine.pipelines import Engine, resolve_devices
from ..loras import LoraStore
from ..queue.memory import MemoryQueue
from ..queue.protocol import BatchSource, JobQueue
from ..registry import Registry
from .loop import DeviceEngine, Worker

if TYPE_CHECKING:
    from ..queue.redis_worker import RedisSource


def device_workers(settings: Settings, registry: Registry, source_for: Callable[[str], BatchSource],
                   lora_store: LoraStore | None = None,
                   engine_for: Callable[[str], DeviceEngine] | None = None) -> list[Worker]:
    """One engine and one worker per device of ``engine.devices``; ``source_for(device)``: its jobs.

    ``engine_for(device)`` replaces the diffusers ``Engine`` (a stand-in engine in tests).
    """
    store = lora_store if lora_store is not None else LoraStore.from_settings(settings)
    workers = []
    for device in resolve_devices(settings.engine.devices):
        engine = (engine_for(device) if engine_for is not None else
                  Engine(registry, settings.engine, device, settings.safety, loras=store))
        workers.append(Worker(engine, source_for(device), settings.scheduler, settings.engine.cpu_threads))
    return workers


def redis_sources(settings: Settings) -> Callable[[str], RedisSource]:
    """A Redis consumer per device, named ``<worker.name or host-pid>-<device>`` in the workers' group."""
    # The redis package is an extra (darkroom[scale]): imported only when the queue is on Redis.
    from ..queue.redis_keys import default_instance_name
    from ..queue.redis_worker import RedisSource

    base = settings.worker.name or default_instance_name()
    return lambda device: RedisSource(settings.queue, f"{base}-{device}")


def serve_workers(settings: Settings, registry: Registry, queue: JobQueue, lora_store: LoraStore,
                  engine_for: Callable[[str], DeviceEngine] | None = None) -> list[Worker]:
    """The workers of ``darkroom serve``: they share the API's in-process queue, or (queue.backend: redis)
    this process's devices join the shared Redis queue with consumers of their own."""
    if isinstance(queue, MemoryQueue):
        return device_workers(settings, registry, lambda _device: queue, lora_store, engine_for)
    return device_workers(settings, registry, redis_sources(settings), lora_store, engine_for)
