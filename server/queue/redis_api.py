"""The API side of the Redis queue (``RedisQueue``): admission and enqueue, withdrawal, depth, and one
listener per API process that completes jobs from the replies workers push (the layout:
server/queue/redis_keys.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from redis.exceptions import RedisError, ResponseError

from ..config import QueueSettings
from ..errors import DeadlineExceeded, QueueFull, ServiceUnavailable
from ..jobs import Job, JobResult
from . import wire
from .redis_keys import (
    ENQUEUE_SCRIPT,
    GROUP,
    Keys,
    Outage,
    connect,
    default_instance_name,
    ensure_group,
    no_group,
)

log = logging.getLogger(__name__)


# -- the API side -------------------------------------------------------------------------------------


class RedisQueue:
    """What an API process needs: admission + enqueue, withdrawal, depth, and the replies listener."""

    def __init__(self, settings: QueueSettings, instance: str | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        # Few retries: these calls run on the event loop; one reconnect covers a Redis restart, and during
        # an outage requests fail fast (503) instead of each waiting out a backoff.
        self.client = connect(settings.redis_url, retries=1)
        # The listener blocks on its own connection pool so it never starves request handlers.
        self._listen_client = connect(settings.redis_url)
        self.instance = f"{instance or default_instance_name()}-{uuid.uuid4().hex[:6]}"
        self.reply_key = self.keys.replies(self.instance)
        self._enqueue = self.client.register_script(ENQUEUE_SCRIPT)
        self._jobs: dict[str, tuple[Job, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self._outage = Outage("api")

    # lifecycle

    def start(self) -> None:
        try:
            ensure_group(self.client, self.keys)
        except RedisError as exc:  # not fatal: the first put creates it once Redis is there
            log.warning("redis not reachable at start-up: %s", exc)
        self._listener = threading.Thread(target=self._listen, name="redis-replies", daemon=True)
        self._listener.start()

    def close(self) -> None:
        """Called after the HTTP server has finished its in-flight responses (uvicorn's order)."""
        self._stop.set()
        if self._listener is not None:
            self._listener.join(5)
        with self._lock:
            waiting = list(self._jobs.values())
            self._jobs.clear()
        for job, _entry in waiting:
            job.fail(ServiceUnavailable("the server is shutting down"))

    # the JobQueue protocol (server/queue/protocol.py)

    def put(self, job: Job) -> None:
        if self._outage.recent():
            raise self._unavailable()
        payload = wire.encode_job(job, self.reply_key)
        with self._lock:  # registered first: a fast worker's reply must find it
            self._jobs[job.id] = (job, None)
        try:
            entry = self._add(payload)
        except RedisError as exc:
            self._unregister(job.id)
            self._outage.failed(exc)
            raise self._unavailable() from None
        self._outage.ok()
        if entry is None:
            self._unregister(job.id)
            raise QueueFull(
                f"the queue is full ({self.settings.max_jobs} jobs waiting); retry later",
                headers={"retry-after": str(self.settings.retry_after_s), "x-should-retry": "true"},
            )
        with self._lock:
            if job.id in self._jobs:
                self._jobs[job.id] = (job, entry)

    def _unavailable(self) -> ServiceUnavailable:
        return ServiceUnavailable("the job queue is unreachable; retry later", code="queue_unavailable",
                                  headers={"retry-after": str(self.settings.retry_after_s)})

    def _add(self, payload: str) -> Any:
        for attempt in range(2):
            try:
                return self._enqueue(keys=[self.keys.stream], args=[GROUP, self.settings.max_jobs, payload])
            except ResponseError as exc:
                if attempt or not no_group(exc):
                    raise
                ensure_group(self.client, self.keys)
        return None

    def reserve_withdrawal(self, job: Job) -> bool:
        """Take a job back before any worker starts it; False when a worker already has (let it finish)."""
        key = self.keys.state(job.id)
        if self._outage.recent():
            return True
        try:
            if self.client.set(key, "withdrawn", nx=True, ex=self._ttl(job)):
                return True
            return self.client.get(key) == b"withdrawn"
        except RedisError as exc:
            # Unreachable: give up on it here; a worker that runs it anyway is answered into the void.
            self._outage.failed(exc)
            return True

    def remove(self, job: Job) -> bool:
        entry = self._unregister(job.id)
        if entry:
            try:
                self.client.xdel(self.keys.stream, entry)
            except RedisError:
                pass  # the state key already says withdrawn; a worker skips it
        return entry is not None

    def depth(self) -> int:
        """Jobs waiting for a worker, across every API pod."""
        if self._outage.recent():
            return 0
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.xlen(self.keys.stream)
                pipe.xpending(self.keys.stream, GROUP)
                length, pending = pipe.execute()
        except ResponseError:
            return 0  # no stream or group yet: nothing waits
        except RedisError:
            return 0
        return max(0, int(length) - int(pending["pending"]))

    def drain(self) -> list[Job]:
        return []  # the queue is shared: other pods' workers may still run what waits in it

    def status(self) -> tuple[bool, str]:
        """Reachability for /ready, and how many workers heart-beat recently."""
        if self._outage.recent():
            return False, "redis unreachable"
        try:
            self.client.ping()
            seen = self.client.zcount(self.keys.workers, time.time() - self.settings.visibility_timeout_s,
                                      "+inf")
        except RedisError as exc:
            self._outage.failed(exc)
            return False, f"redis unreachable: {type(exc).__name__}"
        self._outage.ok()
        return True, f"redis ok, {seen} worker(s) seen"

    # internals

    def _ttl(self, job: Job) -> int:
        return int(max(60.0, job.deadline - time.monotonic()) + self.settings.max_run_s + 60)

    def _unregister(self, job_id: str) -> Any:
        with self._lock:
            job_entry = self._jobs.pop(job_id, None)
        return None if job_entry is None else (job_entry[1] if job_entry[1] is not None else b"")

    def _listen(self) -> None:
        next_reap = 0.0
        while not self._stop.is_set():
            try:
                item = self._listen_client.blpop([self.reply_key], timeout=1)
            except RedisError as exc:
                self._outage.failed(exc)
                self._stop.wait(0.5)
                continue
            self._outage.ok()
            if item is not None:
                self._deliver(item[1])
            if time.monotonic() >= next_reap:
                self._reap()
                next_reap = time.monotonic() + 1.0

    def _deliver(self, payload: bytes) -> None:
        try:
            job_id, outcome = wire.decode_reply(payload)
        except Exception:  # noqa: BLE001 - a bad reply must not kill the listener
            log.exception("undecodable reply on %s", self.reply_key)
            return
        with self._lock:
            job_entry = self._jobs.pop(job_id, None)
        if job_entry is None:
            return  # withdrawn meanwhile, or a second run's duplicate answer
        job = job_entry[0]
        if isinstance(outcome, JobResult):
            job.succeed(outcome)
        else:
            job.fail(outcome)

    def _reap(self) -> None:
        """Jobs no reply will come for: started on workers that are all gone, long past their deadline."""
        now = time.monotonic()
        with self._lock:
            stale = [jid for jid, (job, _) in self._jobs.items()
                     if job.future.done() or now > job.deadline + self.settings.max_run_s]
            jobs = [self._jobs.pop(jid)[0] for jid in stale]
        for job in jobs:
            job.fail(DeadlineExceeded(
                "no worker answered this job within queue.max_run_s after its deadline", code="no_result"))

