"""The worker's fault isolation, with a stand-in engine: a real Worker thread, MemoryQueue and Jobs.

A batch that raises fails only its own jobs; the thread lives on and runs the next batch. Jobs past
their deadline fail with DeadlineExceeded and withdrawn jobs are skipped, both without an engine call.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import pytest
from PIL import Image

from server.config import SchedulerSettings
from server.errors import DeadlineExceeded, InternalError, InvalidRequest, ServiceUnavailable
from server.jobs import Job, JobResult, JobState
from server.params import GenerationParams
from server.queue.memory import MemoryQueue
from server.queue.submit import fail_waiting
from server.worker.loop import Worker

from .support.standin import StandInEngine

WAIT_S = 30.0


def params(seed: int = 1, n: int = 1, size: int = 64, fmt: str = "png") -> GenerationParams:
    return GenerationParams(model="stand-in", prompt=f"prompt {seed}", width=size, height=size, steps=1,
                            guidance_scale=3.5, seeds=tuple(seed + i for i in range(n)), output_format=fmt)


def job(p: GenerationParams | None = None, timeout_s: float = 60.0) -> Job:
    return Job.create(p or params(), timeout_s)


def make_worker(engine: StandInEngine, queue: MemoryQueue) -> Worker:
    scheduler = SchedulerSettings(batch_window_ms=20, max_batch_images=8)
    return Worker(engine, queue, scheduler)


@pytest.fixture
def queue() -> Iterator[MemoryQueue]:
    q = MemoryQueue(max_jobs=16)
    yield q
    q.close()


def started(worker: Worker) -> Worker:
    worker.start()
    assert worker.ready.wait(WAIT_S), worker.load_error
    return worker


def error_of(j: Job) -> BaseException | None:
    return j.future.exception(timeout=WAIT_S)


def decoded(result: JobResult) -> list[Image.Image]:
    images = []
    for generated in result.images:
        image = Image.open(io.BytesIO(generated.data))
        image.load()
        images.append(image)
    return images


def test_failing_batch_fails_its_jobs_and_the_worker_runs_the_next(queue: MemoryQueue) -> None:
    engine = StandInEngine(fail_calls=[1])
    worker = make_worker(engine, queue)
    # Two compatible jobs queued before the worker starts: they go out as one batch.
    first = [job(params(seed=1)), job(params(seed=2, n=2))]
    for j in first:
        queue.put(j)
    started(worker)
    try:
        for j in first:
            err = error_of(j)
            assert isinstance(err, InternalError), err
            assert err.status == 500 and err.code == "internal_error"
            assert "illegal memory access" not in err.message  # internals stay in the log
            assert j.state is JobState.DONE
        assert len(engine.calls) == 1 and len(engine.calls[0]) == 2

        later = job(params(seed=40, n=2))
        queue.put(later)
        result = later.future.result(timeout=WAIT_S)
        assert worker._thread.is_alive()
        assert not worker.failed
        assert [g.seed for g in result.images] == [40, 41]
        assert [img.size for img in decoded(result)] == [(64, 64), (64, 64)]
        assert all(img.format == "PNG" for img in decoded(result))
        assert result.batch_jobs == 1 and result.batch_images == 2
        assert len(engine.calls) == 2
    finally:
        worker.stop()
    assert not worker._thread.is_alive()


def test_engine_darkroom_error_reaches_the_jobs_unchanged(queue: MemoryQueue) -> None:
    refusal = InvalidRequest("prompt is not allowed", param="prompt")
    engine = StandInEngine(fail_calls=[1], error=refusal)
    worker = started(make_worker(engine, queue))
    try:
        refused = job()
        queue.put(refused)
        assert error_of(refused) is refusal
        ok = job(params(seed=5))
        queue.put(ok)
        assert len(ok.future.result(timeout=WAIT_S).images) == 1
    finally:
        worker.stop()


def test_expired_job_fails_with_deadline_exceeded_without_the_engine(queue: MemoryQueue) -> None:
    engine = StandInEngine()
    worker = make_worker(engine, queue)
    expired = Job(params=params(seed=1), deadline=time.monotonic() - 1.0)
    queue.put(expired)
    started(worker)
    try:
        err = error_of(expired)
        assert isinstance(err, DeadlineExceeded), err
        assert err.status == 504
        assert engine.calls == []
        # The worker carries on with the next job.
        fresh = job(params(seed=2))
        queue.put(fresh)
        assert len(fresh.future.result(timeout=WAIT_S).images) == 1
        assert [[p.seeds for p in call] for call in engine.calls] == [[(2,)]]
    finally:
        worker.stop()


def test_expired_job_in_a_batch_does_not_hold_back_the_others(queue: MemoryQueue) -> None:
    engine = StandInEngine()
    worker = make_worker(engine, queue)
    expired = Job(params=params(seed=1), deadline=time.monotonic() - 1.0)
    fresh = job(params(seed=2))
    queue.put(expired)
    queue.put(fresh)
    started(worker)
    try:
        assert isinstance(error_of(expired), DeadlineExceeded)
        assert fresh.future.result(timeout=WAIT_S).images[0].seed == 2
        assert [[p.seeds for p in call] for call in engine.calls] == [[(2,)]]
    finally:
        worker.stop()


def test_withdrawn_job_is_skipped(queue: MemoryQueue) -> None:
    """A job withdrawn (client gone) but still in the queue is never run, and keeps its own outcome."""
    engine = StandInEngine()
    worker = make_worker(engine, queue)
    withdrawn = job(params(seed=1))
    kept = job(params(seed=2))
    queue.put(withdrawn)
    queue.put(kept)
    reason = DeadlineExceeded("withdrawn by the test")
    assert withdrawn.withdraw(reason)
    started(worker)
    try:
        assert kept.future.result(timeout=WAIT_S).images[0].seed == 2
        assert error_of(withdrawn) is reason
        assert withdrawn.state is JobState.CANCELLED
        assert [[p.seeds for p in call] for call in engine.calls] == [[(2,)]]
    finally:
        worker.stop()


def test_only_withdrawn_or_expired_jobs_means_no_engine_call(queue: MemoryQueue) -> None:
    engine = StandInEngine()
    worker = make_worker(engine, queue)
    withdrawn = job()
    assert withdrawn.withdraw(RuntimeError("gone"))
    expired = Job(params=params(seed=3), deadline=time.monotonic() - 1.0)
    worker.run_batch([withdrawn, expired])  # synchronously, without the thread
    assert engine.calls == []
    assert isinstance(error_of(expired), DeadlineExceeded)
    assert isinstance(error_of(withdrawn), RuntimeError)


def test_encoding_failure_fails_only_that_job(queue: MemoryQueue) -> None:
    engine = StandInEngine()
    worker = make_worker(engine, queue)
    bad = job(params(seed=1, fmt="tiff"))  # no encoder for it
    good = job(params(seed=2, fmt="png"))
    worker.run_batch([bad, good])
    assert isinstance(error_of(bad), InternalError)
    assert decoded(good.future.result(timeout=WAIT_S))[0].format == "PNG"
    assert len(engine.calls) == 1


def test_load_failure_marks_the_worker_failed_and_waiting_jobs_get_503(queue: MemoryQueue) -> None:
    engine = StandInEngine(load_error=OSError("weights not found"))
    worker = make_worker(engine, queue)
    waiting = job()
    queue.put(waiting)
    worker.start()
    worker.join(WAIT_S)
    assert not worker._thread.is_alive()
    assert worker.failed and not worker.ready.is_set()
    assert worker.load_error is not None and "weights not found" in worker.load_error
    fail_waiting(queue, worker.load_error)
    err = error_of(waiting)
    assert isinstance(err, ServiceUnavailable) and err.status == 503
    assert queue.depth() == 0
    assert engine.calls == []


def test_max_batch_pixels_caps_a_batch_of_large_images(queue: MemoryQueue) -> None:
    """scheduler.max_batch_pixels in the one batch-filling rule (server/queue/batching.py): at 1024x1024 a
    cap of 2 megapixels makes pairs; a lone request larger than the cap still runs whole; small images are
    capped by max_batch_images only."""
    engine = StandInEngine()
    big = [job(params(seed=10 * i, size=1024)) for i in range(6)]
    lone = job(params(seed=100, n=3, size=1024))
    small = [job(params(seed=200 + i, size=64)) for i in range(4)]
    for j in [*big, lone, *small]:
        queue.put(j)
    scheduler = SchedulerSettings(batch_window_ms=20, max_batch_images=8, max_batch_pixels=2 * 1024 * 1024)
    worker = started(Worker(engine, queue, scheduler))
    try:
        for j in [*big, lone, *small]:
            assert error_of(j) is None
    finally:
        worker.stop()
    calls = [(call[0].width, sum(p.n for p in call)) for call in engine.calls]
    assert calls == [(1024, 2), (1024, 2), (1024, 2), (1024, 3), (64, 4)]
    assert SchedulerSettings().max_batch_pixels == 8 * 1024 * 1024  # 8 images at 1024x1024, 2 at 2048x2048
