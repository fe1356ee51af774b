"""The Redis queue: API pods put jobs on a Stream, worker pods read them in a consumer group.

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

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
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


# -- the worker side ----------------------------------------------------------------------------------


@dataclass(eq=False)
class RemoteJob(Job):
    """A job read from the stream; answering it pushes the reply and acknowledges the entry."""

    entry_id: bytes = b""
    payload: bytes = b""
    reply_to: str = ""
    source: RedisSource | None = field(default=None, repr=False)

    def try_start(self) -> bool:
        if not super().try_start():
            return False
        assert self.source is not None
        outcome = self.source.claim_start(self)
        if outcome > 0:
            return True
        if outcome == -2:
            self.fail(WorkerLost(
                f"the job was started {self.source.settings.max_attempts} time(s) and its worker stopped "
                "each time; it is not retried again"))
        elif outcome in (-1, -3):  # withdrawn by the API, or answered already by an earlier run
            self.source.finish(self, None)
        # 0: Redis unreachable; left pending, another take-over runs it later.
        return False

    def succeed(self, result: JobResult) -> None:
        assert self.source is not None
        self.source.finish(self, remote.encode_reply(self.id, result=result))
        super().succeed(result)

    def fail(self, error: BaseException) -> None:
        assert self.source is not None
        self.source.finish(self, remote.encode_reply(self.id, error=error))
        super().fail(error)


class RedisSource:
    """Where a worker takes its batches from: ``take_batch`` as the in-process queue offers it."""

    def __init__(self, settings: QueueSettings, consumer: str) -> None:
        self.settings = settings
        self.consumer = consumer
        self.keys = Keys(settings.key_prefix)
        self.client = connect(settings.redis_url)
        self._start = self.client.register_script(_START)
        # Entries read (delivered to us) but not yet in a batch, oldest first.
        self._backlog: deque[RemoteJob] = deque()
        # Entry ids we hold (backlog and running), heart-beaten so no one takes them over.
        self._held: dict[bytes, RemoteJob] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_tidy = 0.0
        self._group_ok = False
        self._recovered_own = False
        self._outage = _Outage(f"worker {consumer}")
        self.reclaimed = 0
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat-{consumer}", daemon=True)
        self._heartbeat.start()

    # the take_batch protocol (server/worker.py)

    def take_batch(self, max_images: int, window_s: float, timeout_s: float = 0.5) -> list[Job]:
        try:
            return self._take_batch(max_images, window_s, timeout_s)
        except RedisError as exc:
            if isinstance(exc, ResponseError) and _no_group(exc):
                log.warning("the job stream or its group is gone (Redis restarted empty?); recreating it")
                self._group_ok = False
                return []
            self._outage.failed(exc)
            self._stop.wait(0.5)
            return []
        except Exception:  # noqa: BLE001 - the worker loop must go on
            log.exception("taking a batch failed consumer=%s", self.consumer)
            self._stop.wait(0.5)
            return []

    def _take_batch(self, max_images: int, window_s: float, timeout_s: float) -> list[Job]:
        if not self._group_ok:
            ensure_group(self.client, self.keys)
            self._group_ok = True
        if not self._recovered_own:
            # Entries an earlier process of the same name held when it died: ours to run again now.
            self._absorb(self._read("0", 1000, None), reclaimed=True)
            self._recovered_own = True
        self._maybe_reclaim()
        if not self._backlog:
            self._absorb(self._read(">", max_images, timeout_s))
        self._outage.ok()
        if not self._backlog:
            return []
        first = self._backlog.popleft()
        batch: list[Job] = [first]
        images, key = first.params.n, first.params.batch_key()
        until = time.monotonic() + window_s
        while True:
            for job in list(self._backlog):
                if images >= max_images:
                    break
                if job.params.batch_key() == key and images + job.params.n <= max_images:
                    self._backlog.remove(job)
                    batch.append(job)
                    images += job.params.n
            remaining = until - time.monotonic()
            if images >= max_images or remaining <= 0 or self._stop.is_set():
                break
            if remaining >= _SHORTEST_BLOCK_S:
                self._absorb(self._read(">", max_images - images, remaining))
            elif not self._absorb(self._read(">", max_images - images, None)):
                # Redis times a blocked read out on its own clock tick (up to 1/hz = 100 ms late), so a
                # window of a few milliseconds is polled instead.
                time.sleep(min(remaining, _POLL_S))
        return batch

    def _read(self, start: str, count: int, block_s: float | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        block = None if block_s is None else max(1, int(block_s * 1000))
        reply = self.client.xreadgroup(GROUP, self.consumer, {self.keys.stream: start}, count=count,
                                       block=block)
        return [entry for _stream, entries in (reply or []) for entry in entries]

    def _absorb(self, entries: list[tuple[bytes, Any]], reclaimed: bool = False) -> int:
        """Turn stream entries into jobs in the backlog; entries that are not jobs are dropped."""
        added = 0
        for entry_id, fields in entries:
            payload = (fields or {}).get(b"job")
            if payload is None:  # deleted (withdrawn) after it was delivered
                self._ack([entry_id])
                continue
            try:
                envelope = remote.decode_job(payload)
            except Exception as exc:  # noqa: BLE001
                log.error("dropping an undecodable job entry=%s: %s", entry_id, exc)
                self._answer_undecodable(payload, exc)
                self._ack([entry_id])
                continue
            now_mono, now_unix = time.monotonic(), time.time()
            job = RemoteJob(
                params=envelope.params,
                deadline=now_mono + (envelope.deadline_unix - now_unix),
                id=envelope.id,
                enqueued_at=now_mono - (now_unix - envelope.enqueued_unix),
                created_unix=envelope.created_unix,
                request_id=envelope.request_id,
                entry_id=entry_id,
                payload=payload,
                reply_to=envelope.reply_to,
                source=self,
            )
            with self._lock:
                if entry_id in self._held:
                    continue
                self._held[entry_id] = job
            self._backlog.append(job)
            added += 1
        if reclaimed and added:
            self.reclaimed += added
            log.warning("reclaimed %d job(s) from a stopped worker consumer=%s", added, self.consumer)
        return added

    def _maybe_reclaim(self) -> None:
        now = time.monotonic()
        if now < self._next_claim:
            return
        self._next_claim = now + max(0.2, self.settings.visibility_timeout_s / 4)
        idle_ms = int(self.settings.visibility_timeout_s * 1000)
        cursor, entries, *_deleted = self.client.xautoclaim(
            self.keys.stream, GROUP, self.consumer, idle_ms, start_id=self._claim_cursor, count=32)
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        self._absorb(entries, reclaimed=True)
        if now >= self._next_tidy:
            self._next_tidy = now + 60
            self._tidy()

    def _tidy(self) -> None:
        """Forget consumers of long-gone workers (nothing pending) and their heartbeats."""
        horizon_ms = max(600.0, 10 * self.settings.visibility_timeout_s) * 1000
        for info in self.client.xinfo_consumers(self.keys.stream, GROUP):
            name = info["name"]
            name = name.decode() if isinstance(name, bytes) else name
            if name != self.consumer and int(info["pending"]) == 0 and int(info["idle"]) > horizon_ms:
                self.client.xgroup_delconsumer(self.keys.stream, GROUP, name)
        self.client.zremrangebyscore(self.keys.workers, "-inf", time.time() - horizon_ms / 1000)

    # called by RemoteJob

    def _job_ttl(self, job: Job) -> int:
        return int(max(60.0, job.deadline - time.monotonic()) + self.settings.max_run_s + 60)

    def claim_start(self, job: RemoteJob) -> int:
        try:
            return int(self._start(keys=[self.keys.state(job.id), self.keys.attempts(job.id)],
                                   args=[self._job_ttl(job), self.settings.max_attempts]))
        except RedisError as exc:
            self._outage.failed(exc)
            with self._lock:
                self._held.pop(job.entry_id, None)  # no more heartbeats: it is taken over later
            return 0

    def finish(self, job: RemoteJob, reply: str | None) -> None:
        """Answer (when ``reply``), then acknowledge and delete the entry: in that order, never lost."""
        try:
            with self.client.pipeline(transaction=True) as pipe:
                if reply is not None:
                    pipe.rpush(job.reply_to, reply)
                    pipe.expire(job.reply_to, REPLY_TTL_S)
                    pipe.set(self.keys.state(job.id), "done", ex=self._job_ttl(job))
                pipe.xack(self.keys.stream, GROUP, job.entry_id)
                pipe.xdel(self.keys.stream, job.entry_id)
                pipe.execute()
        except RedisError as exc:
            self._outage.failed(exc)
            log.error("could not answer job id=%s (it is taken over later): %s", job.id, exc)
        finally:
            with self._lock:
                self._held.pop(job.entry_id, None)

    def _ack(self, entry_ids: list[bytes]) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.stream, GROUP, *entry_ids)
            pipe.xdel(self.keys.stream, *entry_ids)
            pipe.execute()

    def _answer_undecodable(self, payload: bytes, exc: Exception) -> None:
        try:
            data = json.loads(payload)
            reply_to, job_id = data["reply_to"], data["id"]
        except Exception:  # noqa: BLE001 - nobody to answer
            return
        error = InternalError(f"a worker could not read this job: {exc}", code="bad_job_payload")
        self.client.rpush(reply_to, remote.encode_reply(job_id, error=error))

    # heartbeat and shutdown

    def _beat(self) -> None:
        interval = max(0.1, self.settings.visibility_timeout_s / 3)
        while not self._stop.wait(interval):
            with self._lock:
                held = list(self._held)
            try:
                if held:
                    self.client.xclaim(self.keys.stream, GROUP, self.consumer, 0, held, justid=True)
                self.client.zadd(self.keys.workers, {self.consumer: time.time()})
            except RedisError:
                continue  # take_batch reports the outage

    def close(self) -> None:
        """Stop heart-beating and put the jobs read but not started back at the end of the stream."""
        self._stop.set()
        self._heartbeat.join(5)
        backlog, self._backlog = list(self._backlog), deque()
        if backlog:
            try:
                with self.client.pipeline(transaction=True) as pipe:
                    for job in backlog:
                        pipe.xadd(self.keys.stream, {"job": job.payload})
                        pipe.xack(self.keys.stream, GROUP, job.entry_id)
                        pipe.xdel(self.keys.stream, job.entry_id)
                    pipe.execute()
                log.info("returned %d unstarted job(s) to the queue consumer=%s", len(backlog), self.consumer)
            except RedisError as exc:
                log.warning("could not return %d job(s); they are taken over after the visibility timeout: "
                            "%s",
                            len(backlog), exc)
        try:
            self.client.zrem(self.keys.workers, self.consumer)
        except RedisError:
            pass

    def healthy(self) -> bool:
        try:
            return bool(self.client.ping())
        except RedisError:
            return False
