"""The child side of a worker process (server/worker/children.py is the parent's): one device, one engine,
one ``Worker`` (server/worker/loop.py), fed batches over a pipe by the parent, which keeps the queue and the
one batch-filling rule.

The child sets its device (``torch.cuda.set_device``), loads and warms its models alone (compilation happens
in no other thread of the process), then asks the parent for a batch whenever its device loop wants one.
Messages (tuples, pickled by ``multiprocessing.Connection``):

- parent → child: ``("batch", [(job_id, params, queued_s, start_within_s, request_id), ...])``,
  ``("stop",)``;
- child → parent: ``("ready",)``, ``("load_failed", why)``, ``("take",)``, ``("done", job_id, JobResult)``,
  ``("error", job_id, error)`` (server/queue/wire.py's error form), ``("stats", {...})`` every half second
  (the heartbeat: calls, safety counters, the engine's counters, the worker's state), and
  ``("device_error", why)`` before it exits on a sticky device error, leaving the batch's jobs to the parent.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from ..config import Settings
from ..jobs import Job, JobResult
from ..queue import wire
from .loop import DeviceEngine, LoopOptions, Worker

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
# Exit codes: a load failure is final (the parent does not restart it); a device error asks for a restart.
EXIT_LOAD_FAILED = 2
EXIT_DEVICE_ERROR = 3


class Channel:
    """The child's end of the pipe; ``send`` from any of the worker's threads."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self.broken = threading.Event()  # the parent is gone

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                self.broken.set()


@dataclass(eq=False)
class ProxyJob(Job):
    """A job the parent started and sent here; answering it sends the outcome back."""

    channel: Channel | None = field(default=None, repr=False)

    def succeed(self, result: JobResult) -> None:
        assert self.channel is not None
        self.channel.send(("done", self.id, result))
        super().succeed(result)

    def fail(self, error: BaseException) -> None:
        assert self.channel is not None
        self.channel.send(("error", self.id, wire.encode_error(error)))
        super().fail(error)


class PipeSource:
    """The ``BatchSource`` of the child's worker: batches the parent filled from its queue."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.stopping = threading.Event()
        self._asked = False

    def take_batch(self, max_images: int, window_s: float, timeout_s: float = 0.5,
                   max_pixels: int | None = None) -> list[Job]:
        """The next batch the parent sent (the parent filled it under the scheduler's caps: the arguments
        only satisfy ``BatchSource``); empty after ``timeout_s`` seconds without one, or when stopping."""
        if self.stopping.is_set():
            time.sleep(min(timeout_s, 0.05))
            return []
        if not self._asked:
            self.channel.send(("take",))
            self._asked = True
        try:
            if not self.channel.conn.poll(timeout_s):
                return []
            message = self.channel.conn.recv()
        except (EOFError, OSError):
            message = ("stop",)  # the parent is gone: nobody to answer, stop
            self.channel.broken.set()
        if message[0] == "stop":
            self.stopping.set()
            return []
        self._asked = False
        now = time.monotonic()
        return [ProxyJob(params=params, deadline=now + start_within_s, id=job_id, enqueued_at=now - queued_s,
                         request_id=request_id, channel=self.channel)
                for job_id, params, queued_s, start_within_s, request_id in message[1]]

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        self.stopping.set()


def child_main(settings_data: dict[str, Any], device: str, name: str, conn: Connection,
               engine_for: Callable[[str], DeviceEngine] | None = None) -> None:
    """The worker process's entry point (``multiprocessing`` spawn target)."""
    # The parent stops its workers (Ctrl-C reaches the whole process group): SIGINT is ignored here, and
    # SIGTERM finishes the batch in hand first, as a stop from the parent does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = Settings(**settings_data)
    from ..logs import configure

    configure(settings.server.log_level, settings.server.log_format)
    channel = Channel(conn)
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)  # kernels, caches and compiled graphs of this process: this device only
    engine = engine_for(device) if engine_for is not None else _engine(settings, device)
    source = PipeSource(channel)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: source.stopping.set())
    worker = Worker(engine, source, settings.scheduler, settings.engine.cpu_threads,
                    LoopOptions.from_settings(settings, answer_on_device_error=False), name=name)
    log.info("worker process started worker=%s device=%s pid=%d", name, device, os.getpid())
    worker.start()
    announced = False
    while worker.alive:
        worker.join(HEARTBEAT_S)
        if worker.ready.is_set() and not announced:
            channel.send(("ready",))
            announced = True
        channel.send(("stats", {"calls": worker.calls, "safety": worker.safety_counters.snapshot(),
                                "engine": worker.stats(), "state": worker.state,
                                "compile": worker.compile_report()}))
        if source.stopping.is_set() or channel.broken.is_set():
            worker.stop()
    # The worker's thread has ended: it stopped, or failed (after answering what post-processing held).
    code = 0
    if worker.load_error is not None:
        channel.send(("load_failed", worker.load_error))
        code = EXIT_LOAD_FAILED
    elif worker.device_error is not None:
        channel.send(("device_error", worker.device_error))
        code = EXIT_DEVICE_ERROR
    conn.close()
    # os._exit: no interpreter teardown racing the worker's daemon threads (its device work is over).
    logging.shutdown()
    os._exit(code)


def _engine(settings: Settings, device: str) -> DeviceEngine:
    from ..engine.pipelines import Engine
    from ..loras import LoraStore
    from ..registry import Registry

    registry = Registry.from_settings(settings.models_dir, settings.models)
    return Engine(registry, settings.engine, device, settings.safety, loras=LoraStore.from_settings(settings))
