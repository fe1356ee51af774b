"""The Redis queue's shared layout: API pods put jobs on a Stream, worker pods read them in a consumer group.

This module holds what both sides use: the key layout, the Lua scripts, the client and outage logging. The
API side (``RedisQueue``) is server/queue/redis_api.py; the worker side (``RedisSource``) is
server/queue/redis_worker.py.

Keys, all under ``queue.key_prefix`` (P):

- ``P:jobs``: the Stream. One entry per job, field ``job`` (see server/queue/wire.py); consumer group
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
import time

import redis
import redis.asyncio as redis_async
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..errors import InternalError

log = logging.getLogger(__name__)

GROUP = "workers"
# Batch windows shorter than this are polled (server/queue/redis_worker.py), longer ones block in Redis.
SHORTEST_BLOCK_S = 0.2
POLL_S = 0.001
# Reply lists of API processes that went away expire after this long.
REPLY_TTL_S = 600

# Admission and enqueue in one step, so API pods cannot overfill the queue between check and add.
ENQUEUE_SCRIPT = """
local waiting = redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[1])[1]
if waiting >= tonumber(ARGV[2]) then return false end
return redis.call('XADD', KEYS[1], '*', 'job', ARGV[3])
"""

# A worker's claim to start a job: refused when withdrawn or already answered; counts the attempt.
START_SCRIPT = """
local state = redis.call('GET', KEYS[1])
if state == 'withdrawn' then return -1 end
if state == 'done' then return -3 end
local n = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
if n > tonumber(ARGV[2]) then return -2 end
redis.call('SET', KEYS[1], 'running', 'EX', ARGV[1])
return n
"""


def connect(url: str, retries: int = 4, timeout_s: float = 10.0) -> redis.Redis:
    """A client that reconnects by itself (a Redis restart costs the calls in flight, not the process);
    ``timeout_s``: the longest wait for one reply (longer than any blocking command's own timeout)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=min(2.0, timeout_s),
        socket_timeout=timeout_s,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


def connect_async(url: str, timeout_s: float, max_connections: int) -> redis_async.Redis:
    """The asyncio client of an API process's request path: every connect and reply within ``timeout_s``,
    one retry on a fresh connection (a pooled one may have died with a Redis restart; callers bound the
    whole call by ``timeout_s`` too), at most ``max_connections`` (a call waits for a free one)."""
    pool = redis_async.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_keepalive=True,
        health_check_interval=15,
        retry=AsyncRetry(NoBackoff(), 1),
    )
    return redis_async.Redis(connection_pool=pool)


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


def no_group(exc: ResponseError) -> bool:
    return "NOGROUP" in str(exc) or "no such key" in str(exc).lower()


def default_instance_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerLost(InternalError):
    code = "worker_lost"


class Outage:
    """Logs a Redis outage once when it starts and once when it ends, not on every retry."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None
        self.last: float = 0.0
        self.reason = ""

    def failed(self, exc: BaseException) -> None:
        self.last = time.monotonic()
        self.reason = type(exc).__name__
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
