"""The worker, with a stand-in engine (tests/support/standin.py): a real Worker thread, MemoryQueue and Jobs.

Fault isolation: a batch that raises is run again one job at a time, so only the job that raises fails; an
out-of-memory batch is split, and a request too large alone is a 400; a sticky device error marks the worker
failed; a hung call is answered 504 and the worker is not ready until it returns. The thread lives on and
runs the next batch. Jobs past their deadline fail with DeadlineExceeded and withdrawn jobs are skipped, both
without an engine call. Post-processing beside the device answers in order, isolates one job's encoding
failure, and never holds more than its bound of calls however slow it is. LoRA downloads never hold the
device.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import threading
import time
from collections.abc import Iterator

import pytest
from PIL import Image

from server.config import SchedulerSettings
from server.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    ServiceUnavailable,
    TooLargeForDevice,
)
from server.jobs import Job, JobResult, JobState
from server.params import GenerationParams
from server.queue.memory import MemoryQueue
from server.queue.submit import fail_waiting
from server.worker.loop import LoopOptions, Worker

from .support.launch import wait_until
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


def test_a_failing_call_fails_its_job_and_the_worker_runs_the_next(queue: MemoryQueue) -> None:
    engine = StandInEngine(fail_calls=[1])
    worker = make_worker(engine, queue)
    failing = job(params(seed=1))
    queue.put(failing)
    started(worker)
    try:
        err = error_of(failing)
        assert isinstance(err, InternalError), err
        assert err.status == 500 and err.code == "internal_error"
        assert "stand-in" not in err.message  # internals stay in the log
        assert failing.state is JobState.DONE
        assert len(engine.calls) == 1  # a lone job is not run again

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


def test_a_failed_batch_is_run_again_one_job_at_a_time(queue: MemoryQueue) -> None:
    """Issue 12 (3b): a batch that fails for a reason of its own (here: once) does not fail its jobs."""
    engine = StandInEngine(fail_calls=[1])
    worker = make_worker(engine, queue)
    first = [job(params(seed=1)), job(params(seed=2, n=2))]
    for j in first:
        queue.put(j)
    started(worker)
    try:
        results = [j.future.result(timeout=WAIT_S) for j in first]
        assert [[g.seed for g in r.images] for r in results] == [[1], [2, 3]]
        assert [[p.seeds for p in call] for call in engine.calls] == [[(1,), (2, 3)], [(1,)], [(2, 3)]]
        assert all(r.batch_jobs == 1 for r in results)
    finally:
        worker.stop()


def cfg(seed: int, negative: str) -> GenerationParams:
    return dataclasses.replace(params(seed=seed), negative_prompt=negative, true_cfg_scale=2.0)


def test_a_poisoned_job_fails_alone_and_its_batch_mates_are_answered(queue: MemoryQueue) -> None:
    """Issue 12 (3b), the reported input: ``"negative_prompt": "\\ud800"`` made the tokenizer raise for the
    whole batch (6 of 6 requests failed). Injected at the engine (the API refuses it now), it fails only its
    own job."""
    engine = StandInEngine()
    worker = make_worker(engine, queue)
    good = [job(cfg(1, "blurry")), job(cfg(3, "dark"))]
    poisoned = job(cfg(2, "\ud800"))
    for j in (good[0], poisoned, good[1]):
        queue.put(j)
    started(worker)
    try:
        assert [j.future.result(timeout=WAIT_S).images[0].seed for j in good] == [1, 3]
        err = error_of(poisoned)
        assert isinstance(err, InternalError) and err.status == 500, err
        # One call for the batch of three (it raised), then each job alone.
        assert [[p.seeds for p in call] for call in engine.calls] == [
            [(1,), (2,), (3,)], [(1,)], [(2,)], [(3,)]]
        assert not worker.failed and worker.ready.is_set()
    finally:
        worker.stop()


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


# --- out of memory, sticky device errors, the run deadline ------------------------------------------


def test_out_of_memory_splits_the_batch_and_a_request_too_large_alone_is_a_400(queue: MemoryQueue) -> None:
    """Issue 18 (5): at most 2 images fit. The batch of 6 images is split in halves (and a half of 4 again);
    the request of 3 images does not fit alone: 400 ``too_large_for_device``, never a 500 the SDKs retry."""
    engine = StandInEngine(max_images=2)
    worker = make_worker(engine, queue)
    small = [job(params(seed=s)) for s in (1, 2, 3)]
    big = job(params(seed=10, n=3))
    for j in (*small, big):
        queue.put(j)
    started(worker)
    try:
        assert [j.future.result(timeout=WAIT_S).images[0].seed for j in small] == [1, 2, 3]
        err = error_of(big)
        assert isinstance(err, TooLargeForDevice), err
        assert err.status == 400 and err.code == "too_large_for_device" and "lower n" in err.message
        assert [[p.seeds[0] for p in call] for call in engine.calls] == [
            [1, 2, 3, 10], [1, 2], [3, 10], [3], [10]]
        assert engine.freed == 3  # the cache is freed after every out-of-memory error
        assert worker.ready.is_set() and not worker.failed
    finally:
        worker.stop()


def test_a_sticky_device_error_marks_the_worker_failed_without_rerunning(queue: MemoryQueue) -> None:
    engine = StandInEngine(fail_calls=[1], error=RuntimeError(
        "CUDA error: an illegal memory access was encountered"))
    worker = make_worker(engine, queue)
    batch = [job(params(seed=1)), job(params(seed=2))]
    for j in batch:
        queue.put(j)
    started(worker)
    for j in batch:
        err = error_of(j)
        assert isinstance(err, ServiceUnavailable) and err.code == "device_error", err
        assert err.headers.get("retry-after")
    worker.join(WAIT_S)
    assert not worker.alive and worker.failed and not worker.ready.is_set()
    assert worker.state.startswith("failed: device error") and "illegal memory access" in worker.state
    assert len(engine.calls) == 1  # a broken device runs nothing more: no one-by-one re-runs
    later = job(params(seed=3))
    queue.put(later)
    fail_waiting(queue, worker.state)  # what the runtime does once every worker has failed
    assert isinstance(error_of(later), ServiceUnavailable)


def test_a_hung_call_is_answered_504_and_the_worker_is_not_ready_until_it_returns(queue: MemoryQueue) -> None:
    """Issue 11: the in-process queue waited for a running job forever; now queue.max_run_s holds for both."""
    engine = StandInEngine(hang_calls=[1])
    worker = Worker(engine, queue, SchedulerSettings(batch_window_ms=0), options=LoopOptions(max_run_s=0.3))
    hung = job(params(seed=1))
    queue.put(hung)
    started(worker)
    try:
        err = error_of(hung)
        assert isinstance(err, DeadlineExceeded) and err.status == 504 and err.code == "run_timeout", err
        assert not worker.ready.is_set()
        assert worker.state.startswith("not ready:") and "queue.max_run_s" in worker.state
        waiting = job(params(seed=2))
        queue.put(waiting)  # waits: the device is still held
        engine.release.set()  # the call returns at last: its result is dropped, the worker is ready again
        assert waiting.future.result(timeout=WAIT_S).images[0].seed == 2
        assert worker.ready.is_set() and worker.state == "ready"
        assert hung.future.exception() is err  # answered once
    finally:
        engine.release.set()
        worker.stop()


# --- the adaptive batch window ---------------------------------------------------------------------


def test_a_lone_job_on_a_quiet_queue_does_not_wait_the_window() -> None:
    queue = MemoryQueue(max_jobs=8)
    queue.put(job(params(seed=1)))
    taken: list[list[Job]] = []
    taker = threading.Thread(target=lambda: taken.append(queue.take_batch(8, window_s=600.0)))
    taker.start()
    taker.join(WAIT_S)  # with the fixed window it would wait 600 s
    assert not taker.is_alive() and [len(b) for b in taken] == [1]


def test_the_window_waits_for_a_request_being_received() -> None:
    queue = MemoryQueue(max_jobs=8)
    taken: list[list[Job]] = []
    with queue.arriving():  # the API is validating a second request
        queue.put(job(params(seed=1)))
        # Room for two images: the batch is full, and returns, once the second job joins.
        taker = threading.Thread(target=lambda: taken.append(queue.take_batch(2, window_s=600.0)))
        taker.start()
        wait_for(lambda: queue.depth() == 0)  # the first job is in the batch being filled
        queue.put(job(params(seed=2)))
    taker.join(WAIT_S)
    assert not taker.is_alive() and [[j.params.seeds for j in b] for b in taken] == [[(1,), (2,)]]


def test_a_fixed_window_still_waits_when_adaptive_is_off() -> None:
    queue = MemoryQueue(max_jobs=8, adaptive_window=False)
    queue.put(job(params(seed=1)))
    taken: list[list[Job]] = []
    taker = threading.Thread(target=lambda: taken.append(queue.take_batch(3, window_s=600.0)))
    taker.start()
    for seed in (2, 3):
        wait_for(lambda: queue.depth() == 0)
        assert taker.is_alive()  # still filling: nothing arrives, yet it waits
        queue.put(job(params(seed=seed)))
    taker.join(WAIT_S)  # three images: full
    assert not taker.is_alive() and [len(b) for b in taken] == [3]


wait_for = functools.partial(wait_until, what="the condition", timeout_s=WAIT_S, interval_s=0.005)
