"""The LoRA prefetch stage beside the device loop: a batch whose LoRA files are not on this machine yet is set
aside and downloaded in a small pool, and the device runs other batches meanwhile.

Normally the API has fetched a request's LoRAs before queueing it (``loras.prefetch``); this stage covers a
worker pod that lacks the file, a shared cache that evicted it, and ``loras.prefetch: false``. Without it the
download ran inside the pipeline call and held every job behind it for up to ``loras.download_timeout_s``.

A batch holds one LoRA set (it is in the batch key), so a download that fails fails that batch's jobs, which
all named the LoRA; they are answered without being started. Jobs withdrawn while waiting are skipped later
by the device loop, as in the queue.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from .. import metrics
from ..errors import DarkroomError, InternalError, ServiceUnavailable
from ..jobs import Job, JobState
from ..params import GenerationParams

log = logging.getLogger(__name__)


class LoraFiles(Protocol):
    def loras_ready(self, params: GenerationParams) -> bool:
        """Whether every LoRA file ``params`` names is on this machine (no network: a file check)."""

    def fetch_loras(self, params: GenerationParams) -> None:
        """Download the LoRA files ``params`` names (blocking; raises a 400 for a bad file or URL)."""


class LoraPrefetch:
    """Batches waiting for their LoRA files. The device thread calls ``needs``, ``submit`` and ``take``."""

    def __init__(self, files: LoraFiles, name: str, threads: int = 2) -> None:
        self._files = files
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix=f"{name}-prefetch")
        self._ready: deque[list[Job]] = deque()
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False

    @property
    def pending(self) -> int:
        """Batches downloading now."""
        with self._lock:
            return self._pending

    def needs(self, batch: list[Job]) -> bool:
        params = batch[0].params
        if not params.loras:
            return False
        try:
            return not self._files.loras_ready(params)
        except Exception:  # noqa: BLE001 - a bad path: the download stage answers it with its error
            return True

    def submit(self, batch: list[Job]) -> None:
        with self._lock:
            self._pending += 1
        self._pool.submit(self._fetch, batch)

    def take(self) -> list[Job] | None:
        """A batch whose files arrived, oldest first; None when there is none."""
        with self._lock:
            return self._ready.popleft() if self._ready else None

    def close(self) -> None:
        """Stop; batches still downloading or waiting are answered 503 (the worker stops)."""
        with self._lock:
            self._closed = True
            left = list(self._ready)
            self._ready.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for batch in left:
            _answer(batch, ServiceUnavailable("the worker stopped before this job started; retry",
                                              headers={"retry-after": "1"}))

    def _fetch(self, batch: list[Job]) -> None:
        try:
            self._files.fetch_loras(batch[0].params)
        except DarkroomError as exc:
            _answer(batch, exc)
        except Exception:  # noqa: BLE001 - an internal failure, not the user's file
            log.exception("LoRA prefetch failed")
            _answer(batch, InternalError("fetching the request's LoRAs failed; see the server log"))
        else:
            with self._lock:
                if not self._closed:
                    self._ready.append(batch)
                    return
            _answer(batch, ServiceUnavailable("the worker stopped before this job started; retry",
                                              headers={"retry-after": "1"}))
        finally:
            with self._lock:
                self._pending -= 1


def _answer(batch: list[Job], error: DarkroomError) -> None:
    for job in batch:
        if job.state is JobState.QUEUED and not job.future.done():
            job.fail(error)
            metrics.observe_job(job.params.model, "failed")
