"""Scale-out with real parts: `darkroom api` and `darkroom worker` processes over a real redis-server, and
an S3-compatible server (moto's) for URL responses.

One cluster per module (Redis, two API processes, two workers); the fault tests then stop, kill and
replace workers and restart Redis, in file order. Every process is a real subprocess on loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from server.errors import QueueFull
from server.jobs import GeneratedImage, Job, JobResult
from server.params import ConditioningImage, GenerationParams, LoraRef
from server.queue import wire
from server.queue.redis_keys import GROUP, Keys

from .conftest import MODEL, REPO, decode_image, free_port
from .support.launch import REDIS_SERVER, RedisProcess, stop

pytestmark = [pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"), pytest.mark.heavy]

PREFIX = "dr-test"
BUCKET = "darkroom-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# -- the job codec ------------------------------------------------------------------------------------


def every_field_set() -> GenerationParams:
    """GenerationParams with every field away from its default, so a round trip proves each one travels."""
    image = ConditioningImage(2, 1, bytes(range(6)))
    reference = ConditioningImage(1, 1, b"\x00\xff\x10")
    params = GenerationParams(
        model=MODEL, prompt="a lighthouse, ünïcode ✓", width=64, height=96, steps=3, guidance_scale=2.75,
        seeds=(7, 8), output_format="png", output_width=56, output_height=88, output_quality=70,
        negative_prompt="blur", true_cfg_scale=1.5,
        max_sequence_length=256, check_safety=False, conditioning="img2img+redux", image=image,
        references=(reference, image), strength=0.6,
        loras=(LoraRef("https://example.com/style.safetensors", 0.8), LoraRef("registered-name")),
    )
    defaults = GenerationParams(model=MODEL, prompt="", width=0, height=0, steps=0, guidance_scale=0.0,
                                seeds=())
    same = [f.name for f in dataclasses.fields(GenerationParams)
            if f.name not in ("model",) and getattr(params, f.name) == getattr(defaults, f.name)]
    assert not same, f"set these fields in every_field_set() so the round trip covers them: {same}"
    return params


def test_job_round_trip_carries_every_field() -> None:
    params = every_field_set()
    job = Job.create(params, timeout_s=30)
    job.request_id = "req-123"
    before = time.time()
    envelope = wire.decode_job(wire.encode_job(job, "reply-list"))
    assert envelope.request_id == "req-123"
    assert envelope.params == params
    assert envelope.params.batch_key() == params.batch_key()
    assert isinstance(envelope.params.seeds, tuple) and isinstance(envelope.params.references, tuple)
    assert envelope.params.image is not None and envelope.params.image.to_pil().size == (2, 1)
    assert envelope.id == job.id and envelope.reply_to == "reply-list"
    assert before + 29 < envelope.deadline_unix < time.time() + 31  # absolute unix time, not monotonic

    result = JobResult(images=[GeneratedImage(b"\xff\xd8jpeg", 7, "jpeg")], batch_id="b", batch_jobs=2,
                       batch_images=3, queue_s=0.25, inference_s=1.5, encode_s=0.01,
                       stages={"denoise": 1.25, "image_encode": 0.01})
    job_id, decoded = wire.decode_reply(wire.encode_reply("img-1", result=result))
    assert (job_id, decoded) == ("img-1", result)

    error = QueueFull("full", headers={"retry-after": "3"})
    _, failed = wire.decode_reply(wire.encode_reply("img-2", error=error))
    assert isinstance(failed, wire.RemoteError)
    assert (failed.status, failed.type, failed.code) == (503, "service_unavailable", "queue_full")
    assert failed.headers == {"retry-after": "3"}
    assert failed.body() == error.body()


def test_payload_cannot_name_arbitrary_types() -> None:
    with pytest.raises(ValueError, match="unknown type"):
        wire.decode_value({"__dc__": "Popen", "fields": {}})
    with pytest.raises(TypeError):
        wire.encode_value(object())


# -- real processes -----------------------------------------------------------------------------------


class Proc:
    """A `darkroom api` or `darkroom worker` subprocess with its own config file and log."""

    def __init__(self, kind: str, workdir: Path, config: dict[str, Any], env: dict[str, str]) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / "config.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.log_file = workdir / f"{kind}.log"
        args = ["--port", str(self.port)] if kind == "api" else ["--health-port", str(self.port)]
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server", kind, "--config", str(self.config_file), *args],
                cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 90) -> Proc:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited early:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout_s, f"{self.kind} to be ready:\n{self.log()}", 0.2)
        return self

    def ready_info(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/ready", timeout=5).json()

    def consumer(self) -> str:
        return self.ready_info()["workers"]["worker-cpu"]["consumer"]

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout_s: float = 60) -> int:
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        stop(self.proc)

    def generate(self, **body: Any) -> httpx.Response:
        body.setdefault("model", MODEL)
        return httpx.post(f"{self.url}/v1/images/generations", json=body, timeout=120)


class Cluster:
    def __init__(self, workdir: Path, cache: Path, redis_proc: RedisProcess, s3_url: str) -> None:
        self.workdir = workdir
        self.cache = cache
        self.redis = redis_proc
        self.s3_url = s3_url
        self.procs: list[Proc] = []
        self.keys = Keys(PREFIX)

    def config(self, **sections: dict[str, Any]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "server": {"default_response_format": "base64", "request_timeout_s": 60},
            "queue": {"backend": "redis", "redis_url": self.redis.url, "key_prefix": PREFIX,
                      "visibility_timeout_s": 2, "max_attempts": 2, "max_jobs": 64, "retry_after_s": 1},
            "scheduler": {"batch_window_ms": 10, "max_batch_images": 8},
            "engine": {"cache_dir": str(self.cache), "cpu_threads": 1},
            "storage": {"backend": "s3", "directory": str(self.workdir / "images"), "url_ttl_s": 600,
                        "s3": {"bucket": BUCKET, "endpoint_url": self.s3_url, "region": "us-east-1",
                               "addressing_style": "path", "lifecycle_rule": True}},
        }
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        return config

    def spawn(self, kind: str, **sections: dict[str, Any]) -> Proc:
        proc = Proc(kind, self.workdir / f"{kind}-{len(self.procs)}", self.config(**sections), S3_ENV)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.kind} {p.port}\n{p.log()[-3000:]}" for p in self.procs)

    def pending(self, consumer: str) -> list[dict[str, Any]]:
        return self.redis.client().xpending_range(self.keys.stream, GROUP, "-", "+", 100, consumer)


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path, s3_url: str) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("scaleout")
    redis_proc = RedisProcess(workdir).start()
    c = Cluster(workdir, tiny_cache, redis_proc, s3_url)
    procs = [c.spawn("api"), c.spawn("api"), c.spawn("worker"), c.spawn("worker")]
    try:
        for proc in procs:
            proc.wait_ready()
        c.apis, c.workers = procs[:2], procs[2:]
        yield c
    finally:
        for proc in c.procs:  # all at once: each finishes its own graceful shutdown
            if proc.proc.poll() is None:
                proc.proc.terminate()
        for proc in c.procs:
            proc.stop()
        redis_proc.stop()


def valid_images(response: httpx.Response, size: int, seeds: list[int] | None = None) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    images = [decode_image(item["b64_json"]) for item in data]
    assert all(image.size == (size, size) for image in images)
    if seeds is not None:
        assert [item["seed"] for item in data] == seeds
    return images


# -- load: two API pods, two workers ------------------------------------------------------------------


def test_two_apis_two_workers_under_load(cluster: Cluster) -> None:
    count = 200

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, httpx.Response]:
        api = cluster.apis[i % 2]
        body = {"model": MODEL, "prompt": f"load {i}", "width": 64, "height": 64, "steps": 1, "seed": i}
        rejected = 0
        for _ in range(60):
            response = await client.post(f"{api.url}/v1/images/generations", json=body)
            if response.status_code != 503 or response.json()["error"]["code"] != "queue_full":
                return rejected, response
            # A deliberate refusal: the shared queue is full. Its shape is the one every SDK parses.
            assert response.json()["error"]["code"] == "queue_full"
            rejected += 1
            await asyncio.sleep(float(response.headers["retry-after"]))
        raise AssertionError("still 503 queue_full after 60 tries")

    async def run() -> list[tuple[int, httpx.Response]]:
        # A fresh connection per request: a pooled one the server closes as idle (keep-alive timeout)
        # just as the client reuses it fails on the client side, which is not what this test is about.
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(count)))

    results = asyncio.run(run())
    statuses = sorted({r.status_code for _, r in results})
    assert statuses == [200], f"{statuses}\n" + "\n".join(r.text for _, r in results if r.status_code != 200)
    ids = set()
    for i, (_, response) in enumerate(results):
        valid_images(response, 64, [i])
        ids.add(response.json()["id"])
    assert len(ids) == count
    # Both worker processes ran batches: the stream was shared, not pinned to one.
    for worker in cluster.workers:
        assert worker.ready_info()["workers"]["worker-cpu"]["pipeline_calls"] > 1


# -- S3 storage ---------------------------------------------------------------------------------------


def test_url_response_is_a_presigned_s3_url(cluster: Cluster, s3_url: str) -> None:
    import boto3

    response = cluster.apis[0].generate(prompt="s3", width=64, height=64, steps=1, seed=3,
                                        response_format="url")
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.startswith(f"{s3_url}/{BUCKET}/images/") and "X-Amz-Signature=" in url
    assert "X-Amz-Expires=600" in url
    fetched = httpx.get(url, timeout=10)  # no credentials: the signature is the credential
    assert fetched.status_code == 200
    image = Image.open(io.BytesIO(fetched.content))
    image.load()
    assert image.format == "JPEG" and image.size == (64, 64)

    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    key = url.split(f"/{BUCKET}/", 1)[1].split("?", 1)[0]
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == fetched.content
    rules = s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]
    assert [(r["ID"], r["Expiration"]["Days"]) for r in rules] == [("darkroom-image-expiry", 1)]


# -- worker faults ------------------------------------------------------------------------------------


def slow_bodies(count: int, tag: str) -> list[dict[str, Any]]:
    """Jobs big enough that a batch takes a while on the tiny model (4 jobs of 2 images per batch)."""
    return [{"prompt": f"{tag} {i}", "width": 256, "height": 256, "steps": 4, "n": 2, "seed": 100 * i}
            for i in range(count)]


def job_ids_held(cluster: Cluster, consumer: str) -> list[str]:
    client = cluster.redis.client()
    ids = []
    for entry in cluster.pending(consumer):
        found = client.xrange(cluster.keys.stream, entry["message_id"], entry["message_id"])
        if found:
            ids.append(json.loads(found[0][1][b"job"])["id"])
    return ids


def running_held(cluster: Cluster, consumer: str) -> tuple[list[str], list[str]] | None:
    """(jobs the worker holds, those of them it has started), once it is inside a batch; else None."""
    client = cluster.redis.client()
    held = job_ids_held(cluster, consumer)
    running = [job_id for job_id in held if client.get(cluster.keys.state(job_id)) == b"running"]
    return (held, running) if running else None


def test_worker_killed_mid_batch_loses_nothing(cluster: Cluster) -> None:
    # One worker leaves gracefully (idle), so the other takes every job.
    leaving = cluster.workers[1]
    leaving.signal(signal.SIGTERM)
    assert leaving.wait_exit() == 0, leaving.log()
    victim = cluster.workers[0]
    consumer = victim.consumer()

    bodies = slow_bodies(8, "kill")
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(cluster.apis[i % 2].generate, **b) for i, b in enumerate(bodies)]
        held, running = wait_for(lambda: running_held(cluster, consumer), 60, "the worker to run a batch")
        victim.signal(signal.SIGKILL)
        victim.wait_exit()
        replacement = cluster.spawn("worker")
        cluster.workers = [replacement]
        responses = [f.result() for f in futures]

    ids = []
    for body, response in zip(bodies, responses, strict=True):
        # Every job answered once, with exactly its own images: none lost, none doubled.
        valid_images(response, 256, [body["seed"], body["seed"] + 1])
        ids.append(response.json()["id"])
    assert len(set(ids)) == len(bodies)
    assert set(held) <= set(ids)
    client = cluster.redis.client()
    # The batch the killed worker was running was started a second time, by the replacement; jobs it had
    # read but not started yet ran once.
    attempts = {job_id: int(client.get(cluster.keys.attempts(job_id)) or 0) for job_id in held}
    assert running and all(attempts[job_id] == 2 for job_id in running), (running, attempts)
    assert set(attempts.values()) <= {1, 2}, attempts
    replacement.wait_ready()
    assert replacement.ready_info()["workers"]["worker-cpu"]["reclaimed"] >= len(held)
    assert client.xlen(cluster.keys.stream) == 0


def test_worker_sigterm_finishes_its_batch(cluster: Cluster) -> None:
    worker = cluster.workers[0].wait_ready()
    consumer = worker.consumer()
    bodies = slow_bodies(8, "term")
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(cluster.apis[0].generate, **b) for b in bodies]
        held, _running = wait_for(lambda: running_held(cluster, consumer), 60, "the worker to run a batch")
        worker.signal(signal.SIGTERM)
        assert worker.wait_exit() == 0, worker.log()
        successor = cluster.spawn("worker")
        cluster.workers = [successor]
        responses = [f.result() for f in futures]
    for body, response in zip(bodies, responses, strict=True):
        valid_images(response, 256, [body["seed"], body["seed"] + 1])
    # The batch in hand when the signal came was finished by the stopping worker itself, not re-run.
    client = cluster.redis.client()
    finished_by_it = [job_id for job_id in held if f"job done id={job_id}" in worker.log()]
    assert finished_by_it, (held, worker.log())
    assert all(int(client.get(cluster.keys.attempts(job_id))) == 1 for job_id in finished_by_it)
    successor.wait_ready()


# -- Redis restart ------------------------------------------------------------------------------------


def test_redis_restart_while_idle_recovers(cluster: Cluster) -> None:
    worker = cluster.workers[0].wait_ready()
    valid_images(cluster.apis[0].generate(prompt="before", width=64, height=64, steps=1, seed=1), 64)
    cluster.redis.stop()
    cluster.redis.start()  # same port, empty: no stream, no group
    for api in cluster.apis:
        response = api.generate(prompt="after", width=64, height=64, steps=1, seed=2)
        valid_images(response, 64, [2])
    worker.wait_ready()
    for api in cluster.apis:
        api.wait_ready()


def test_redis_down_answers_503_then_recovers(cluster: Cluster) -> None:
    api = cluster.apis[0]
    cluster.redis.stop()
    try:
        down = api.generate(prompt="down", width=64, height=64, steps=1)
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "queue_unavailable" and down.headers["retry-after"] == "1"
        assert httpx.get(f"{api.url}/ready", timeout=10).status_code == 503  # out of the Service
        assert httpx.get(f"{api.url}/health", timeout=10).status_code == 200  # but not restarted
    finally:
        cluster.redis.start()
    api.wait_ready()
    cluster.workers[0].wait_ready()
    valid_images(api.generate(prompt="up", width=64, height=64, steps=1, seed=4), 64, [4])


# -- deadlines and admission across pods --------------------------------------------------------------


def test_stale_job_is_never_run_and_admission_is_shared(cluster: Cluster) -> None:
    for worker in cluster.workers:
        worker.signal(signal.SIGTERM)
        assert worker.wait_exit() == 0
    # No worker runs now. An API pod with a short deadline and a small queue.
    api = cluster.spawn("api", server={"request_timeout_s": 2}, queue={"max_jobs": 2}).wait_ready()
    client = cluster.redis.client()
    with ThreadPoolExecutor(1) as pool:
        late = pool.submit(api.generate, prompt="late", width=64, height=64, steps=1, seed=5)
        wait_for(lambda: client.xlen(cluster.keys.stream) == 1, 30, "the job to be queued")

        # Another pod's job (written here as that pod would), already past its deadline when a worker
        # appears. The pod checking admission has never seen it: the depth comes from Redis.
        params = GenerationParams(model=MODEL, prompt="stale", width=64, height=64, steps=1,
                                  guidance_scale=3.5, seeds=(9,))
        stale = Job(params=params, deadline=time.monotonic() + 0.5)
        reply_to = f"{PREFIX}:replies:test"
        client.xadd(cluster.keys.stream, {"job": wire.encode_job(stale, reply_to)})

        refused = api.generate(prompt="refused", width=64, height=64, steps=1)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json() == {"error": {"message": refused.json()["error"]["message"],
                                            "type": "service_unavailable", "param": None, "code": "queue_full"}}

        timed_out = late.result()
    assert timed_out.status_code == 504, timed_out.text
    assert timed_out.json()["error"]["code"] == "deadline_exceeded"
    withdrawn = [key.decode().split(":")[-2] for key in client.keys(f"{PREFIX}:job:*:state")
                 if client.get(key) == b"withdrawn"]
    assert len(withdrawn) == 1  # the late job, taken back by its API pod at its deadline

    worker = cluster.spawn("worker").wait_ready()
    cluster.workers = [worker]
    popped = client.blpop([reply_to], timeout=30)
    assert popped is not None, worker.log()
    job_id, outcome = wire.decode_reply(popped[1])
    assert job_id == stale.id and isinstance(outcome, wire.RemoteError)
    assert (outcome.status, outcome.code) == (504, "deadline_exceeded")
    # A fresh job runs; neither stale one ever did.
    valid_images(cluster.apis[0].generate(prompt="fresh", width=64, height=64, steps=1, seed=6), 64, [6])
    # (the worker logs a job after answering it)
    wait_for(lambda: "job done id=" in worker.log(), 30, "the worker to log the fresh job")
    assert f"job done id={stale.id}" not in worker.log()
    assert f"job done id={withdrawn[0]}" not in worker.log()
    assert worker.log().count("job done id=") == 1
    assert client.xlen(cluster.keys.stream) == 0


def test_redis_restart_with_jobs_in_flight_loses_none(cluster: Cluster) -> None:
    # No worker runs: the jobs wait in the stream when Redis restarts empty (issue 12 item 9).
    for worker in cluster.workers:
        worker.signal(signal.SIGTERM)
        assert worker.wait_exit() == 0
    api = cluster.apis[0]
    seeds = [20, 21, 22]
    with ThreadPoolExecutor(len(seeds)) as pool:
        futures = [pool.submit(api.generate, prompt=f"in flight {seed}", width=64, height=64, steps=1,
                               seed=seed) for seed in seeds]
        wait_for(lambda: cluster.redis.client().xlen(cluster.keys.stream) == len(seeds), 30,
                 "the jobs to queue")
        cluster.redis.stop()
        cluster.redis.start()  # same port, empty
        # The API pod still holds the jobs: it enqueues them again (before: each client waited for its
        # deadline, then 504, and nothing was logged).
        wait_for(lambda: "redis data lost" in api.log(), 30, "the API pod to notice the loss")
        worker = cluster.spawn("worker")
        cluster.workers = [worker]
        responses = [f.result() for f in futures]
    for seed, response in zip(seeds, responses, strict=True):
        valid_images(response, 64, [seed])
    assert "re-enqueued=3 failed=0" in api.log()
    worker.wait_ready()


def test_api_sigterm_finishes_in_flight_responses(cluster: Cluster) -> None:
    api, worker = cluster.apis[1], cluster.workers[0].wait_ready()
    consumer = worker.consumer()
    body = slow_bodies(1, "in-flight")[0]
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(api.generate, **body)
        wait_for(lambda: cluster.pending(consumer), 60, "the worker to take the job")
        api.signal(signal.SIGTERM)  # stops accepting; the response on its way is still delivered
        response = in_flight.result()
    valid_images(response, 256, [body["seed"], body["seed"] + 1])
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly
    assert api.wait_exit() in (0, -signal.SIGTERM), api.log()
    assert "Application shutdown complete" in api.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{api.url}/health", timeout=2)
