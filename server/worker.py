"""One worker per device: it owns that device's engine, takes batches off the queue and runs them.

A worker never dies of a job: whatever a batch raises is turned into that batch's jobs' errors, and
the loop goes on. It runs in a thread because diffusers calls block; torch releases the GIL in kernels.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import torch
from PIL import Image

from .config import SchedulerSettings
from .engine.pipelines import Engine
from .errors import DarkroomError, DeadlineExceeded, InternalError, ServiceUnavailable
from .jobs import GeneratedImage, Job, JobResult
from .queue import MemoryQueue
from .storage import encode_image

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        engine: Engine,
        queue: MemoryQueue,
        scheduler: SchedulerSettings,
        cpu_threads: int = 0,
    ) -> None:
        self.engine = engine
        self.queue = queue
        self.scheduler = scheduler
        self.cpu_threads = cpu_threads
        self.name = f"worker-{engine.device}"
        self.ready = threading.Event()
        self.load_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)

    @property
    def failed(self) -> bool:
        return self.load_error is not None

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the batch in hand, then stop taking jobs."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _main(self) -> None:
        if self.cpu_threads and self.engine.device == "cpu":
            torch.set_num_threads(self.cpu_threads)
        try:
            self.engine.load()
            self.engine.warmup()
        except Exception as exc:  # noqa: BLE001 - reported on /ready and to waiting jobs
            log.exception("worker failed to load models worker=%s", self.name)
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self.ready.set()
        log.info("worker ready worker=%s", self.name)
        while not self._stop.is_set():
            batch = self.queue.take_batch(
                self.scheduler.max_batch_images, self.scheduler.batch_window_ms / 1000
            )
            if batch:
                self.run_batch(batch)

    def run_batch(self, batch: list[Job]) -> None:
        now = time.monotonic()
        runnable: list[Job] = []
        for job in batch:
            if job.expired(now):
                job.fail(DeadlineExceeded("the job did not start before its deadline; it was not run"))
            elif job.try_start():
                runnable.append(job)
        if not runnable:
            return

        batch_id = f"batch-{uuid.uuid4().hex[:12]}"
        images = sum(job.params.n for job in runnable)
        started = time.monotonic()
        try:
            outputs = self.engine.generate([job.params for job in runnable])
        except DarkroomError as exc:
            for job in runnable:
                job.fail(exc)
            return
        except Exception:  # noqa: BLE001 - one bad batch must not kill the worker
            log.exception("batch failed batch=%s worker=%s", batch_id, self.name)
            for job in runnable:
                job.fail(InternalError("image generation failed; see the server log"))
            return
        inference_s = time.monotonic() - started
        refusals = self._screen(runnable, outputs)

        for job, pil_images, refusal in zip(runnable, outputs, refusals, strict=True):
            if refusal is not None:  # flagged by the safety checker: nothing is encoded or stored
                job.fail(refusal)
                log.info("job refused id=%s model=%s batch=%s code=%s", job.id, job.params.model,
                         batch_id, refusal.code)
                continue
            encode_started = time.monotonic()
            try:
                encoded = [
                    GeneratedImage(encode_image(img, job.params.output_format), seed, job.params.output_format)
                    for img, seed in zip(pil_images, job.params.seeds, strict=True)
                ]
            except Exception:  # noqa: BLE001
                log.exception("encoding failed job=%s", job.id)
                job.fail(InternalError("image encoding failed; see the server log"))
                continue
            result = JobResult(
                images=encoded,
                batch_id=batch_id,
                batch_jobs=len(runnable),
                batch_images=images,
                queue_s=started - job.enqueued_at,
                inference_s=inference_s,
                encode_s=time.monotonic() - encode_started,
            )
            job.succeed(result)
            p = job.params
            log.info(
                "job done id=%s model=%s size=%dx%d steps=%d n=%d batch=%s batch_jobs=%d "
                "batch_images=%d queue_ms=%.1f inference_ms=%.1f encode_ms=%.1f",
                job.id, p.model, p.width, p.height, p.steps, p.n, batch_id, len(runnable), images,
                result.queue_s * 1000, inference_s * 1000, result.encode_s * 1000,
            )

    def _screen(self, runnable: list[Job], outputs: list[list[Image.Image]]) -> list[DarkroomError | None]:
        """The image safety stage, one checker call per batch (engine stand-ins without one skip it)."""
        screen = getattr(self.engine, "screen", None)
        if screen is None:
            return [None] * len(runnable)
        return screen([job.params for job in runnable], outputs)


def fail_waiting(queue: MemoryQueue, reason: str) -> None:
    """When no worker can run anything, answer every waiting job instead of letting it hang."""
    for job in queue.drain():
        job.fail(ServiceUnavailable(f"no worker can run jobs: {reason}"))
