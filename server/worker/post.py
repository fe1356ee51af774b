"""Post-processing beside the device loop: the safety screen, image encoding, each job's answer, its metrics
and its ``job done`` log line, so the device thread hands its images over and takes the next batch at once.

The device thread ``submit``s each finished pipeline call to a bounded hand-off queue
(``worker.handoff_batches`` calls) and blocks while it is full: however slow encoding is, at most that many
calls' decoded images wait, and memory stays flat (the device waits instead). One coordinator thread takes
calls in order, screens each call's images (one checker call per batch), encodes the images in a pool of
``worker.post_threads`` threads (Pillow releases the GIL while it encodes) and answers the jobs in the order
they were handed over. A job whose encoding fails fails alone; a screen that raises is retried per job, so it
too fails only the job it raises for.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .. import metrics
from ..errors import DarkroomError, InternalError
from ..images import encode_output
from ..jobs import GeneratedImage, Job, JobResult
from ..loras import lora_summary
from ..params import GenerationParams

if TYPE_CHECKING:
    from PIL import Image

# The name operators filter the one-line-per-job log on (``job done``), kept from before the package split.
log = logging.getLogger("server.worker")


class Screen(Protocol):
    def screen(
        self, batch: Sequence[GenerationParams], outputs: Sequence[Sequence[Image.Image]]
    ) -> Sequence[DarkroomError | None]:
        """The image safety stage: per request, None or its refusal."""


@dataclass
class Finished:
    """One pipeline call's output, handed from the device thread to post-processing."""

    batch_id: str
    jobs: list[Job]
    images: list[list[Image.Image]]  # per job, in the jobs' order
    started: float  # time.monotonic() when the call started (a job's queue time ends there)
    inference_s: float
    # text_encode / denoise / vae_decode of the call (server/engine/timing.py)
    stages: dict[str, float] = field(default_factory=dict)


