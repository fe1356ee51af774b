"""The device loop: one worker per device owns that device's engine, takes batches from its source and runs
them: the safety screen, encoding, each job's answer, its metrics and its ``job done`` log line.

A worker never dies of a job: whatever a batch raises is turned into that batch's jobs' errors, and
the loop goes on. It runs in a thread because diffusers calls block; torch releases the GIL in kernels.
The worker knows its engine only through ``DeviceEngine`` (the real one: server/engine/pipelines.py) and
its jobs only through ``BatchSource`` (server/queue/protocol.py), so this module never imports torch.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .. import metrics
from ..config import SchedulerSettings
from ..errors import DarkroomError, DeadlineExceeded, InternalError
from ..images import encode_image
from ..jobs import GeneratedImage, Job, JobResult
from ..loras import lora_summary
from ..metrics import SafetyCounters
from ..params import GenerationParams
from ..queue.protocol import BatchSource

if TYPE_CHECKING:
    from PIL import Image

    from ..engine.timing import Generation

# The name operators filter the one-line-per-job log on (``job done``), kept from before the package split.
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
        """The image safety stage: per request, None or its refusal."""


class Worker:
    def __init__(
        self,
        engine: DeviceEngine,
        source: BatchSource,
        scheduler: SchedulerSettings,
        cpu_threads: int = 0,
    ) -> None:
        self.engine = engine
        self.source = source
        self.scheduler = scheduler
        self.cpu_threads = cpu_threads
        self.name = f"worker-{engine.device}"
        self.ready = threading.Event()
        self.load_error: str | None = None
        # Pipeline calls that returned: the engine's warm-up calls, then one per batch.
        self.calls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)

    @property
    def failed(self) -> bool:
        return self.load_error is not None

    @property
    def alive(self) -> bool:
        """The worker's thread runs (it returns only on stop, or when loading failed)."""
        return self._thread.is_alive()

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def safety_counters(self) -> SafetyCounters:
        return self.engine.safety_counters

    def compile_report(self) -> dict[str, Any]:
        """The engine's compile counts (graphs, recompiles_after_ready, stance); see DeviceEngine."""
        return self.engine.compile_report()

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
            import torch  # the engine's process has it loaded already

            torch.set_num_threads(self.cpu_threads)
        try:
            self.engine.load()
            self.calls += self.engine.warmup(self.scheduler.max_batch_images, self.scheduler.max_batch_pixels)
        except Exception as exc:  # noqa: BLE001 - reported on /ready and to waiting jobs
            log.exception("worker failed to load models worker=%s", self.name)
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self.ready.set()
        log.info("worker ready worker=%s", self.name)
        while not self._stop.is_set():
            batch = self.source.take_batch(
                self.scheduler.max_batch_images, self.scheduler.batch_window_ms / 1000,
                max_pixels=self.scheduler.max_batch_pixels
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
            generation = self.engine.generate([job.params for job in runnable])
        except DarkroomError as exc:
            for job in runnable:
                job.fail(exc)
                metrics.observe_job(job.params.model, "failed")
            return
        except Exception:  # noqa: BLE001 - one bad batch must not kill the worker
            log.exception("batch failed batch=%s worker=%s", batch_id, self.name)
            for job in runnable:
                job.fail(InternalError("image generation failed; see the server log"))
                metrics.observe_job(job.params.model, "failed")
            return
        inference_s = time.monotonic() - started
        self.calls += 1
        outputs = generation.images
        # text_encode / denoise / vae_decode of the pipeline call (server/engine/timing.py), then safety.
        stages = dict(generation.stages)
        screen_started = time.monotonic()
        refusals = self.engine.screen([job.params for job in runnable], outputs)
        stages["safety"] = time.monotonic() - screen_started
        metrics.observe_batch(runnable[0].params.model, len(runnable), images, stages,
                              loras=len(runnable[0].params.loras))

        for job, pil_images, refusal in zip(runnable, outputs, refusals, strict=True):
            if refusal is not None:  # flagged by the safety checker: nothing is encoded or stored
                job.fail(refusal)
                metrics.observe_job(job.params.model, "refused", queue_s=started - job.enqueued_at)
                log.info("job refused id=%s model=%s batch=%s code=%s request_id=%s", job.id, job.params.model,
                         batch_id, refusal.code, job.request_id,
                         extra={"fields": {"job_id": job.id, "model": job.params.model, "batch_id": batch_id,
                                           "code": refusal.code, "request_id": job.request_id}})
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
                metrics.observe_job(job.params.model, "failed")
                continue
            encode_s = time.monotonic() - encode_started
            result = JobResult(
                images=encoded,
                batch_id=batch_id,
                batch_jobs=len(runnable),
                batch_images=images,
                queue_s=started - job.enqueued_at,
                inference_s=inference_s,
                encode_s=encode_s,
                stages={**stages, "image_encode": encode_s},
            )
            job.succeed(result)
            p = job.params
            metrics.observe_job(p.model, "done", queue_s=result.queue_s, encode_s=result.encode_s,
                                images=len(encoded))
            stage_ms = {f"{name}_ms": round(seconds * 1000, 2) for name, seconds in result.stages.items()}
            loras = lora_summary(p.loras)
            log.info(
                "job done id=%s model=%s size=%dx%d steps=%d n=%d image_loras=%s batch=%s batch_jobs=%d "
                "batch_images=%d queue_ms=%.1f inference_ms=%.1f encode_ms=%.1f request_id=%s %s",
                job.id, p.model, p.width, p.height, p.steps, p.n, ",".join(loras) or "-", batch_id,
                len(runnable), images, result.queue_s * 1000, inference_s * 1000, result.encode_s * 1000,
                job.request_id, " ".join(f"{k}={v:.1f}" for k, v in stage_ms.items()),
                extra={"fields": {
                    "job_id": job.id, "request_id": job.request_id, "model": p.model, "width": p.width,
                    "height": p.height, "steps": p.steps, "n": p.n, "loras": len(p.loras),
                    "image_loras": loras,
                    "conditioning": p.conditioning, "batch_id": batch_id, "batch_jobs": len(runnable),
                    "batch_images": images, "queue_ms": round(result.queue_s * 1000, 2),
                    "inference_ms": round(inference_s * 1000, 2), **stage_ms,
                }},
            )
