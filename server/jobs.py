"""A job is one validated request on its way through the queue to a worker, and back.

Both processes import it. The result travels in a ``concurrent.futures.Future`` so a worker thread (or, on
Redis, the API's replies listener) can complete it, and the asyncio handler holding the client connection can
await it (server/queue/submit.py). A job's state decides, under its lock, whether it runs or is withdrawn.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

from .errors import DeadlineExceeded
from .params import GenerationParams


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes
    seed: int
    format: str


@dataclass(frozen=True)
class JobResult:
    images: list[GeneratedImage]
    batch_id: str
    batch_jobs: int
    batch_images: int
    queue_s: float
    inference_s: float
    encode_s: float
    # Seconds per stage of the batch (text_encode, denoise, vae_decode, safety) and of this job (image_encode).
    stages: dict[str, float] = field(default_factory=dict)


class ClientGone(Exception):
    """The client disconnected before its job started; the job was withdrawn."""


@dataclass(eq=False)
class Job:
    params: GenerationParams
    deadline: float  # time.monotonic() by which the job must have started
    id: str = field(default_factory=lambda: f"img-{uuid.uuid4().hex}")
    enqueued_at: float = field(default_factory=time.monotonic)
    created_unix: int = field(default_factory=lambda: int(time.time()))
    future: Future[JobResult] = field(default_factory=Future)
    state: JobState = JobState.QUEUED
    # The request's x-request-id (server/api/observe.py), for the worker's log line.
    request_id: str | None = None
    # Times the job was started (a worker process that died with it in hand: it is started again, up to
    # queue.max_attempts times).
    attempts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def create(cls, params: GenerationParams, timeout_s: float) -> Job:
        return cls(params=params, deadline=time.monotonic() + timeout_s)

    def expired(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) > self.deadline

    def try_start(self) -> bool:
        """QUEUED → RUNNING; False when the job was withdrawn meanwhile."""
        with self._lock:
            if self.state is not JobState.QUEUED:
                return False
            self.state = JobState.RUNNING
            self.attempts += 1
            return True

    def requeue(self) -> bool:
        """RUNNING → QUEUED, for a job whose worker process died before answering it; False once
        answered."""
        with self._lock:
            if self.state is not JobState.RUNNING or self.future.done():
                return False
            self.state = JobState.QUEUED
            return True

    def withdraw(self, error: BaseException) -> bool:
        """QUEUED → CANCELLED with ``error`` as its outcome; False once it has started."""
        with self._lock:
            if self.state is not JobState.QUEUED:
                return False
            self.state = JobState.CANCELLED
            if not self.future.done():
                self.future.set_exception(error)
        return True

    def succeed(self, result: JobResult) -> None:
        self._finish(lambda: self.future.set_result(result))

    def fail(self, error: BaseException) -> None:
        self._finish(lambda: self.future.set_exception(error))

    def _finish(self, complete: Callable[[], None]) -> None:
        with self._lock:
            self.state = JobState.DONE
            # The waiter may have been cancelled (server shutting down); nobody reads the outcome then.
            if not self.future.done():
                complete()


def start_batch(batch: Iterable[Job], now: float) -> list[Job]:
    """The jobs of a batch taken from the queue that are to run now, each moved QUEUED → RUNNING.

    ``now`` is ``time.monotonic()`` seconds. A job past its start deadline is answered 504
    ``deadline_exceeded`` (it is not run); a job withdrawn meanwhile (its client left) is skipped. The one
    rule for the in-process device loop (server/worker/loop.py) and the feeder of a worker process
    (server/worker/children.py).
    """
    runnable: list[Job] = []
    for job in batch:
        if job.expired(now):
            job.fail(DeadlineExceeded("the job did not start before its deadline; it was not run"))
        elif job.try_start():
            runnable.append(job)
    return runnable