class PostProcessor:
    """The post-processing stage of one worker. ``submit`` from the device thread; ``close`` when stopping."""

    def __init__(self, screen: Screen, name: str, threads: int = 2, max_batches: int = 2,
                 encode: Callable[[Image.Image, GenerationParams], bytes] | None = None) -> None:
        self._screen = screen
        # An image as its request asked for it (server/images.py encode_output); tests pass their own.
        self._encode = encode or _as_requested
        self.name = name
        self.max_batches = max(1, max_batches)
        self._handoff: queue.Queue[Finished | None] = queue.Queue(maxsize=self.max_batches)
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix=f"{name}-encode")
        self._thread = threading.Thread(target=self._run, name=f"{name}-post", daemon=True)
        # The most calls ever waiting in the hand-off queue (tests check it never exceeds the bound).
        self.high_water = 0
        self._started = False
        self._start_lock = threading.Lock()

    def start(self) -> None:
        with self._start_lock:
            if not self._started:
                self._started = True
                self._thread.start()

    def submit(self, finished: Finished) -> None:
        """Hand a call over; blocks while ``max_batches`` calls wait (the device waits, memory stays flat)."""
        self.start()
        self._handoff.put(finished)
        self.high_water = max(self.high_water, self._handoff.qsize())

    @property
    def waiting(self) -> int:
        """Calls handed over and not yet taken by the coordinator."""
        return self._handoff.qsize()

    def close(self, timeout_s: float | None = None) -> None:
        """Answer every call handed over, then stop."""
        if self._started:
            self._handoff.put(None)
            self._thread.join(timeout_s)
        self._pool.shutdown(wait=False)

    # -- the coordinator thread --------------------------------------------------------------------

    def _run(self) -> None:
        while (finished := self._handoff.get()) is not None:
            try:
                self._finish(finished)
            except Exception:  # noqa: BLE001 - the stage must go on; these jobs are answered
                log.exception("post-processing failed batch=%s worker=%s", finished.batch_id, self.name)
                for job in finished.jobs:
                    if not job.future.done():
                        job.fail(InternalError("image post-processing failed; see the server log"))
                        metrics.observe_job(job.params.model, "failed")

    def _refusals(self, finished: Finished) -> list[DarkroomError | None]:
        params = [job.params for job in finished.jobs]
        try:
            return list(self._screen.screen(params, finished.images))
        except Exception:  # noqa: BLE001 - retried per job below, so only the job it raises for fails
            if len(params) == 1:
                log.exception("safety screen failed batch=%s", finished.batch_id)
                return [InternalError("the image safety check failed; see the server log")]
        refusals: list[DarkroomError | None] = []
        for p, images in zip(params, finished.images, strict=True):
            try:
                refusals.append(self._screen.screen([p], [images])[0])
            except Exception:  # noqa: BLE001
                log.exception("safety screen failed batch=%s", finished.batch_id)
                refusals.append(InternalError("the image safety check failed; see the server log"))
        return refusals

    def _timed_encode(self, image: Image.Image, params: GenerationParams) -> tuple[bytes, float]:
        started = time.perf_counter()
        data = self._encode(image, params)
        return data, time.perf_counter() - started

    def _finish(self, finished: Finished) -> None:
        jobs = finished.jobs
        model = jobs[0].params.model
        stages = dict(finished.stages)
        screen_started = time.monotonic()
        refusals = self._refusals(finished)
        stages["safety"] = time.monotonic() - screen_started
        images = sum(job.params.n for job in jobs)
        metrics.observe_batch(model, len(jobs), images, stages, loras=len(jobs[0].params.loras))
        # Every image of the call but the first goes to the pool at once; this thread encodes the first itself
        # (a lone image costs no hop to another thread). Jobs are answered in order as theirs are done.
        encodes: list[list[Future[tuple[bytes, float]]] | None] = []
        inline: tuple[Image.Image, GenerationParams, Future[tuple[bytes, float]]] | None = None
        for job, pil_images, refusal in zip(jobs, finished.images, refusals, strict=True):
            if refusal is not None or job.future.done():
                encodes.append(None)
                continue
            futures: list[Future[tuple[bytes, float]]] = []
            for img in pil_images:
                if inline is None:
                    inline = (img, job.params, Future())
                    futures.append(inline[2])
                else:
                    futures.append(self._pool.submit(self._timed_encode, img, job.params))
            encodes.append(futures)
        if inline is not None:
            image, image_params, future = inline
            try:
                future.set_result(self._timed_encode(image, image_params))
            except Exception as exc:  # noqa: BLE001 - that job's failure, answered below
                future.set_exception(exc)
        for job, refusal, futures in zip(jobs, refusals, encodes, strict=True):
            queue_s = finished.started - job.enqueued_at
            if job.future.done():
                continue  # answered already (the run deadline passed while the call ran)
            if refusal is not None:  # flagged by the safety checker (or the check failed): nothing is encoded
                job.fail(refusal)
                metrics.observe_job(job.params.model, metrics.failure_outcome(refusal.status),
                                    queue_s=queue_s)
                log.info("job refused id=%s model=%s batch=%s code=%s request_id=%s", job.id,
                         job.params.model, finished.batch_id, refusal.code, job.request_id,
                         extra={"fields": {"job_id": job.id, "model": job.params.model,
                                           "batch_id": finished.batch_id, "code": refusal.code,
                                           "request_id": job.request_id}})
                continue
            assert futures is not None
            try:
                encoded = [future.result() for future in futures]
            except Exception:  # noqa: BLE001 - this job's encoding: it fails alone
                log.exception("encoding failed job=%s", job.id)
                job.fail(InternalError("image encoding failed; see the server log"))
                metrics.observe_job(job.params.model, "failed")
                continue
            encode_s = sum(seconds for _data, seconds in encoded)
            result = JobResult(
                images=[GeneratedImage(data, seed, job.params.output_format)
                        for (data, _s), seed in zip(encoded, job.params.seeds, strict=True)],
                batch_id=finished.batch_id,
                batch_jobs=len(jobs),
                batch_images=images,
                queue_s=queue_s,
                inference_s=finished.inference_s,
                encode_s=encode_s,
                stages={**stages, "image_encode": encode_s},
            )
            job.succeed(result)
            self._log_done(job, result)

    @staticmethod
    def _log_done(job: Job, result: JobResult) -> None:
        p = job.params
        metrics.observe_job(p.model, "done", queue_s=result.queue_s, encode_s=result.encode_s,
                            images=len(result.images))
        stage_ms = {f"{name}_ms": round(seconds * 1000, 2) for name, seconds in result.stages.items()}
        loras = lora_summary(p.loras)
        log.info(
            "job done id=%s model=%s size=%dx%d steps=%d n=%d image_loras=%s batch=%s batch_jobs=%d "
            "batch_images=%d queue_ms=%.1f inference_ms=%.1f encode_ms=%.1f request_id=%s %s",
            job.id, p.model, p.width, p.height, p.steps, p.n, ",".join(loras) or "-", result.batch_id,
            result.batch_jobs,
            result.batch_images, result.queue_s * 1000, result.inference_s * 1000, result.encode_s * 1000,
            job.request_id, " ".join(f"{k}={v:.1f}" for k, v in stage_ms.items()),
            extra={"fields": {
                "job_id": job.id, "request_id": job.request_id, "model": p.model, "width": p.width,
                "height": p.height, "steps": p.steps, "n": p.n, "loras": len(p.loras),
                "image_loras": loras, "conditioning": p.conditioning, "batch_id": result.batch_id,
                "batch_jobs": result.batch_jobs,
                "batch_images": result.batch_images, "queue_ms": round(result.queue_s * 1000, 2),
                "inference_ms": round(result.inference_s * 1000, 2), **stage_ms,
            }},
        )


def _as_requested(image: Image.Image, params: GenerationParams) -> bytes:
    """The image centre-cropped to the requested size, in the requested format and quality."""
    return encode_output(image, params.output_format, params.output_size, params.output_quality)
