"""The one place that puts an engine and a worker on each device of a process.

``darkroom serve`` (server/cli.py) hands ``serve_workers`` to the API's runtime; ``darkroom worker``
(server/worker/process.py) calls ``device_workers`` with a Redis consumer per device. Either way one LoRA
disk cache (server/loras.py) serves every engine of the process.

``darkroom serve`` on the in-process queue runs each device's worker in a process of its own when there are
two or more devices (``worker.processes: auto``; server/worker/children.py says why), and in a thread of the
server for a single device: one device has no GIL, dynamo or ``set_device`` to share, and a thread costs no
second interpreter, no pipe and no copy of the images; ``worker.processes: always`` takes the process for
one device too (a sticky CUDA error then restarts only that process).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..config import Settings
from ..engine.pipelines import Engine, resolve_devices
from ..loras import LoraStore
from ..queue.memory import MemoryQueue
from ..queue.protocol import BatchSource, JobQueue
from ..registry import Registry
from .children import DeviceProcess
from .loop import DeviceEngine, LoopOptions, Worker

if TYPE_CHECKING:
    from ..api.runtime import WorkerHandle
    from ..queue.redis_worker import RedisSource


def device_slots(settings: Settings) -> list[tuple[str, str]]:
    """(device, slot) per worker: the slot names it (``worker-<slot>``, the Redis consumer's suffix); ``cpu``
    named twice gives slots ``cpu`` and ``cpu-2``."""
    slots: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for device in resolve_devices(settings.engine.devices):
        seen[device] = seen.get(device, 0) + 1
        slots.append((device, device if seen[device] == 1 else f"{device}-{seen[device]}"))
    return slots


def device_workers(settings: Settings, registry: Registry, source_for: Callable[[str], BatchSource],
                   lora_store: LoraStore | None = None,
                   engine_for: Callable[[str], DeviceEngine] | None = None,
                   answer_on_device_error: bool = True) -> list[Worker]:
    """One engine and one worker thread per device of ``engine.devices``; ``source_for(slot)``: its jobs.

    ``engine_for(device)`` replaces the diffusers ``Engine`` (a stand-in engine in tests).
    """
    store = lora_store if lora_store is not None else LoraStore.from_settings(settings)
    options = LoopOptions.from_settings(settings, answer_on_device_error)
    workers = []
    for device, slot in device_slots(settings):
        engine = (engine_for(device) if engine_for is not None else
                  Engine(registry, settings.engine, device, settings.safety, loras=store))
        workers.append(Worker(engine, source_for(slot), settings.scheduler, settings.engine.cpu_threads,
                              options, name=f"worker-{slot}"))
    return workers


def redis_sources(settings: Settings) -> Callable[[str], RedisSource]:
    """A Redis consumer per device slot, named ``<worker.name or host-pid>-<slot>`` in the workers' group."""
    # The redis package is an extra (darkroom[scale]): imported only when the queue is on Redis.
    from ..queue.redis_keys import default_instance_name
    from ..queue.redis_worker import RedisSource

    base = settings.worker.name or default_instance_name()
    return lambda slot: RedisSource(settings.queue, f"{base}-{slot}")


def uses_processes(settings: Settings, devices: int) -> bool:
    mode = settings.worker.processes
    return mode == "always" or (mode == "auto" and devices > 1)


def serve_workers(settings: Settings, registry: Registry, queue: JobQueue, lora_store: LoraStore,
                  engine_for: Callable[[str], DeviceEngine] | None = None) -> Sequence[WorkerHandle]:
    """The workers of ``darkroom serve``: on the in-process queue, worker processes (several devices) or
    threads (one device); on Redis (queue.backend: redis) this process's devices join the shared queue with
    consumers of their own, in threads (run `darkroom worker` pods for GPUs).

    ``engine_for`` must be picklable when the workers are processes (a module-level function or class).
    """
    if isinstance(queue, MemoryQueue):
        slots = device_slots(settings)
        if uses_processes(settings, len(slots)):
            return [DeviceProcess(settings, device, f"worker-{slot}", queue, engine_for)
                    for device, slot in slots]
        return device_workers(settings, registry, lambda _slot: queue, lora_store, engine_for)
    return device_workers(settings, registry, redis_sources(settings), lora_store, engine_for)
