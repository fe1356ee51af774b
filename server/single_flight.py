"""One computation per key at a time: concurrent callers for the same key share the first caller's outcome.

Both processes use it: the guarded fetcher (server/fetch.py) downloads a URL once for every request naming
it at the same moment, and the LoRA store (server/loras.py) fetches a LoRA file once for all that need it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Thread-safe. ``run`` either does the work for a key or waits for the caller already doing it."""

    def __init__(self, lock: threading.Lock | None = None) -> None:
        # A caller may pass its own lock, so that ``cached`` runs under the lock that guards its cache.
        self._lock = lock or threading.Lock()
        self._inflight: dict[K, Future[V]] = {}

    def run(self, key: K, work: Callable[[], V], wait_s: float,
            cached: Callable[[], V | None] = lambda: None) -> V:
        """``cached()`` if it is not None, else the outcome of ``work()``: this caller's, or that of the
        caller already running it for ``key``. A waiter gets the owner's exception itself, or
        ``concurrent.futures.TimeoutError`` after ``wait_s`` seconds.

        ``cached`` is called under the lock, so a result the work stores before returning is seen by every
        later caller (the work leaves the in-flight table only after it has returned).
        """
        with self._lock:
            hit = cached()
            if hit is not None:
                return hit
            waiting = self._inflight.get(key)
            if waiting is None:
                mine: Future[V] = Future()
                self._inflight[key] = mine
        if waiting is not None:
            return waiting.result(timeout=wait_s)
        try:
            value = work()
            mine.set_result(value)
            return value
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
