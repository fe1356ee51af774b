"""The API side of the Redis queue (``RedisQueue``): admission and enqueue, withdrawal, depth, readiness, one
listener per API process that completes jobs from the replies workers push, and one prober that notices when
Redis lost its data (the layout: server/queue/redis_keys.py).

Nothing here blocks the event loop: the request path (``admit``, ``reserve_withdrawal``, ``remove``) talks to
Redis through ``redis.asyncio``, every call bounded by ``queue.redis_timeout_s`` (a Redis that accepts
connections and never answers costs a request that long, then 503 with ``retry-after``; after 2 s of such an
outage requests fail at once). The listener and the prober run in threads of their own, with their own
connections; ``depth`` and ``status`` read what the prober saw last.

Redis losing its data (restarted without persistence, flushed): each API process still holds every job it is
waiting for. When the prober sees Redis's ``run_id`` change or the queue's marker key vanish, it checks each
of its jobs; one whose stream entry is gone (and that no worker finished) is enqueued again, at most
``queue.max_attempts`` times in all, else answered 503 with ``retry-after`` at once, instead of each client
waiting for its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass
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
    connect_async,
    default_instance_name,
    ensure_group,
    no_group,
)

log = logging.getLogger(__name__)

# How often the prober reads Redis (depth, workers, run_id, the marker).
PROBE_S = 1.0
# Redis errors a request-path call may end in (OSError: a socket error redis-py did not wrap).
_FAILURES = (RedisError, asyncio.TimeoutError, OSError)


@dataclass
class _Held:
    """A job this process waits for: its stream entry id (None while being added) and how often it was
    enqueued."""

    job: Job
    entry: Any = None
    enqueued: int = 0


@dataclass
class _Seen:
    """What the prober saw last."""

    at: float = 0.0  # time.monotonic() of its last answer; 0: never
    depth: int = 0
    workers: int = 0


class RedisQueue:
    """What an API process needs: admission + enqueue, withdrawal, depth, the replies listener, the prober."""

    def __init__(self, settings: QueueSettings, instance: str | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.marker_key = f"{settings.key_prefix}:marker"
        # The request path: asyncio, bounded by redis_timeout_s, no retries (the client retries a 503).
        self.client = connect_async(settings.redis_url, settings.redis_timeout_s,
                                    settings.redis_max_connections)
        self._enqueue = self.client.register_script(ENQUEUE_SCRIPT)
        # The listener blocks on its own connection so it never starves anything else.
        self._listen_client = connect(settings.redis_url)
        self._probe_client = connect(settings.redis_url, retries=0, timeout_s=settings.redis_timeout_s)
        self._requeue = self._probe_client.register_script(ENQUEUE_SCRIPT)
        self.instance = f"{instance or default_instance_name()}-{uuid.uuid4().hex[:6]}"
        self.reply_key = self.keys.replies(self.instance)
        self._jobs: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._outage = Outage("api")
        self._seen = _Seen()
        self._run_id: str | None = None
        self._marker: str | None = None
        self.requeued = 0
        self.lost = 0

    # lifecycle

    def start(self) -> None:
        """Start the listener and the prober (neither waits for Redis here: start-up never blocks on it)."""
        for name, target in (("redis-replies", self._listen), ("redis-probe", self._probe_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Called after the HTTP server has finished its in-flight responses (uvicorn's order)."""
        self._stop.set()
        for thread in self._threads:  # each wakes within a second (longer only while Redis hangs)
            thread.join(2)
        with self._lock:
            waiting = list(self._jobs.values())
            self._jobs.clear()
        for held in waiting:
            held.job.fail(ServiceUnavailable("the server is shutting down"))

    async def aclose(self) -> None:
        await self.client.aclose(close_connection_pool=True)

    # the JobQueue protocol (server/queue/protocol.py)

    def _failing(self) -> bool:
        """An outage under way (past its grace, failing again within a probe cycle): fail fast."""
        return self._outage.recent(window_s=self.settings.redis_timeout_s + 2 * PROBE_S)

    async def admit(self, job: Job) -> None:
        if self._failing():
            raise self._unavailable()
        payload = wire.encode_job(job, self.reply_key)
        with self._lock:  # registered first: a fast worker's reply must find it
            self._jobs[job.id] = _Held(job)
        try:
            entry = await asyncio.wait_for(self._add(payload), self.settings.redis_timeout_s)
        except _FAILURES as exc:
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
            held = self._jobs.get(job.id)
            if held is not None:
                held.entry, held.enqueued = entry, held.enqueued + 1

    def _unavailable(self) -> ServiceUnavailable:
        return ServiceUnavailable("the job queue is unreachable; retry later", code="queue_unavailable",
                                  headers={"retry-after": str(self.settings.retry_after_s)})

    async def _add(self, payload: str) -> Any:
        for attempt in range(2):
            try:
                return await self._enqueue(keys=[self.keys.stream],
                                           args=[GROUP, self.settings.max_jobs, payload])
            except ResponseError as exc:
                if attempt or not no_group(exc):
                    raise
                try:
                    await self.client.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
                except ResponseError as again:
                    if "BUSYGROUP" not in str(again):
                        raise
        return None

    async def reserve_withdrawal(self, job: Job) -> bool:
        """Take a job back before any worker starts it; False when a worker already has (let it finish)."""
        if self._failing():
            return True
        key = self.keys.state(job.id)

        async def claim() -> bool:
            if await self.client.set(key, "withdrawn", nx=True, ex=self._ttl(job)):
                return True
            return await self.client.get(key) == b"withdrawn"

        try:
            return await asyncio.wait_for(claim(), self.settings.redis_timeout_s)
        except _FAILURES as exc:
            # Unreachable: give up on it here; a worker that runs it anyway is answered into the void.
            self._outage.failed(exc)
            return True

    async def remove(self, job: Job) -> bool:
        entry = self._unregister(job.id)
        if entry:
            try:
                await asyncio.wait_for(self.client.xdel(self.keys.stream, entry),
                                       self.settings.redis_timeout_s)
            except _FAILURES:
                pass  # the state key already says withdrawn; a worker skips it
        return entry is not None

    def depth(self) -> int:
        """Jobs waiting for a worker, across every API pod, as the prober saw last (at most ~1 s old)."""
        return self._seen.depth

    def drain(self) -> list[Job]:
        return []  # the queue is shared: other pods' workers may still run what waits in it

    def arriving(self) -> contextlib.AbstractContextManager[None]:
        """Nothing: the queue is shared, and its workers' batch window does not adapt to arrivals."""
        return contextlib.nullcontext()

    def status(self) -> tuple[bool, str]:
        """Reachability for /ready (from the prober and every failure since), and how many workers
        heart-beat recently."""
        if self._outage.since is not None:
            return False, f"redis unreachable: {self._outage.reason}"
        seen = self._seen
        if not seen.at:
            return False, "redis not reached yet"
        if time.monotonic() - seen.at > 2 * PROBE_S + self.settings.redis_timeout_s:
            return False, "redis is not answering"
        return True, f"redis ok, {seen.workers} worker(s) seen"

    # internals

    def _ttl(self, job: Job) -> int:
        return int(max(60.0, job.deadline - time.monotonic()) + self.settings.max_run_s + 60)

    def _unregister(self, job_id: str) -> Any:
        with self._lock:
            held = self._jobs.pop(job_id, None)
        return None if held is None else (held.entry if held.entry is not None else b"")

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
            held = self._jobs.pop(job_id, None)
        if held is None:
            return  # withdrawn meanwhile, or a second run's duplicate answer
        if isinstance(outcome, JobResult):
            held.job.succeed(outcome)
        else:
            held.job.fail(outcome)

    def _reap(self) -> None:
        """Jobs no reply will come for: started on workers that are all gone, long past their deadline."""
        now = time.monotonic()
        with self._lock:
            stale = [jid for jid, held in self._jobs.items()
                     if held.job.future.done() or now > held.job.deadline + self.settings.max_run_s]
            jobs = [self._jobs.pop(jid).job for jid in stale]
        for job in jobs:
            job.fail(DeadlineExceeded(
                "no worker answered this job within queue.max_run_s after its deadline", code="no_result"))

    # the prober

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._probe()
            except RedisError as exc:
                self._outage.failed(exc)
            except Exception:  # noqa: BLE001 - the prober must outlive anything odd
                log.exception("redis probe failed")
            self._stop.wait(PROBE_S)

    def _probe(self) -> None:
        client = self._probe_client
        with client.pipeline(transaction=False) as pipe:
            pipe.info("server")
            pipe.get(self.marker_key)
            pipe.xlen(self.keys.stream)
            pipe.zcount(self.keys.workers, time.time() - self.settings.visibility_timeout_s, "+inf")
            info, marker, length, workers = pipe.execute()
        run_id = str(info.get("run_id", ""))
        lost: list[str] = []
        if self._run_id is not None and run_id != self._run_id:
            lost.append(f"redis restarted (run_id {self._run_id[:8]} -> {run_id[:8]})")
        if self._marker is not None and (marker or b"").decode() != self._marker:
            lost.append("the queue's keys were removed (marker key gone)")
        if marker is None:
            client.set(self.marker_key, uuid.uuid4().hex, nx=True)
            marker = client.get(self.marker_key)
        try:
            ensure_group(client, self.keys)
            pending = int(client.xpending(self.keys.stream, GROUP)["pending"])
        except ResponseError:
            pending = 0
        self._run_id, self._marker = run_id, (marker or b"").decode()
        self._seen = _Seen(time.monotonic(), max(0, int(length) - pending), int(workers))
        self._outage.ok()
        if lost:
            self._recover("; ".join(lost))

    def _recover(self, reason: str) -> None:
        """After Redis lost data: enqueue again each of this process's jobs whose entry is gone (at most
        ``max_attempts`` enqueues in all), or answer it 503 at once."""
        with self._lock:
            held = [h for h in self._jobs.values() if h.entry]
        if not held:
            log.warning("redis data lost (%s): no job of this process was waiting", reason)
            return
        client = self._probe_client
        with client.pipeline(transaction=False) as pipe:
            for h in held:
                pipe.xrange(self.keys.stream, h.entry, h.entry)
                pipe.get(self.keys.state(h.job.id))
            found = pipe.execute()
        requeued = failed = 0
        for h, entries, state in zip(held, found[::2], found[1::2], strict=True):
            if entries or state in (b"done", b"withdrawn"):
                continue  # still queued, or answered (its reply is on its way)
            if h.enqueued < self.settings.max_attempts and self._enqueue_again(h):
                requeued += 1
                continue
            with self._lock:
                gone = self._jobs.pop(h.job.id, None)
            if gone is not None:
                failed += 1
                gone.job.fail(ServiceUnavailable(
                    "the job queue lost this job (Redis lost its data); retry", code="queue_lost",
                    headers={"retry-after": str(self.settings.retry_after_s)}))
        self.requeued += requeued
        self.lost += failed
        log.warning("redis data lost (%s): jobs re-enqueued=%d failed=%d (max_attempts=%d)", reason,
                    requeued, failed, self.settings.max_attempts)

    def _enqueue_again(self, held: _Held) -> bool:
        payload = wire.encode_job(held.job, self.reply_key)
        try:
            entry = self._requeue(keys=[self.keys.stream], args=[GROUP, self.settings.max_jobs, payload])
        except RedisError as exc:
            log.warning("re-enqueue failed job=%s: %s", held.job.id, type(exc).__name__)
            return False
        if entry is None:
            return False  # the queue is full
        with self._lock:
            if held.job.id not in self._jobs:
                return True  # answered meanwhile
            held.entry, held.enqueued = entry, held.enqueued + 1
        return True
