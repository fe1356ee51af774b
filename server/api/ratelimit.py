"""Per-key rate limits over sliding one-minute windows: in memory, or in Redis shared by every API process.

A request asks for several quotas at once (one request; ``n`` images) and is admitted only when all of
them fit, in which case all are charged; a refused request charges nothing. The window slides: a charge
counts until a minute after it was made, so there is no burst of twice the limit at a window's edge.

Redis keeps one sorted set per key and quota, of charges scored by the Redis server's own clock (API
processes on several hosts need not agree on the time); one Lua script checks and charges atomically.

A charge is for admitted work: a request refused after it was charged (its prompt flagged, a bad image URL,
the queue full or unreachable) gets it back with ``refund``. The methods are coroutines: the Redis limiter
talks to Redis from the event loop (``redis.asyncio``), each call bounded by ``queue.redis_timeout_s``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

WINDOW_S = 60.0


@dataclass(frozen=True)
class Ask:
    """One quota a request needs: ``cost`` units of ``kind`` (requests, images) under ``limit`` a window."""

    kind: str
    limit: int
    cost: int


@dataclass(frozen=True)
class Quota:
    kind: str
    limit: int
    remaining: int
    # Seconds until the oldest charge in the window expires (the count next goes down); 0: nothing counted.
    reset_s: float


@dataclass(frozen=True)
class Decision:
    allowed: bool
    quotas: list[Quota]
    # When refused: seconds until every quota would fit; math.inf when a cost exceeds its limit outright.
    retry_after_s: float = 0.0
    # When allowed: the charge's id, for ``Limiter.refund``.
    charge: str = ""


class Limiter(Protocol):
    async def acquire(self, key_id: str, asks: list[Ask]) -> Decision:
        """Charge every ask, or none: all of them fit the window, or the decision says when they would."""

    async def refund(self, key_id: str, asks: list[Ask], charge: str) -> None:
        """Take back the charge ``charge`` (``Decision.charge``) of ``asks``: the request was not admitted."""

    async def aclose(self) -> None: ...


def _wait_for(charges: list[tuple[float, int, str]], used: int, ask: Ask, now: float, window: float) -> float:
    """Seconds until enough of ``charges`` (oldest first) expire for ``ask`` to fit."""
    need = used + ask.cost - ask.limit
    if need <= 0:
        return 0.0
    if ask.cost > ask.limit:
        return math.inf
    freed = 0
    for at, cost, _charge in charges:
        freed += cost
        if freed >= need:
            return max(0.0, at + window - now)
    return math.inf  # not reached: the charges sum to ``used``


class MemoryLimiter:
    """One process's limits (``darkroom serve`` on the in-process queue)."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._charges: dict[tuple[str, str], deque[tuple[float, int, str]]] = {}

    async def acquire(self, key_id: str, asks: list[Ask]) -> Decision:
        return self._acquire(key_id, asks)

    def _acquire(self, key_id: str, asks: list[Ask]) -> Decision:
        now = time.monotonic()
        charge = uuid.uuid4().hex
        with self._lock:
            states = []
            for ask in asks:
                charges = self._charges.setdefault((key_id, ask.kind), deque())
                while charges and charges[0][0] <= now - self.window_s:
                    charges.popleft()
                used = sum(cost for _, cost, _ in charges)
                states.append((charges, used, _wait_for(list(charges), used, ask, now, self.window_s)))
            allowed = all(wait == 0.0 for _, _, wait in states)
            quotas = []
            for ask, (charges, used, _) in zip(asks, states, strict=True):
                if allowed:
                    charges.append((now, ask.cost, charge))
                    used += ask.cost
                reset = charges[0][0] + self.window_s - now if charges else 0.0
                quotas.append(Quota(ask.kind, ask.limit, max(0, ask.limit - used), max(0.0, reset)))
            retry = 0.0 if allowed else max(wait for _, _, wait in states)
            self._forget(now)
            return Decision(allowed, quotas, retry, charge if allowed else "")

    async def refund(self, key_id: str, asks: list[Ask], charge: str) -> None:
        with self._lock:
            for ask in asks:
                charges = self._charges.get((key_id, ask.kind))
                if charges:
                    kept = [c for c in charges if c[2] != charge]
                    charges.clear()
                    charges.extend(kept)

    def _forget(self, now: float) -> None:
        """Drop keys with nothing in their window, so idle keys cost no memory."""
        if len(self._charges) < 1024:
            return
        for name in [k for k, q in self._charges.items() if not q or q[-1][0] <= now - self.window_s]:
            del self._charges[name]

    async def aclose(self) -> None:
        pass


