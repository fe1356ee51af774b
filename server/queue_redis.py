"""The Redis queue: API pods put jobs on a Stream, worker pods read them in a consumer group.

This module holds the shared key layout and the API side (``RedisQueue``); the worker side
(``RedisSource``) is in server/queue_redis_worker.py.

Keys, all under ``queue.key_prefix`` (P):

- ``P:jobs``: the Stream. One entry per job, field ``job`` (see server/remote.py); consumer group
  ``workers``. An entry is acknowledged *and deleted* once its job is answered, so the stream holds only
  jobs not yet answered, and ``XLEN - XPENDING`` is the number waiting for a worker: the queue depth every
  API pod checks, atomically with its ``XADD``, before admitting a job (else 429).
- ``P:job:<id>:state``: ``withdrawn`` (set by the API, only if nothing else is there: the client left or
  the deadline passed before a worker took it), ``running`` (set by the worker that starts it, only if not
  withdrawn), ``done``. That one key decides, atomically, whether a job runs or is withdrawn.
- ``P:job:<id>:attempts``: how many times a worker started it; past ``queue.max_attempts`` it fails (500).
- ``P:replies:<api instance>``: a list per API process; workers push each job's result (or error) onto
  the list named in the job, and one listener thread in that API process completes the job's future.
  A list survives a momentary disconnect of the listener, which pub/sub would not.
- ``P:workers``: a sorted set of worker consumer names by last heartbeat (reported on /ready).

Fault tolerance: a worker heartbeats the entries it holds (``XCLAIM ... JUSTID`` resets their idle time).
When a worker dies, its entries go idle; after ``queue.visibility_timeout_s`` another worker takes them
over with ``XAUTOCLAIM`` and runs them again (their attempt count says how often). A result is pushed
before the entry is acknowledged, so a crash in between means a second run whose reply the API ignores:
a job is answered once, never lost. Deadlines are absolute unix times inside the job; a worker never
starts a job past its deadline (pods' clocks must be in sync, as NTP keeps them).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from . import remote
from .config import QueueSettings
from .errors import DeadlineExceeded, InternalError, QueueFull, ServiceUnavailable
from .jobs import Job, JobResult

log = logging.getLogger(__name__)

GROUP = "workers"
# Batch windows shorter than this are polled (see _take_batch), longer ones block in Redis.
_SHORTEST_BLOCK_S = 0.2
_POLL_S = 0.001
# Reply lists of API processes that went away expire after this long.
REPLY_TTL_S = 600

# Admission and enqueue in one step, so API pods cannot overfill the queue between check and add.
_ENQUEUE = """
local waiting = redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[1])[1]
if waiting >= tonumber(ARGV[2]) then return false end
return redis.call('XADD', KEYS[1], '*', 'job', ARGV[3])
"""

# A worker's claim to start a job: refused when withdrawn or already answered; counts the attempt.
_START = """
local state = redis.call('GET', KEYS[1])
if state == 'withdrawn' then return -1 end
if state == 'done' then return -3 end
local n = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
if n > tonumber(ARGV[2]) then return -2 end
redis.call('SET', KEYS[1], 'running', 'EX', ARGV[1])
return n
"""


def connect(url: str, retries: int = 4) -> redis.Redis:
    """A client that reconnects by itself (a Redis restart costs the calls in flight, not the process)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=10,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}:jobs"
        self.workers = f"{prefix}:workers"

    def state(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:state"

    def attempts(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:attempts"

    def replies(self, instance: str) -> str:
        return f"{self.prefix}:replies:{instance}"


def ensure_group(client: redis.Redis, keys: Keys) -> None:
    """The stream and its consumer group (again, after a Redis restart without persistence)."""
    try:
        client.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _no_group(exc: ResponseError) -> bool:
    return "NOGROUP" in str(exc) or "no such key" in str(exc).lower()


def default_instance_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerLost(InternalError):
    code = "worker_lost"


class _Outage:
    """Logs a Redis outage once when it starts and once when it ends, not on every retry."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None
        self.last: float = 0.0

    def failed(self, exc: BaseException) -> None:
        self.last = time.monotonic()
        if self.since is None:
            self.since = self.last
            log.warning("redis unreachable (%s): %s: %s", self.what, type(exc).__name__, exc)

    def recent(self, window_s: float = 1.0, grace_s: float = 2.0) -> bool:
        """An outage of more than ``grace_s`` that failed again within ``window_s``: callers fail fast
        meanwhile instead of each waiting on connection attempts (a Redis restart is shorter)."""
        now = time.monotonic()
        return self.since is not None and now - self.since > grace_s and now - self.last < window_s

    def ok(self) -> None:
        if self.since is not None:
            log.info("redis reachable again (%s) after %.1fs", self.what, time.monotonic() - self.since)
            self.since = None


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
        self._enqueue = self.client.register_script(_ENQUEUE)
        self._jobs: dict[str, tuple[Job, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self._outage = _Outage("api")

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

    # the JobQueue protocol (server/jobs.py)

    def put(self, job: Job) -> None:
        if self._outage.recent():
            raise self._unavailable()
        payload = remote.encode_job(job, self.reply_key)
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
                if attempt or not _no_group(exc):
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
            job_id, outcome = remote.decode_reply(payload)
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

