"""The worker side of the Redis queue (``RedisSource``, a ``BatchSource``): reading batches from the consumer
group, reclaiming a dead worker's jobs, and answering them (the key layout and protocol are described in
server/queue/redis_keys.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError, ResponseError

from ..config import QueueSettings
from ..errors import InternalError
from ..jobs import Job, JobResult
from . import wire
from .batching import fill_batch
from .redis_keys import (
    GROUP,
    POLL_S,
    REPLY_TTL_S,
    SHORTEST_BLOCK_S,
    START_SCRIPT,
    Keys,
    Outage,
    WorkerLost,
    connect,
    ensure_group,
    no_group,
)

log = logging.getLogger(__name__)


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
        self.source.finish(self, wire.encode_reply(self.id, result=result))
        super().succeed(result)

    def fail(self, error: BaseException) -> None:
        assert self.source is not None
        self.source.finish(self, wire.encode_reply(self.id, error=error))
        super().fail(error)


class RedisSource:
    """Where a worker takes its batches from: ``take_batch`` as the in-process queue offers it."""

    def __init__(self, settings: QueueSettings, consumer: str) -> None:
        self.settings = settings
        self.consumer = consumer
        self.keys = Keys(settings.key_prefix)
        self.client = connect(settings.redis_url)
        self._start = self.client.register_script(START_SCRIPT)
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
        self._outage = Outage(f"worker {consumer}")
        self.reclaimed = 0
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat-{consumer}", daemon=True)
        self._heartbeat.start()

    # the BatchSource protocol (server/queue/protocol.py)

    def take_batch(self, max_images: int, window_s: float, timeout_s: float = 0.5,
                   max_pixels: int | None = None) -> list[Job]:
        try:
            return self._take_batch(max_images, window_s, timeout_s, max_pixels)
        except RedisError as exc:
            if isinstance(exc, ResponseError) and no_group(exc):
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

    def _take_batch(self, max_images: int, window_s: float, timeout_s: float,
                    max_pixels: int | None) -> list[Job]:
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

        def more(room: int, remaining: float) -> None:
            if remaining >= SHORTEST_BLOCK_S:
                self._absorb(self._read(">", room, remaining))
            elif not self._absorb(self._read(">", room, None)):
                # Redis times a blocked read out on its own clock tick (up to 1/hz = 100 ms late), so a
                # window of a few milliseconds is polled instead.
                time.sleep(min(remaining, POLL_S))

        return fill_batch(first, self._backlog, max_images, window_s, more, self._stop.is_set, max_pixels)

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
                envelope = wire.decode_job(payload)
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
        self.client.rpush(reply_to, wire.encode_reply(job_id, error=error))

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