# KEYS: one sorted set per quota. ARGV: window (ms), a unique charge id, then limit and cost per key.
# Members are "<id>:<cost>" scored by the Redis clock in ms. Returns {allowed, {used, wait_ms, reset_ms}...}
# with used counted after the charge when allowed; wait_ms -1: the cost exceeds the limit outright.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local allowed = 1
local out = {}
local lists = {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[1 + 2 * i])
  local cost = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  lists[i] = entries
  local used = 0
  for j = 1, #entries, 2 do
    used = used + tonumber(string.match(entries[j], ':(%d+)$'))
  end
  local wait = 0
  local need = used + cost - limit
  if need > 0 then
    allowed = 0
    if cost > limit then
      wait = -1
    else
      local freed = 0
      for j = 1, #entries, 2 do
        freed = freed + tonumber(string.match(entries[j], ':(%d+)$'))
        if freed >= need then
          wait = math.max(0, tonumber(entries[j + 1]) + window - now)
          break
        end
      end
    end
  end
  out[i] = {used, wait, 0}
end
for i, key in ipairs(KEYS) do
  local cost = tonumber(ARGV[2 + 2 * i])
  local entries = lists[i]
  if allowed == 1 then
    redis.call('ZADD', key, now, ARGV[2] .. ':' .. cost)
    redis.call('PEXPIRE', key, window)
    out[i][1] = out[i][1] + cost
    if #entries == 0 then
      out[i][3] = window
    end
  end
  if #entries > 0 then
    out[i][3] = math.max(0, tonumber(entries[2]) + window - now)
  end
end
return {allowed, out}
"""


class RedisLimiter:
    """Limits shared by every API process using the same Redis and key prefix (``redis.asyncio``: use it
    from one event loop). A call that takes longer than ``timeout_s`` raises ``TimeoutError``."""

    def __init__(self, url: str, prefix: str, window_s: float = WINDOW_S, timeout_s: float = 2.0,
                 max_connections: int = 64) -> None:
        from ..queue.redis_keys import connect_async

        self.client = connect_async(url, timeout_s, max_connections)
        self.timeout_s = timeout_s
        self.prefix = f"{prefix}:ratelimit"
        self.window_ms = int(window_s * 1000)
        self._script = self.client.register_script(_ACQUIRE)

    def _keys(self, key_id: str, asks: list[Ask]) -> list[str]:
        return [f"{self.prefix}:{{{key_id}}}:{ask.kind}" for ask in asks]

    async def acquire(self, key_id: str, asks: list[Ask]) -> Decision:
        charge = uuid.uuid4().hex
        args: list[Any] = [self.window_ms, charge]
        for ask in asks:
            args += [ask.limit, ask.cost]
        allowed, rows = await asyncio.wait_for(self._script(keys=self._keys(key_id, asks), args=args),
                                               self.timeout_s)
        quotas, waits = [], []
        for ask, (used, wait_ms, reset_ms) in zip(asks, rows, strict=True):
            quotas.append(Quota(ask.kind, ask.limit, max(0, ask.limit - int(used)), int(reset_ms) / 1000))
            waits.append(math.inf if int(wait_ms) < 0 else int(wait_ms) / 1000)
        return Decision(bool(allowed), quotas, 0.0 if allowed else max(waits), charge if allowed else "")

    async def refund(self, key_id: str, asks: list[Ask], charge: str) -> None:
        async def remove() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, ask in zip(self._keys(key_id, asks), asks, strict=True):
                    pipe.zrem(key, f"{charge}:{ask.cost}")
                await pipe.execute()

        await asyncio.wait_for(remove(), self.timeout_s)

    async def aclose(self) -> None:
        await self.client.aclose(close_connection_pool=True)
