"""The device loop: one worker per device owns that device's engine, takes batches from its source and runs
them; encoding and answering happen beside it (server/worker/post.py), and so do LoRA downloads
(server/worker/prefetch.py), so the device goes from one pipeline call to the next without waiting on the CPU
or the network.

A worker never dies of a job. What a pipeline call raises is answered by its kind (server/worker/faults.py):
- out of memory: the cache is freed and the batch split in halves (and halves of halves) and run again; a
  single request that still does not fit is a 400 ``too_large_for_device``, never a 500 the SDKs would retry;
- a sticky device error: the worker is marked not ready and stops (in a worker process the parent starts a
  fresh process and re-runs the jobs, server/worker/children.py; in-process the jobs get a 503);
- anything else: a batch of several jobs is run again one job at a time, so only the job that raises fails.
A call that runs longer than ``queue.max_run_s`` is answered 504 by a watchdog and the worker is marked not
ready until the call returns.

It runs in a thread because diffusers calls block; torch releases the GIL in kernels. The worker knows its
engine only through ``DeviceEngine`` (the real one: server/engine/pipelines.py) and its jobs only through
``BatchSource`` (server/queue/protocol.py), so this module never imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .. import metrics
from ..config import SchedulerSettings, Settings
from ..errors import DarkroomError, DeadlineExceeded, InternalError, ServiceUnavailable, TooLargeForDevice
from ..jobs import Job, start_batch
from ..metrics import SafetyCounters
from ..params import GenerationParams
from ..queue.protocol import BatchSource
from .faults import Fault, classify
from .post import Finished, PostProcessor
from .prefetch import LoraPrefetch

if TYPE_CHECKING:
    from PIL import Image

    from ..engine.timing import Generation

log = logging.getLogger("server.worker")


class DeviceEngine(Protocol):
    """What a worker needs from the engine of its device."""

    device: str
    safety_counters: SafetyCounters

    def load(self) -> None:
        """Load every served model onto the device (raises: the worker is failed)."""

    def warmup(self, max_batch_images: int = 1, max_batch_pixels: int | None = None) -> int:
        """Run each model before the worker reports ready, compiled ones at every batch size the scheduler
        can form (the scheduler's caps); returns how many pipeline calls that took."""

    def compile_report(self) -> dict[str, Any]:
        """torch.compile's graphs in this process and those built after ready (server/engine/compile_stats.py):
        ``graphs``, ``recompiles_after_ready``, ``stance``."""

    def generate(self, batch: Sequence[GenerationParams]) -> Generation:
        """One pipeline call for compatible requests: their images, and the call's stage seconds."""

    def screen(
        self, batch: Sequence[GenerationParams], outputs: Sequence[Sequence[Image.Image]]
    ) -> Sequence[DarkroomError | None]:
        """The image safety stage: per request, None or its refusal (called from post-processing)."""

    def loras_ready(self, params: GenerationParams) -> bool:
        """Whether the LoRA files ``params`` names are on this machine (a file check, no network)."""

    def fetch_loras(self, params: GenerationParams) -> None:
        """Download the LoRA files ``params`` names (called from the prefetch pool)."""

    def free_memory(self) -> None:
        """Release cached device memory after an out-of-memory error."""

    def stats(self) -> dict[str, float]:
        """Counters for /metrics (the prompt-embedding cache: hits, misses, bytes, entries)."""


@dataclass(frozen=True)
class LoopOptions:
    """How a worker runs beside its device (``worker.*`` and ``queue.max_run_s`` settings)."""

    post_threads: int = 2
    handoff_batches: int = 2
    prefetch_threads: int = 2
    # A pipeline call running longer than this is answered 504 and the worker marked not ready; 0: never.
    max_run_s: float = 600.0
    # After a sticky device error: answer the batch's jobs 503 (in-process), or leave them to the parent
    # process, which re-runs them on a fresh worker process (server/worker/children.py).
    answer_on_device_error: bool = True

    @classmethod
    def from_settings(cls, settings: Settings, answer_on_device_error: bool = True) -> LoopOptions:
        w = settings.worker
        return cls(post_threads=w.post_threads, handoff_batches=w.handoff_batches,
                   prefetch_threads=w.prefetch_threads, max_run_s=settings.queue.max_run_s,
                   answer_on_device_error=answer_on_device_error)


class Worker:
    """One device's worker (in a thread): ``start`` loads and warms the engine, then runs batches from
    ``source`` until ``stop``; ``state``, ``calls`` and ``stats()`` are what /ready and /metrics read."""

    def __init__(
        self,
        engine: DeviceEngine,
        source: BatchSource,
        scheduler: SchedulerSettings,
        cpu_threads: int = 0,
        options: LoopOptions | None = None,
        name: str | None = None,
    ) -> None:
        self.engine = engine
        self.source = source
        self.scheduler = scheduler
        self.cpu_threads = cpu_threads
        self.options = options or LoopOptions()
        self.name = name or f"worker-{engine.device}"
        self.ready = threading.Event()
        self.load_error: str | None = None
        # A sticky device error (the device is unusable until its process restarts), and a call past its
        # run deadline (not ready until it returns).
        self.device_error: str | None = None
        self.stuck: str | None = None
        # Pipeline calls that returned: the engine's warm-up calls, then one per batch.
        self.calls = 0
        # Seconds the device thread spent in pipeline calls since ready (/metrics: the device's busy time).
        self.busy_s = 0.0
        self.post = PostProcessor(engine, self.name, self.options.post_threads, self.options.handoff_batches)
        self.prefetch = LoraPrefetch(engine, self.name, self.options.prefetch_threads)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        # The call on the device now: its jobs and when it started (read by the watchdog).
        self._call_lock = threading.Lock()
        self._in_call: tuple[list[Job], float] | None = None
        self._watchdog: threading.Thread | None = None

    @property
    def failed(self) -> bool:
        """Loading failed, or the device broke: this worker runs nothing more in this process."""
        return self.load_error is not None or self.device_error is not None

    @property
    def alive(self) -> bool:
        """The worker's thread runs (it returns only on stop, when loading failed or the device broke)."""
        return self._thread.is_alive()

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def safety_counters(self) -> SafetyCounters:
        return self.engine.safety_counters

    @property
    def state(self) -> str:
        """For /ready: ready, loading, not ready (why), or failed (why)."""
        if self.load_error is not None:
            return f"failed: {self.load_error}"
        if self.device_error is not None:
            return f"failed: device error: {self.device_error}"
        if self.stuck is not None:
            return f"not ready: {self.stuck}"
        return "ready" if self.ready.is_set() else "loading"

    def stats(self) -> dict[str, float]:
        with self._call_lock:  # the call on the device now counts too: the figure grows smoothly
            busy = self.busy_s + (time.monotonic() - self._in_call[1] if self._in_call is not None else 0.0)
        return {**self.engine.stats(), "busy_seconds": busy}

    def compile_report(self) -> dict[str, Any]:
        """The engine's compile counts (graphs, recompiles_after_ready, stance); see DeviceEngine."""
        return self.engine.compile_report()

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the batch in hand (and answer what post-processing holds), then stop taking jobs."""
        self._stop.set()
        self._thread.join(timeout_s)

    # -- the device thread -------------------------------------------------------------------------

    def _main(self) -> None:
        if self.cpu_threads and self.engine.device == "cpu":
            import torch  # the engine's process has it loaded already

            torch.set_num_threads(self.cpu_threads)
        try:
            self.engine.load()
            self.calls += self.engine.warmup(self.scheduler.max_batch_images, self.scheduler.max_batch_pixels)
        except Exception as exc:  # noqa: BLE001 - reported on /ready and to waiting jobs
            log.exception("worker failed to load models worker=%s", self.name)
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self.post.start()
        if self.options.max_run_s > 0:
            self._watchdog = threading.Thread(target=self._watch, name=f"{self.name}-watchdog", daemon=True)
            self._watchdog.start()
        self.ready.set()
        log.info("worker ready worker=%s", self.name)
        try:
            while not self._stop.is_set() and self.device_error is None:
                batch = self._next_batch()
                if batch:
                    self.run_batch(batch)
        finally:
            self.prefetch.close()
            self.post.close()

    def _next_batch(self) -> list[Job]:
        """A batch whose LoRA files arrived first; else the source's next batch, unless it must wait for its
        files (then it goes to the prefetch stage and the device takes another)."""
        ready = self.prefetch.take()
        if ready is not None:
            return ready
        # While downloads run, look back often for the batches they finish.
        timeout_s = 0.02 if self.prefetch.pending else 0.5
        batch = self.source.take_batch(self.scheduler.max_batch_images, self.scheduler.batch_window_ms / 1000,
                                       timeout_s, max_pixels=self.scheduler.max_batch_pixels)
        if batch and self.prefetch.needs(batch):
            self.prefetch.submit(batch)
            return []
        return batch

    def run_batch(self, batch: list[Job]) -> None:
        runnable = start_batch(batch, time.monotonic())
        if runnable:
            self._run(runnable, f"batch-{uuid.uuid4().hex[:12]}")

    def _run(self, jobs: list[Job], batch_id: str) -> None:
        """One pipeline call for ``jobs``: its images go to post-processing, its failure is answered by
        kind."""
        started = time.monotonic()
        try:
            with self._on_device(jobs, started):
                generation = self.engine.generate([job.params for job in jobs])
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the worker
            self._failed(jobs, batch_id, exc)
            return
        inference_s = time.monotonic() - started
        self.calls += 1
        self.post.submit(Finished(batch_id, jobs, generation.images, started, inference_s,
                                  dict(generation.stages)))

    def _failed(self, jobs: list[Job], batch_id: str, exc: Exception) -> None:
        if all(job.future.done() for job in jobs):
            return  # answered by the watchdog while the call ran
        fault = Fault.OTHER if isinstance(exc, DarkroomError) else classify(exc)
        if fault is Fault.STICKY:
            self._device_broke(jobs, batch_id, exc)
        elif fault is Fault.OOM:
            self.engine.free_memory()
            if len(jobs) == 1:
                log.warning("out of memory for a single request batch=%s job=%s worker=%s: %s", batch_id,
                            jobs[0].id, self.name, exc)
                self._answer(jobs[0], TooLargeForDevice(
                    f"this request does not fit in the memory of this server's {self._device_kind} even "
                    "alone: lower n or the image size", param="n"))
                return
            half = (len(jobs) + 1) // 2
            log.warning("out of memory batch=%s jobs=%d worker=%s: freed the cache, running it in halves",
                        batch_id, len(jobs), self.name)
            self._run(jobs[:half], f"{batch_id}-a")
            self._run(jobs[half:], f"{batch_id}-b")
        elif len(jobs) > 1:
            # One job's input may be what failed the call: run each alone, so only that one fails.
            log.warning("batch failed batch=%s jobs=%d worker=%s: %s: running its jobs one at a time",
                        batch_id, len(jobs), self.name, type(exc).__name__)
            for i, job in enumerate(jobs):
                self._run([job], f"{batch_id}-{i}")
        elif isinstance(exc, DarkroomError):
            self._answer(jobs[0], exc)
        else:
            log.error("job failed batch=%s job=%s worker=%s", batch_id, jobs[0].id, self.name, exc_info=exc)
            self._answer(jobs[0], InternalError("image generation failed; see the server log"))

    @property
    def _device_kind(self) -> str:
        return "GPU" if self.device.startswith("cuda") else "device"

    @staticmethod
    def _answer(job: Job, error: DarkroomError) -> None:
        if not job.future.done():
            job.fail(error)
            metrics.observe_job(job.params.model, "failed")

    def _device_broke(self, jobs: list[Job], batch_id: str, exc: Exception) -> None:
        self.device_error = f"{type(exc).__name__}: {exc}"
        self.ready.clear()
        log.error("device error worker=%s batch=%s: %s; the worker is not ready and stops (its process must "
                  "restart)", self.name, batch_id, self.device_error, exc_info=exc)
        if self.options.answer_on_device_error:
            for job in jobs:
                self._answer(job, ServiceUnavailable(
                    "the device of the worker running this job failed; retry", code="device_error",
                    headers={"retry-after": "1"}))

    # -- the run deadline ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _on_device(self, jobs: list[Job], started: float) -> Iterator[None]:
        with self._call_lock:
            self._in_call = (jobs, started)
        try:
            yield
        finally:
            with self._call_lock:
                self._in_call = None
                self.busy_s += time.monotonic() - started
                if self.stuck is not None:
                    log.warning("the late pipeline call returned worker=%s after %.1fs; ready again",
                                self.name, time.monotonic() - started)
                    self.stuck = None
                    if self.device_error is None:
                        self.ready.set()

    def _watch(self) -> None:
        limit = self.options.max_run_s
        tick = min(1.0, max(0.01, limit / 10))
        while not self._stop.wait(tick) and self._thread.is_alive():
            with self._call_lock:
                if self._in_call is None or self.stuck is not None:
                    continue
                jobs, started = self._in_call
                ran = time.monotonic() - started
                if ran <= limit:
                    continue
                self.stuck = f"a pipeline call has run {ran:.0f}s, longer than queue.max_run_s ({limit:g}s)"
                self.ready.clear()
            log.error("run deadline passed worker=%s jobs=%s: %s; the worker is not ready", self.name,
                      ",".join(job.id for job in jobs), self.stuck)
            for job in jobs:
                self._answer(job, DeadlineExceeded(
                    f"the image generation ran longer than {limit:g}s and was abandoned", code="run_timeout"))
