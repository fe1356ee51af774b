"""The API's bounded executors ("lanes") for blocking work a request may bring: downloads, image decodes, the
prompt classifier; and the budget of request-body bytes held at once (``ByteBudget``).

Each kind of blocking work gets threads of its own, so no number of slow downloads can hold the threads that
authentication, storage or a request that downloads nothing need (Starlette's shared pool). A lane runs at
most ``workers`` calls at once; a request waits at most ``wait_s`` (on the event loop, holding no thread) for
a free one, and one API key may hold at most ``per_key`` of them; past either, the lane's busy error (a 429
with ``retry-after``) answers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from ..config import Settings
from ..errors import DarkroomError, ServerBusy
from ..fetch import FetchBusy

P = ParamSpec("P")
T = TypeVar("T")


class ClassifierBusy(DarkroomError):
    status = 429
    type = "rate_limit_error"
    code = "classifier_busy"


class Lane:
    """``await lane.run(fn, *args, key=...)``: ``fn(*args)`` on one of the lane's own threads."""

    def __init__(self, name: str, workers: int, wait_s: float, busy: Callable[[str], DarkroomError],
                 per_key: int | None = None) -> None:
        self.name = name
        self.workers = max(1, workers)
        self.wait_s = wait_s
        self.per_key = per_key
        self._busy = busy
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"lane-{name}")
        self._free: asyncio.Semaphore | None = None  # made on the event loop that first uses the lane
        self._held: Counter[str] = Counter()
        self.refused = 0

    async def _acquire(self, key: str | None) -> None:
        if self._free is None:
            self._free = asyncio.Semaphore(self.workers)
        if key is not None and self.per_key is not None and self._held[key] >= self.per_key:
            self.refused += 1
            raise self._busy(f"this API key already has {self.per_key} {self.name} in progress")
        if key is not None:
            self._held[key] += 1
        try:
            await asyncio.wait_for(self._free.acquire(), self.wait_s)
        except asyncio.TimeoutError:
            self._release_key(key)
            self.refused += 1
            raise self._busy(f"all {self.workers} {self.name} slots are busy") from None
        except BaseException:
            self._release_key(key)
            raise

    def _release(self, key: str | None) -> None:
        assert self._free is not None
        self._free.release()
        self._release_key(key)

    def _release_key(self, key: str | None) -> None:
        if key is not None and key in self._held:
            self._held[key] -= 1
            if self._held[key] <= 0:
                del self._held[key]

    @contextlib.asynccontextmanager
    async def slot(self, key: str | None = None) -> AsyncIterator[None]:
        """Hold one of the lane's slots (and one of ``key``'s) for the block; the busy error when none
        frees within ``wait_s``."""
        await self._acquire(key)
        try:
            yield
        finally:
            self._release(key)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on a lane thread, once a slot is free (see ``slot``); the API key to
        count against is the keyword ``lane_key`` (not passed on). The slot is held until ``fn`` returns,
        even if the caller stops waiting, so the lane never holds more calls than threads."""
        key = kwargs.pop("lane_key", None)
        key = key if isinstance(key, str) else None
        await self._acquire(key)
        loop = asyncio.get_running_loop()
        try:
            call = self._executor.submit(functools.partial(fn, *args, **kwargs))
        except BaseException:
            self._release(key)
            raise

        def finished(_call: object) -> None:  # on the lane's thread (or here, if it never ran)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing left to release for
                loop.call_soon_threadsafe(self._release, key)

        call.add_done_callback(finished)
        return await asyncio.wrap_future(call)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class ByteBudget:
    """At most ``capacity`` bytes held at once across requests (e.g. request bodies): ``async with
    budget.hold(n)`` waits up to ``wait_s`` (on the event loop) until ``n`` more bytes fit, else raises
    ``busy()``. A hold larger than ``capacity`` counts as ``capacity`` (it runs alone), so no single request
    is refused for its size here (its own limit does that)."""

    def __init__(self, name: str, capacity: int, wait_s: float, busy: Callable[[str], DarkroomError]) -> None:
        self.name = name
        self.capacity = max(1, capacity)
        self.wait_s = wait_s
        self.held = 0
        self.refused = 0
        self._busy = busy
        self._changed: asyncio.Condition | None = None  # made on the event loop that first uses it

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        size = min(max(0, size), self.capacity)
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        def fits() -> bool:
            return self.held + size <= self.capacity

        async with changed:
            # The common case fits at once: no timed wait (asyncio.wait_for makes a task per call).
            if not fits():
                try:
                    await asyncio.wait_for(changed.wait_for(fits), self.wait_s)
                except asyncio.TimeoutError:
                    self.refused += 1
                    raise self._busy(f"{self.held} of {self.capacity} bytes of {self.name} are in use"
                                     ) from None
            self.held += size
        try:
            yield
        finally:
            async with changed:
                self.held -= size
                changed.notify_all()


def _bodies_busy(what: str) -> DarkroomError:
    return ServerBusy(f"the server holds too many request bodies ({what}); retry shortly",
                      headers={"retry-after": "1"})


def _fetch_busy(what: str) -> DarkroomError:
    return FetchBusy(f"too many downloads in progress ({what}); retry shortly",
                     headers={"retry-after": "1"})


def _decode_busy(what: str) -> DarkroomError:
    return FetchBusy(f"too many images being decoded ({what}); retry shortly", headers={"retry-after": "1"})


def _classifier_busy(what: str) -> DarkroomError:
    return ClassifierBusy(f"the prompt classifier is busy ({what}); retry shortly",
                          headers={"retry-after": "1"})


class Lanes:
    """The API process's lanes, from its settings."""

    def __init__(self, settings: Settings) -> None:
        wait = settings.server.slot_wait_s
        fetch = settings.fetch
        # Image downloads and LoRA prefetches (I/O-bound: mostly waiting on origins).
        self.downloads = Lane("downloads", fetch.max_concurrent, wait, _fetch_busy, fetch.max_per_key)
        # data: URLs, which download nothing but decode (CPU- and memory-bound).
        self.decodes = Lane("decodes", fetch.max_concurrent_decodes, wait, _decode_busy)
        # The optional prompt classifier (one model, used by one thread at a time).
        self.classifier = Lane("classifier", 1, wait, _classifier_busy)
        # Request bodies (JSON, edit uploads) held at once, from before they are read until answered.
        self.bodies = ByteBudget("request bodies", settings.server.max_inflight_body_bytes, wait,
                                 _bodies_busy)

    def close(self) -> None:
        for lane in (self.downloads, self.decodes, self.classifier):
            lane.close()
