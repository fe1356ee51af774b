"""`darkroom serve` on several devices: one worker process per device, fed by the server's in-process queue.

Why processes: in one process every device's Python loop shares one GIL, dynamo (``torch.compile``) is not
thread-safe so compiling on several threads at once is unsafe, compiled code and its cache limit are shared
across devices, and no thread can call ``torch.cuda.set_device`` for itself. A process per device has none of
that; it sets its device and compiles and warms up alone (server/worker/child.py).

The parent keeps the ``MemoryQueue`` and its one batch-filling rule (server/queue/batching.py). For each
device a ``DeviceProcess`` (what the runtime sees as a worker) runs two threads:

- the feeder waits until the child asks for a batch, takes one from the queue, starts its jobs (deadline and
  withdrawal checks, as the device loop does in-process) and sends it over the pipe;
- the supervisor starts the child (``multiprocessing`` spawn: nothing of the parent's threads or CUDA state
  is inherited), reads its answers and heartbeats, and when the child dies (killed, crashed, or exited on a
  sticky device error) puts the jobs it held back at the head of the queue, at most ``queue.max_attempts``
  starts per job as on Redis, then starts a new child after ``worker.restart_backoff_s`` (doubling while it
  keeps dying before it is ready). A child that stays silent past ``queue.max_run_s`` with jobs in hand, or
  reports a pipeline call past that deadline (its own watchdog answered those jobs 504), is killed and
  restarted. A child whose models fail to load is not restarted: the worker is failed, as in-process.

``/ready`` shows each worker's state (``ready``, ``loading``, ``not ready: restarting ...``, ``failed: ...``).
The children's job metrics are recorded here from their answers, so ``/metrics`` is the server's as before.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .. import metrics
from ..config import Settings
from ..errors import DarkroomError, InternalError, ServiceUnavailable
from ..jobs import Job, JobResult, start_batch
from ..metrics import SafetyCounters
from ..queue import wire
from ..queue.memory import MemoryQueue
from .child import EXIT_LOAD_FAILED, child_main
from .loop import DeviceEngine

log = logging.getLogger(__name__)


class DeviceProcess:
    """One device's worker process, as the runtime sees a worker (server/api/runtime.py ``WorkerHandle``)."""

    def __init__(self, settings: Settings, device: str, name: str, queue: MemoryQueue,
                 engine_for: Callable[[str], DeviceEngine] | None = None) -> None:
        self.settings = settings
        self.device = device
        self.name = name
        self.source = queue
        self.engine_for = engine_for
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.restarts = 0
        self.pid: int | None = None
        self._status = "loading"
        self._stats: dict[str, Any] = {}
        self._calls_before = 0  # pipeline calls of earlier children
        self._lock = threading.Lock()
        self._in_flight: dict[str, Job] = {}
        self._accepting = False  # the current child is ready and alive: batches may be sent to it
        self._wants = threading.Event()  # the child asked for a batch
        self._stop = threading.Event()
        self._conn: Connection | None = None
        self._proc: Any = None
        self._send_lock = threading.Lock()
        self._last_heard = time.monotonic()
        self._batches_seen: OrderedDict[str, None] = OrderedDict()
        self._supervisor = threading.Thread(target=self._supervise, name=f"{name}-supervisor", daemon=True)
        self._feeder = threading.Thread(target=self._feed, name=f"{name}-feeder", daemon=True)

    # -- what the runtime reads (server/metrics.py WorkerStatus) ------------------------------------

    @property
    def failed(self) -> bool:
        return self.load_error is not None

    @property
    def alive(self) -> bool:
        return self._supervisor.is_alive()

    @property
    def calls(self) -> int:
        return self._calls_before + int(self._stats.get("calls", 0))

    @property
    def safety_counters(self) -> SafetyCounters:
        counters = SafetyCounters()
        for event, count in self._stats.get("safety", {}).items():
            counters.add(event, count)
        return counters

    @property
    def state(self) -> str:
        if self.load_error is not None:
            return f"failed: {self.load_error}"
        return self._status

    def stats(self) -> dict[str, float]:
        return dict(self._stats.get("engine", {}))

    def compile_report(self) -> dict[str, Any]:
        """The child's torch.compile counts, as of its last stats message (empty before the first)."""
        return dict(self._stats.get("compile", {}))

    @property
    def in_flight(self) -> int:
        """Jobs sent to the child and not answered yet."""
        with self._lock:
            return len(self._in_flight)

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._supervisor.start()
        self._feeder.start()

    def join(self, timeout_s: float | None = None) -> None:
        """Returns when the worker stopped, or its models failed to load (a crash is restarted instead)."""
        self._supervisor.join(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """The child finishes the batch in hand and answers it, then exits; killed after ``timeout_s``."""
        self._stop.set()
        self._send(("stop",))
        self._supervisor.join(timeout_s)
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._supervisor.join(5)
        self._feeder.join(5)

    # -- the feeder thread ----------------------------------------------------------------------------

    def _feed(self) -> None:
        scheduler = self.settings.scheduler
        while not self._stop.is_set():
            if not self._wants.wait(0.5) or not self.ready.is_set():
                continue
            batch = self.source.take_batch(scheduler.max_batch_images, scheduler.batch_window_ms / 1000,
                                           max_pixels=scheduler.max_batch_pixels)
            if not batch:
                continue
            now = time.monotonic()
            with self._lock:
                if not self._accepting:  # the child died since it asked: the jobs keep their place
                    self.source.requeue(batch)
                    continue
                runnable = start_batch(batch, now)
                self._in_flight.update((job.id, job) for job in runnable)
                if runnable:
                    self._wants.clear()
            if runnable:
                self._send(("batch", [(job.id, job.params, now - job.enqueued_at, job.deadline - now,
                                       job.request_id) for job in runnable]))

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            conn = self._conn
            if conn is None:
                return
            try:
                conn.send(message)
            except (OSError, ValueError):
                pass  # the child is gone: the supervisor sees it and re-runs what it held

    # -- the supervisor thread ------------------------------------------------------------------------

    def _supervise(self) -> None:
        w = self.settings.worker
        backoff = w.restart_backoff_s
        while not self._stop.is_set():
            was_ready, reason = self._run_child()
            self._child_gone(reason)
            if self._stop.is_set() or self.load_error is not None:
                break
            if was_ready:
                backoff = w.restart_backoff_s
            self.restarts += 1
            self._status = f"not ready: restarting after {reason} (restart {self.restarts})"
            log.warning("worker process ended worker=%s %s; restarting in %.1fs (restart %d)", self.name,
                        reason, backoff, self.restarts)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, w.max_restart_backoff_s)
        self._status = "stopped" if self.load_error is None else self._status

    def _run_child(self) -> tuple[bool, str]:
        """Start a child and serve it until it ends; (whether it became ready, why it ended)."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        # Not daemonic: a daemonic process may not start processes of its own (inductor's compile workers).
        proc = ctx.Process(target=child_main, name=self.name, daemon=False,
                           args=(self.settings.model_dump(), self.device, self.name, child, self.engine_for))
        self._wants.clear()
        self._status = "loading" if self.restarts == 0 else f"loading (restart {self.restarts})"
        proc.start()
        child.close()  # our copy: the pipe reports EOF when the child's end closes (it died)
        with self._send_lock:
            self._conn, self._proc, self.pid = parent, proc, proc.pid
        self._last_heard = time.monotonic()
        log.info("worker process spawned worker=%s device=%s pid=%d", self.name, self.device, proc.pid)
        was_ready = False
        reason = "it stopped"
        while True:
            try:
                if parent.poll(0.25):
                    message = parent.recv()
                    self._last_heard = time.monotonic()
                    was_ready = self._handle(message, proc) or was_ready
                    continue
            except (EOFError, OSError):
                break
            if not proc.is_alive() and not self._readable(parent):
                break
            if self._silent_too_long():
                log.error("worker process silent too long with jobs in hand worker=%s pid=%d: killing it",
                          self.name, proc.pid)
                proc.kill()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        code = proc.exitcode
        if code is not None and code < 0:
            reason = f"signal {-code}"
        elif code:
            reason = f"exit code {code}"
        with self._send_lock:
            self._conn = None
        parent.close()
        if code == EXIT_LOAD_FAILED and self.load_error is None:
            self.load_error = "the worker process failed to load its models"
        return was_ready, reason

    @staticmethod
    def _readable(conn: Connection) -> bool:
        try:
            return conn.poll(0)
        except (EOFError, OSError):
            return False

    def _silent_too_long(self) -> bool:
        limit = self.settings.queue.max_run_s
        return limit > 0 and self.in_flight > 0 and time.monotonic() - self._last_heard > max(limit, 10.0)

    def _handle(self, message: tuple[Any, ...], proc: Any) -> bool:
        kind = message[0]
        if kind == "take":
            self._wants.set()
        elif kind == "done":
            self._answered(message[1], result=message[2])
        elif kind == "error":
            self._answered(message[1], error=wire.decode_error(message[2]))
        elif kind == "stats":
            self._stats = message[1]
            child_state = str(message[1].get("state", ""))
            if child_state.startswith("not ready") and self.ready.is_set():
                # Its watchdog answered a call past queue.max_run_s; only a new process frees the device.
                log.error("worker process reports %s worker=%s pid=%d: killing it", child_state, self.name,
                          proc.pid)
                self._status = child_state
                self.ready.clear()
                proc.kill()
        elif kind == "ready":
            with self._lock:
                self._accepting = True
            self._status = "ready"
            self.ready.set()
            log.info("worker process ready worker=%s pid=%d", self.name, proc.pid)
            return True
        elif kind == "load_failed":
            self.load_error = str(message[1])
            log.error("worker process failed to load its models worker=%s: %s", self.name, self.load_error)
        elif kind == "device_error":
            self._status = f"not ready: device error: {message[1]}"
            self.ready.clear()
            log.error("worker process had a device error worker=%s: %s; it exits and is restarted", self.name,
                      message[1])
        return False

    def _answered(self, job_id: str, result: JobResult | None = None,
                  error: DarkroomError | None = None) -> None:
        with self._lock:
            job = self._in_flight.pop(job_id, None)
        if job is None:
            return
        model = job.params.model
        if result is not None:
            if result.batch_id not in self._batches_seen:
                self._batches_seen[result.batch_id] = None
                while len(self._batches_seen) > 1024:
                    self._batches_seen.popitem(last=False)
                batch_stages = {k: v for k, v in result.stages.items() if k != "image_encode"}
                metrics.observe_batch(model, result.batch_jobs, result.batch_images, batch_stages,
                                      loras=len(job.params.loras))
            metrics.observe_job(model, "done", queue_s=result.queue_s, encode_s=result.encode_s,
                                images=len(result.images))
            job.succeed(result)
        else:
            assert error is not None
            metrics.observe_job(model, metrics.failure_outcome(error.status))
            job.fail(error)

    def _child_gone(self, reason: str) -> None:
        """Put the jobs the child held back in the queue (or answer them), now that it is gone."""
        self.ready.clear()
        with self._lock:
            self._accepting = False
            held = list(self._in_flight.values())
            self._in_flight.clear()
            self._calls_before += int(self._stats.get("calls", 0))
            self._stats = {}
        again: list[Job] = []
        limit = self.settings.queue.max_attempts
        for job in held:
            if job.future.done():
                continue
            if self._stop.is_set():
                job.fail(ServiceUnavailable("the server stopped before this job finished; retry",
                                            headers={"retry-after": "1"}))
            elif job.attempts >= limit:
                job.fail(InternalError(
                    f"the job was started {job.attempts} time(s) and its worker process ended each time "
                    f"({reason}); it is not retried again", code="worker_lost"))
                metrics.observe_job(job.params.model, "failed")
            elif job.requeue():
                again.append(job)
        if again:
            self.source.requeue(again)
            log.warning("re-queued %d job(s) of worker process %s (%s)", len(again), self.name, reason)
