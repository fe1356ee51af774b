"""``GET /metrics`` after a few real jobs: every family the operator dashboards need, parsed with the
Prometheus client's own parser; ``/ready`` against loading; ``/health`` under full load (p99 printed).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import MODEL, REPO, Server, free_port, images_of

SMALL = {"width": 64, "height": 64, "steps": 1}


def scrape(server: Server) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def samples(families: dict[str, Any], family: str, name: str | None = None, **labels: str) -> list[Any]:
    found = families[family].samples
    return [s for s in found if (name is None or s.name == name)
            and all(s.labels.get(k) == v for k, v in labels.items())]


def value(families: dict[str, Any], family: str, name: str | None = None, **labels: str) -> float:
    return sum(s.value for s in samples(families, family, name, **labels))


@pytest.fixture(scope="module")
def busy(make_server: Any) -> Server:
    server = make_server({"server": {"default_response_format": "base64"},
                          "scheduler": {"batch_window_ms": 50, "max_batch_images": 8}})
    # A few jobs: concurrent ones (batched together), a URL response (storage), a flagged prompt, a
    # refused fetch.
    with ThreadPoolExecutor(4) as pool:
        for response in pool.map(lambda n: server.generate(prompt="a lighthouse", n=n, **SMALL), [1, 2, 1, 2]):
            images_of(response)
    url = server.generate(prompt="a harbour", response_format="url", **SMALL)
    assert url.status_code == 200, url.text
    assert server.generate(prompt="csam", **SMALL).status_code == 422
    # (img2img needs 2 steps)
    blocked = server.generate(prompt="a lighthouse", image_url="http://127.0.0.1:9/x.png", **{**SMALL, "steps": 2})
    assert blocked.status_code == 400 and blocked.json()["error"]["param"] == "image_url", blocked.text
    return server


def test_request_counts_by_status_and_model(busy: Server) -> None:
    families = scrape(busy)
    route = "/v1/images/generations"
    assert value(families, "darkroom_requests", "darkroom_requests_total", route=route, status="200",
                 model=MODEL) == 5
    assert value(families, "darkroom_requests", "darkroom_requests_total", route=route, status="422",
                 model=MODEL) == 1
    assert value(families, "darkroom_requests", "darkroom_requests_total", route=route, status="400",
                 model=MODEL) == 1
    assert value(families, "darkroom_request_duration_seconds", "darkroom_request_duration_seconds_count",
                 route=route) == 7


def test_worker_families_after_jobs(busy: Server) -> None:
    families = scrape(busy)
    # 1 + 2 + 1 + 2 + 1 images in 5 jobs.
    assert value(families, "darkroom_images_generated", "darkroom_images_generated_total", model=MODEL) == 7
    assert value(families, "darkroom_jobs", "darkroom_jobs_total", model=MODEL, outcome="done") == 5
    assert value(families, "darkroom_queue_wait_seconds", "darkroom_queue_wait_seconds_count", model=MODEL) == 5
    batches = value(families, "darkroom_batch_size_images", "darkroom_batch_size_images_count", model=MODEL)
    assert 1 <= batches <= 5
    assert value(families, "darkroom_batch_size_images", "darkroom_batch_size_images_sum", model=MODEL) == 7
    assert value(families, "darkroom_batch_size_jobs", "darkroom_batch_size_jobs_sum", model=MODEL) == 5
    for stage in ("text_encode", "denoise", "vae_decode", "safety"):
        assert value(families, "darkroom_stage_duration_seconds", "darkroom_stage_duration_seconds_count",
                     stage=stage, model=MODEL) == batches, stage
        assert value(families, "darkroom_stage_duration_seconds", "darkroom_stage_duration_seconds_sum",
                     stage=stage, model=MODEL) > 0, stage
    assert value(families, "darkroom_stage_duration_seconds", "darkroom_stage_duration_seconds_count",
                 stage="image_encode", model=MODEL) == 5
    assert value(families, "darkroom_stage_duration_seconds", "darkroom_stage_duration_seconds_count",
                 stage="storage", model=MODEL) == 1


def test_gauges_and_counters_read_at_scrape(busy: Server) -> None:
    families = scrape(busy)
    assert value(families, "darkroom_queue_depth") == 0
    assert value(families, "darkroom_ready") == 1
    assert value(families, "darkroom_worker_ready", worker="worker-cpu") == 1
    assert value(families, "darkroom_device_memory_bytes", device="cpu", kind="rss") > 10_000_000
    assert value(families, "darkroom_safety_events", "darkroom_safety_events_total", event="prompts_flagged") == 1
    assert value(families, "darkroom_safety_events", "darkroom_safety_events_total", event="prompts_checked") >= 6
    assert value(families, "darkroom_fetch_failures", "darkroom_fetch_failures_total", field="image_url") == 1
    # Defined for the LoRA cache (incremented by the LoRA code), present before any LoRA is used.
    for family in ("darkroom_lora_cache_hits", "darkroom_lora_cache_misses", "darkroom_lora_cache_evictions",
                   "darkroom_ratelimited_requests"):
        assert family in families
        assert families[family].type == "counter"
    assert "process_resident_memory_bytes" in families


def test_the_response_carries_stage_timings(busy: Server) -> None:
    body = busy.generate(prompt="a lighthouse", **SMALL).json()
    assert set(body["timings"]) == {"queue_s", "inference_s", "encode_s"}  # unchanged; stages beside it
    timings = {**body["timings"], **body["stages"]}
    for stage in ("text_encode_s", "denoise_s", "vae_decode_s", "safety_s", "image_encode_s"):
        assert timings[stage] >= 0, stage
    assert timings["denoise_s"] > 0
    assert timings["text_encode_s"] + timings["denoise_s"] + timings["vae_decode_s"] <= timings["inference_s"] + 1e-3


def test_health_stays_fast_under_full_load(busy: Server) -> None:
    """Keep the worker and the event loop busy with generation, and time /health meanwhile."""
    stop = threading.Event()
    statuses: list[int] = []

    def hammer() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                r = client.post(f"{busy.url}/v1/images/generations",
                                json={"model": MODEL, "prompt": "load", "width": 256, "height": 256,
                                      "steps": 2, "n": 2})
                statuses.append(r.status_code)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    latencies = []
    try:
        time.sleep(0.5)
        with httpx.Client(timeout=10) as client:
            for _ in range(150):
                started = time.perf_counter()
                response = client.get(f"{busy.url}/health")
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200 and response.json() == {"status": "ok"}
                time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    depth_seen = statuses  # the generation requests all succeeded (or were told to retry)
    assert depth_seen and set(depth_seen) <= {200, 503}
    p50 = statistics.median(latencies)
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"/health under load: {len(latencies)} probes, p50={p50 * 1000:.1f} ms, p99={p99 * 1000:.1f} ms, "
          f"{len(statuses)} generation requests meanwhile")
    assert p99 < 2.0  # a sanity bound, not a benchmark


def test_ready_reflects_loading(tiny_cache: Any, tmp_path: Any) -> None:
    """From process start: /health answers before the models are ready; /ready is 503 ('loading') until the
    worker has loaded and warmed its model, then 200."""
    import yaml

    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"engine": {"cache_dir": str(tiny_cache), "cpu_threads": 1},
                                      "storage": {"directory": str(tmp_path / "images")}}))
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--config", str(config), "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seen: list[tuple[int, dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            seen.append((r.status_code, r.json()))
            if r.status_code == 200:
                break
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            time.sleep(0.02)
        assert seen and seen[-1][0] == 200
        assert seen[-1][1]["workers"] == {"worker-cpu": "ready"} and seen[-1][1]["ready"] is True
        for status, body in seen[:-1]:
            assert status == 503 and body["ready"] is False
            assert body["workers"]["worker-cpu"] == "loading"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "darkroom_ready 1.0" in metrics
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
