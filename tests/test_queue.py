"""The queue and the scheduler, seen from outside: batching, the batch cap, admission (503),
deadlines (504) and clients that leave while their job waits.

Every test drives the app served on a loopback port (in-process, uvicorn as ``darkroom serve`` runs it:
clients that leave close real connections), configured for the behaviour under test.
Which job ran is read from the worker's log: it writes one ``job done id=...`` line per finished job,
and that id is the response's ``id``.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from .conftest import MODEL, images_of, pixels
from .support import launch
from .support.inprocess import InProcessServer

# Batched images equal their unbatched twins up to float noise; measured: at most 1 level of 255.
MAX_BATCH_PIXEL_DIFF = 2

# A request that keeps the single CPU worker busy for seconds (about 3 s with one torch thread on
# these CPUs; longer under load): used to hold the worker while other requests wait in the queue.
SLOW = {"prompt": "slow blocker", "width": 512, "height": 512, "n": 4, "steps": 32,
        "response_format": "base64"}
# One torch thread per server: with two threads on a loaded 2-core machine, OpenMP's spin-waiting
# multiplies CPU time many times over, and these modules run several servers side by side.
ONE_THREAD = {"engine": {"cpu_threads": 1}}
SMALL = {"width": 128, "height": 128, "steps": 2, "guidance_scale": 3.5, "response_format": "base64"}

JOB_DONE = re.compile(r"job done id=(\S+)")


def done_ids(server: InProcessServer) -> list[str]:
    """Ids of the jobs the worker finished, in order, from the server log."""
    return JOB_DONE.findall(server.log())


wait_until = functools.partial(launch.wait_until, timeout_s=120.0)


def queue_depth(server: InProcessServer) -> int:
    response = httpx.get(f"{server.url}/ready", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["queue_depth"]


def post(server: InProcessServer, body: dict[str, Any], timeout: float | httpx.Timeout = 300) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/images/generations", json={"model": MODEL, **body}, timeout=timeout)


def concurrently(server: InProcessServer, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """Send every body at once (threads released together by a barrier); responses in body order."""
    barrier = threading.Barrier(len(bodies))

    def send(body: dict[str, Any]) -> httpx.Response:
        barrier.wait()
        return post(server, body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


class Background:
    """A request running in a thread, so the test can act while the server works on it."""

    def __init__(self, server: InProcessServer, body: dict[str, Any]) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(server, body), daemon=True)
        self._thread.start()

    def _run(self, server: InProcessServer, body: dict[str, Any]) -> None:
        try:
            self.response = post(server, body)
        except BaseException as exc:  # noqa: BLE001 - surfaced by result()
            self.error = exc

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout_s: float = 300) -> httpx.Response:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "background request did not finish"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


def occupy_worker(server: InProcessServer) -> Background:
    """Start the slow request and wait until the worker has taken it off the queue."""
    blocker = Background(server, SLOW)
    time.sleep(0.3)  # let the request reach the server; the worker takes it at once
    wait_until(lambda: queue_depth(server) == 0, "the worker to take the slow job")
    return blocker


def assert_error(response: httpx.Response, status: int, type_: str, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == type_ and error["code"] == code
    assert error["param"] is None or isinstance(error["param"], str)
    return error


# --- batching -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batching_server(make_app: Any) -> InProcessServer:
    # A fixed window (not the adaptive one): concurrent requests meet in it however they arrive.
    return make_app({**ONE_THREAD, "scheduler": {"batch_window_ms": 600, "max_batch_images": 8,
                                                 "adaptive_window": False}}, listen=True)


@pytest.fixture(scope="module")
def capped_server(make_app: Any) -> InProcessServer:
    return make_app({**ONE_THREAD, "scheduler": {"batch_window_ms": 600, "max_batch_images": 2,
                                                 "adaptive_window": False}}, listen=True)


def test_compatible_requests_share_one_batch_and_match_their_unbatched_twins(
    batching_server: InProcessServer,
) -> None:
    bodies = [
        {**SMALL, "prompt": f"a harbour at dawn, take {i}", "seed": 1000 + 17 * i, "output_format": "png"}
        for i in range(4)
    ]
    batched = concurrently(batching_server, bodies)
    batch_ids = set()
    for response in batched:
        assert response.status_code == 200, response.text
        payload = response.json()
        assert payload["batch"]["jobs"] == 4 and payload["batch"]["images"] == 4
        assert set(payload["timings"]) == {"queue_s", "inference_s", "encode_s"}
        batch_ids.add(payload["batch"]["id"])
    assert len(batch_ids) == 1

    worst = 0
    for body, response in zip(bodies, batched, strict=True):
        alone = post(batching_server, body)
        assert alone.json()["batch"]["jobs"] == 1
        assert alone.json()["batch"]["id"] not in batch_ids
        (together,), (single,) = images_of(response), images_of(alone)
        assert together.format == single.format == "PNG"
        assert together.size == single.size == (128, 128)
        assert response.json()["data"][0]["seed"] == alone.json()["data"][0]["seed"] == body["seed"]
        worst = max(worst, int(np.abs(pixels(together) - pixels(single)).max()))
    print(f"batched vs alone: max abs pixel difference {worst}")
    assert worst <= MAX_BATCH_PIXEL_DIFF

    # Different prompts and seeds really gave different images (the batch is not one image 4 times).
    first, second = (pixels(images_of(r)[0]) for r in batched[:2])
    assert np.abs(first - second).mean() > 1


def test_incompatible_requests_land_in_different_batches(batching_server: InProcessServer) -> None:
    bodies = [
        {**SMALL, "prompt": "base", "seed": 1},
        {**SMALL, "prompt": "other steps", "seed": 2, "steps": 1},
        {**SMALL, "prompt": "other size", "seed": 3, "width": 64},
        {**SMALL, "prompt": "other guidance", "seed": 4, "guidance_scale": 5.0},
    ]
    responses = concurrently(batching_server, bodies)
    batches = [r.json()["batch"] for r in responses if r.status_code == 200]
    assert len(batches) == 4, [r.text for r in responses]
    assert len({b["id"] for b in batches}) == 4
    assert all(b["jobs"] == 1 and b["images"] == 1 for b in batches)
    assert images_of(responses[2])[0].size == (64, 128)


def test_a_job_with_n_3_contributes_3_images_to_its_batch(batching_server: InProcessServer) -> None:
    bodies = [{**SMALL, "prompt": "three of them", "seed": 50, "n": 3}, {**SMALL, "prompt": "one", "seed": 9}]
    responses = concurrently(batching_server, bodies)
    triple, single = (r.json() for r in responses)
    assert triple["batch"]["id"] == single["batch"]["id"]
    assert triple["batch"] == single["batch"] == {"id": triple["batch"]["id"], "jobs": 2, "images": 4}
    assert [item["seed"] for item in triple["data"]] == [50, 51, 52]
    assert len(images_of(responses[0])) == 3 and len(images_of(responses[1])) == 1


def test_batches_never_exceed_max_batch_images(capped_server: InProcessServer) -> None:
    bodies = [{**SMALL, "prompt": f"capped {i}", "seed": i} for i in range(4)]
    responses = concurrently(capped_server, bodies)
    by_batch: dict[str, list[dict[str, Any]]] = {}
    for response in responses:
        assert len(images_of(response)) == 1
        batch = response.json()["batch"]
        assert batch["images"] <= 2 and batch["jobs"] <= 2
        by_batch.setdefault(batch["id"], []).append(batch)
    assert len(by_batch) >= 2
    for members in by_batch.values():
        # Every job of a batch reports the same batch, and its size is the number of jobs in it.
        assert all(m == members[0] for m in members)
        assert members[0]["jobs"] == len(members)


# --- admission, deadlines, disconnects -------------------------------------------------------------


@pytest.fixture(scope="module")
def small_queue_server(make_app: Any) -> InProcessServer:
    return make_app({**ONE_THREAD, "queue": {"max_jobs": 1, "retry_after_s": 3}}, listen=True)


@pytest.fixture(scope="module")
def deadline_server(make_app: Any) -> InProcessServer:
    return make_app({**ONE_THREAD, "server": {"request_timeout_s": 0.5}, "queue": {"max_jobs": 64}},
                    listen=True)


def test_flood_gets_503_with_retry_after_and_the_rest_succeed(small_queue_server: InProcessServer) -> None:
    server = small_queue_server
    before = set(done_ids(server))
    # Compatible requests, heavy enough that the rest arrive while the first batch runs.
    bodies = [{"prompt": f"flood {i}", "width": 256, "height": 256, "steps": 8, "n": 2, "seed": 10 * i,
               "response_format": "base64"} for i in range(20)]
    responses = concurrently(server, bodies)

    refused = [r for r in responses if r.status_code == 503]
    accepted = [r for r in responses if r.status_code != 503]
    assert refused and accepted
    for response in refused:
        assert_error(response, 503, "service_unavailable", "queue_full")
        assert response.headers["retry-after"] == "3"
    for response in accepted:
        images = images_of(response)
        assert len(images) == 2
        assert all(image.format == "JPEG" and image.size == (256, 256) for image in images)

    # Exactly the accepted jobs ran; a refused one never entered the queue.
    accepted_ids = {r.json()["id"] for r in accepted}
    wait_until(lambda: accepted_ids <= set(done_ids(server)), "the accepted jobs' log lines")
    assert set(done_ids(server)) - before == accepted_ids

    after = post(server, {**SMALL, "prompt": "after the flood"})
    assert len(images_of(after)) == 1
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert queue_depth(server) == 0


def test_ready_reports_queue_depth(small_queue_server: InProcessServer) -> None:
    server = small_queue_server
    assert queue_depth(server) == 0
    blocker = occupy_worker(server)
    waiting = Background(server, {**SMALL, "prompt": "waits its turn"})
    wait_until(lambda: queue_depth(server) == 1, "queue_depth 1 while a job waits")
    # The queue (max_jobs 1) is full now.
    assert_error(post(server, {**SMALL, "prompt": "no room"}), 503, "service_unavailable", "queue_full")
    assert blocker.result().status_code == 200
    assert len(images_of(waiting.result())) == 1
    assert queue_depth(server) == 0


def test_client_disconnect_frees_its_queue_slot_and_its_job_never_runs(small_queue_server: InProcessServer) -> None:
    server = small_queue_server
    before = set(done_ids(server))
    blocker = occupy_worker(server)

    # B waits in the (one-slot) queue; its client gives up and closes the connection.
    with pytest.raises(httpx.ReadTimeout):
        post(server, {**SMALL, "prompt": "impatient", "seed": 5},
             timeout=httpx.Timeout(30, read=0.3))
    # The server notices the disconnect (it polls every 0.25 s) and withdraws B while A still runs.
    wait_until(lambda: queue_depth(server) == 0, "the abandoned job to leave the queue")
    assert blocker.running(), "the slow job ended before the abandoned one left the queue"

    patient = post(server, {**SMALL, "prompt": "patient", "seed": 6})
    assert patient.status_code == 200, patient.text
    assert len(images_of(patient)) == 1
    first = blocker.result()
    assert len(images_of(first)) == 4

    ran = {first.json()["id"], patient.json()["id"]}
    wait_until(lambda: ran <= set(done_ids(server)), "the finished jobs' log lines")
    assert set(done_ids(server)) - before == ran  # B never ran


def test_job_not_started_before_its_deadline_gets_504_and_never_runs(deadline_server: InProcessServer) -> None:
    server = deadline_server
    before = set(done_ids(server))
    blocker = occupy_worker(server)

    late = post(server, {**SMALL, "prompt": "too late", "seed": 8})
    first = blocker.result()
    assert late.status_code == 504, (
        f"expected 504, got {late.status_code} (the slow job ran "
        f"{first.json()['timings']['inference_s']} s; the deadline is 0.5 s)"
    )
    assert_error(late, 504, "timeout_error", "deadline_exceeded")
    assert queue_depth(server) == 0

    assert len(images_of(first)) == 4
    # A later request, once the worker is free, is served; any trace of the 504'd job would come first.
    followup = post(server, {**SMALL, "prompt": "in time", "seed": 8})
    assert len(images_of(followup)) == 1

    ok_ids = [first.json()["id"], followup.json()["id"]]
    wait_until(lambda: set(ok_ids) <= set(done_ids(server)), "the finished jobs' log lines")
    new = [i for i in done_ids(server) if i not in before]
    assert new == ok_ids  # one "job done" line per 200 response, none for the 504
