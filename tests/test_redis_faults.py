"""Redis faults seen from an API process (issue 11's first async bullet, issue 12 item 9).

- A Redis that accepts connections and never answers: ``darkroom api`` processes keep answering ``/health``
  while requests wait on it, and a request gets 503 with ``retry-after`` within ``queue.redis_timeout_s``
  (from the queue, or from the rate limiter when the key has limits), instead of the event loop stalling.
- A real redis-server restarted empty under jobs an API process waits for: it enqueues them again (at most
  ``queue.max_attempts`` times), then answers them 503 at once; both logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.config import QueueSettings
from server.errors import ServiceUnavailable
from server.jobs import Job
from server.params import GenerationParams

from .conftest import MODEL
from .support.launch import REDIS_SERVER, RedisProcess, SilentRedis
from .test_scaleout import Proc

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

BODY = {"model": MODEL, "prompt": "a fox", "width": 64, "height": 64, "steps": 1}


@pytest.fixture(scope="module")
def silent_redis() -> Iterator[SilentRedis]:
    fake = SilentRedis()
    yield fake
    fake.close()


def api_on(redis_url: str, workdir: Path, **sections: dict[str, Any]) -> Proc:
    config: dict[str, Any] = {
        "server": {"default_response_format": "base64"},
        "queue": {"backend": "redis", "redis_url": redis_url, "redis_timeout_s": 2},
        "storage": {"directory": str(workdir / "images")},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return Proc("api", workdir, config, {})


def wait_alive(proc: Proc, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(f"api exited:\n{proc.log()}")
        try:
            if httpx.get(f"{proc.url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"api never answered /health:\n{proc.log()}")


@pytest.mark.parametrize("limited", [False, True], ids=["queue", "rate-limiter"])
def test_a_hung_redis_costs_a_request_redis_timeout_s_not_the_event_loop(
    silent_redis: SilentRedis, tmp_path: Path, limited: bool,
) -> None:
    auth = {"auth": {"default_requests_per_minute": 100}} if limited else {}
    api = api_on(silent_redis.url, tmp_path, **auth)
    try:
        wait_alive(api)  # start-up does not wait for Redis
        with ThreadPoolExecutor(4) as pool:
            posts = [pool.submit(httpx.post, f"{api.url}/v1/images/generations", json=BODY, timeout=20)
                     for _ in range(3)]
            time.sleep(0.3)  # the requests are waiting on Redis now
            health = httpx.get(f"{api.url}/health", timeout=5)
            assert health.status_code == 200
            # /health answered while every request was still waiting on Redis (before: the loop was blocked
            # by the first Redis call, ~40 s, and every client here timed out).
            assert not any(f.done() for f in posts)
            responses = [f.result() for f in posts]
        for response in responses:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            expected = "ratelimit_unavailable" if limited else "queue_unavailable"
            assert response.json()["error"]["code"] == expected
        ready = httpx.get(f"{api.url}/ready", timeout=10)
        assert ready.status_code == 503 and "redis" in ready.json()["workers"]["queue"]
    finally:
        api.stop()


def test_jobs_lost_with_redis_are_enqueued_again_then_answered_503(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    from server.queue.redis_api import RedisQueue
    from server.queue.redis_keys import Keys

    redis_proc = RedisProcess(tmp_path).start()
    settings = QueueSettings(backend="redis", redis_url=redis_proc.url, key_prefix="dr-loss", max_attempts=2)
    keys = Keys(settings.key_prefix)
    queue = RedisQueue(settings)
    params = GenerationParams(model=MODEL, prompt="lost", width=64, height=64, steps=1, guidance_scale=3.5,
                              seeds=(1,))
    jobs = [Job.create(params, 120) for _ in range(3)]

    def queued_ids() -> set[str]:
        import json

        try:
            entries = redis_proc.client().xrange(keys.stream)
        except Exception:  # noqa: BLE001 - restarting
            return set()
        return {json.loads(fields[b"job"])["id"] for _, fields in entries}

    async def until(predicate: Any, what: str, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        queue.start()
        await until(lambda: queue.status()[0], "the prober to reach Redis")
        for job in jobs:
            await queue.admit(job)
        assert queued_ids() == {j.id for j in jobs}
        # No worker runs; Redis comes back empty. Before: the jobs were gone and each client waited for
        # its deadline (request_timeout_s) to get a 504, with nothing logged.
        redis_proc.stop()
        redis_proc.start()
        await until(lambda: queued_ids() == {j.id for j in jobs}, "the jobs to be enqueued again")
        assert not any(j.future.done() for j in jobs)
        # Lost once more: each was enqueued max_attempts (2) times, so each is answered 503 at once.
        redis_proc.stop()
        redis_proc.start()
        await until(lambda: all(j.future.done() for j in jobs), "the jobs to be answered")
        for job in jobs:
            error = job.future.exception()
            assert isinstance(error, ServiceUnavailable) and error.code == "queue_lost"
            assert error.headers["retry-after"] == "1"
        await queue.aclose()

    caplog.set_level(logging.WARNING, logger="server.queue.redis_api")
    try:
        asyncio.run(scenario())
    finally:
        queue.close()
        redis_proc.stop()
    lost = [r.getMessage() for r in caplog.records if "redis data lost" in r.getMessage()]
    assert any("re-enqueued=3 failed=0" in m for m in lost), lost
    assert any("re-enqueued=0 failed=3" in m for m in lost), lost
