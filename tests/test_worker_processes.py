"""Issue 18 (3): on several devices `darkroom serve` runs one worker process per device, fed by its in-process
queue (server/worker/children.py). Tested on CPU with ``engine.devices: [cpu, cpu]``: the app in this process,
two real worker processes with stand-in engines (and, once, with the tiny model).

Both processes serve; a SIGKILLed one is restarted and its jobs re-run and answered; ``/ready`` shows each
state; a job whose worker process dies each time fails after ``queue.max_attempts``; a sticky device error in
a child restarts that process.
"""

from __future__ import annotations

import functools
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from server.worker.children import DeviceProcess

from .conftest import images_of
from .support.inprocess import InProcessServer
from .support.launch import wait_until
from .support.standin import stand_in_engine
from .support.tiny_loras import lora_file_bytes, tiny_flux_lora

pytestmark = pytest.mark.heavy

WAIT_S = 90.0
TWO = {"engine": {"devices": ["cpu", "cpu"]}, "server": {"default_response_format": "base64"},
       "worker": {"restart_backoff_s": 0.2}}


wait_for = functools.partial(wait_until, timeout_s=WAIT_S)


def workers(app: InProcessServer) -> list[DeviceProcess]:
    handles = list(app.runtime.workers)
    assert all(isinstance(w, DeviceProcess) for w in handles), handles
    return handles  # type: ignore[return-value]


@pytest.fixture(scope="module")
def two(make_app: Any, tmp_path_factory: pytest.TempPathFactory) -> InProcessServer:
    # Each call holds its "device" 0.5 s, so a test can catch a worker with a job in hand.
    style = tmp_path_factory.mktemp("loras") / "style.safetensors"
    style.write_bytes(lora_file_bytes(tiny_flux_lora(7)))
    return make_app({**TWO, "loras": {"registered": {"style": str(style)}}}, engine="stand-in",
                    stand_in=functools.partial(stand_in_engine, delay_s=0.5))


def body(size: int, seed: int = 1) -> dict[str, Any]:
    return {"prompt": f"size {size}", "width": size, "height": size, "steps": 1, "seed": seed,
            "output_format": "png"}


def test_two_devices_run_two_worker_processes_that_both_serve(two: InProcessServer) -> None:
    a, b = workers(two)
    assert (a.name, b.name) == ("worker-cpu", "worker-cpu-2")
    assert a.pid != b.pid and os.getpid() not in (a.pid, b.pid)
    ready = two.client.get("/ready").json()
    assert ready["ready"] and ready["workers"] == {"worker-cpu": "ready", "worker-cpu-2": "ready"}
    # Incompatible sizes: four batches, two at a time on the two processes.
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda size: two.generate(**body(size)), (64, 80, 96, 112)))
    assert [images_of(r)[0].size for r in responses] == [(64, 64), (80, 80), (96, 96), (112, 112)]
    wait_for(lambda: a.calls >= 1 and b.calls >= 1, "both processes to report calls")


def test_batch_metrics_from_a_worker_process_count_its_loras(two: InProcessServer) -> None:
    """A worker process's batches reach the API's /metrics with their LoRA count (it was always 0 there,
    while an in-process worker counted them)."""
    plain = two.generate(**body(64, seed=3))
    assert plain.status_code == 200, plain.text
    before_none, before_one = two.batches_with_loras("0.0"), two.batches_with_loras("1.0")
    response = two.generate(**body(64, seed=4), image_loras=[{"path": "style", "scale": 0.8}])
    assert response.status_code == 200, response.text
    assert (two.batches_with_loras("0.0"), two.batches_with_loras("1.0")) == (before_none, before_one + 1)


def test_a_killed_worker_process_is_restarted_and_its_jobs_rerun(two: InProcessServer) -> None:
    a, b = workers(two)
    restarts, old_pid = a.restarts, a.pid
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(two.generate, **body(size, seed)) for size, seed in ((128, 11), (144, 12))]
        wait_for(lambda: a.in_flight > 0, "worker-cpu to hold a job")
        os.kill(old_pid, signal.SIGKILL)
        state = wait_for(lambda: two.client.get("/ready").json()["workers"]["worker-cpu"] != "ready"
                         and two.client.get("/ready").json(), "/ready to show the restart")
        assert state["ready"] is False and state["workers"]["worker-cpu"].startswith(("not ready", "loading"))
        responses = [f.result(timeout=WAIT_S) for f in futures]
    assert [images_of(r)[0].size for r in responses] == [(128, 128), (144, 144)]
    wait_for(lambda: two.client.get("/ready").status_code == 200, "both workers ready again")
    assert a.restarts == restarts + 1 and a.pid != old_pid
    assert two.client.get("/ready").json()["workers"] == {"worker-cpu": "ready", "worker-cpu-2": "ready"}


def test_a_job_that_kills_its_worker_process_each_time_fails_after_max_attempts(make_app: Any) -> None:
    sticky = RuntimeError("CUDA error: an illegal memory access was encountered")
    app: InProcessServer = make_app(TWO, engine="stand-in", stand_in=functools.partial(
        stand_in_engine, poison="kill the device", poison_error=sticky))
    response = app.generate(**{**body(64), "prompt": "kill the device"})
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "worker_lost" and "started 2 time(s)" in error["message"]
    # Each death restarted its process; both come back, and serve.
    wait_for(lambda: app.client.get("/ready").status_code == 200, "both workers ready again")
    assert sum(w.restarts for w in workers(app)) == 2
    assert images_of(app.generate(**body(64)))[0].size == (64, 64)


def test_worker_processes_load_and_run_the_tiny_model(make_app: Any) -> None:
    """The children build the real engine (server/worker/child.py) from the settings alone."""
    app: InProcessServer = make_app({**TWO, "engine": {"devices": ["cpu", "cpu"], "cpu_threads": 1}})
    a, b = workers(app)
    assert app.client.get("/ready").json()["workers"] == {"worker-cpu": "ready", "worker-cpu-2": "ready"}
    wait_for(lambda: a.calls >= 1 and b.calls >= 1, "the warm-up calls of both")
    before = a.calls + b.calls
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda size: app.generate(**body(size)), (64, 80)))
    assert [images_of(r)[0].size for r in responses] == [(64, 64), (80, 80)]
    wait_for(lambda: a.calls + b.calls == before + 2, "two more pipeline calls")


def test_a_worker_process_past_the_run_deadline_is_answered_504_and_restarted(make_app: Any) -> None:
    """Issue 11 with worker processes: the child's watchdog answers the hung call 504; the parent kills the
    process (only a new one frees the device) and starts another."""
    app: InProcessServer = make_app(
        {**TWO, "engine": {"devices": ["cpu"]}, "worker": {"processes": "always", "restart_backoff_s": 0.2},
         "queue": {"max_run_s": 1.0}},
        engine="stand-in", stand_in=functools.partial(stand_in_engine, hang_on="hang"))
    [worker] = workers(app)
    first_pid = worker.pid
    hung = app.generate(**{**body(64), "prompt": "hang"})
    assert hung.status_code == 504 and hung.json()["error"]["code"] == "run_timeout", hung.text
    wait_for(lambda: worker.restarts == 1 and app.client.get("/ready").status_code == 200, "a new process")
    assert worker.pid != first_pid
    assert images_of(app.generate(**body(64)))[0].size == (64, 64)
