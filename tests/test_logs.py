"""Structured logs through real servers: the JSON format, one ``job done`` line per job with its fields and
stage timings, and the request id (the client's ``x-request-id`` or a generated one) on the response, in
the request's line and in the job's line."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from .conftest import MODEL, Server, images_of

pytestmark = pytest.mark.heavy

SMALL = {"width": 64, "height": 96, "steps": 2}
STAGES = ("text_encode_ms", "denoise_ms", "vae_decode_ms", "safety_ms", "image_encode_ms")


def json_lines(server: Server) -> list[dict[str, Any]]:
    out = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))  # every structured line is one valid JSON object
    return out


def wait_for_line(server: Server, predicate: Any, timeout_s: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in json_lines(server):
            if predicate(entry):
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no matching log line in:\n{server.log()[-3000:]}")


@pytest.fixture(scope="module")
def json_server(make_server: Any) -> Server:
    return make_server({"server": {"default_response_format": "base64", "log_format": "json"}})


def test_job_line_has_fields_and_request_id(json_server: Server) -> None:
    response = httpx.post(f"{json_server.url}/v1/images/generations",
                          json={"model": MODEL, "prompt": "a lighthouse", "n": 2, **SMALL},
                          headers={"x-request-id": "trace-abc-123"}, timeout=120)
    assert len(images_of(response)) == 2
    assert response.headers["x-request-id"] == "trace-abc-123"
    job_id = response.json()["id"]

    job = wait_for_line(json_server, lambda e: e.get("job_id") == job_id)
    assert job["message"].startswith(f"job done id={job_id}")
    assert job["level"] == "INFO" and job["logger"] == "server.worker"
    assert job["request_id"] == "trace-abc-123"
    assert (job["model"], job["width"], job["height"], job["steps"], job["n"]) == (MODEL, 64, 96, 2, 2)
    assert job["batch_jobs"] == 1 and job["batch_images"] == 2 and job["batch_id"].startswith("batch-")
    assert job["queue_ms"] >= 0 and job["inference_ms"] > 0
    for stage in STAGES:
        assert isinstance(job[stage], (int, float)) and job[stage] >= 0, stage
    assert job["denoise_ms"] > 0
    # Exactly one line for the job.
    assert sum(1 for e in json_lines(json_server) if e.get("job_id") == job_id) == 1

    request = wait_for_line(json_server, lambda e: e.get("request_id") == "trace-abc-123"
                            and e["message"].startswith("request done"))
    assert request["status"] == 200 and request["path"] == "/v1/images/generations" and request["model"] == MODEL
    assert request["duration_ms"] > 0


def test_generated_request_id(json_server: Server) -> None:
    for supplied in (None, "bad id with spaces", "x" * 300):
        headers = {"x-request-id": supplied} if supplied else {}
        response = httpx.post(f"{json_server.url}/v1/images/generations",
                              json={"model": MODEL, "prompt": "a harbour", **SMALL}, headers=headers, timeout=120)
        assert response.status_code == 200
        rid = response.headers["x-request-id"]
        assert rid.startswith("req-") and len(rid) == 36 and rid != supplied
        job = wait_for_line(json_server, lambda e: e.get("job_id") == response.json()["id"])
        assert job["request_id"] == rid


def test_errors_carry_the_request_id(json_server: Server) -> None:
    response = httpx.post(f"{json_server.url}/v1/images/generations", json={"model": MODEL, "steps": 1},
                          headers={"x-request-id": "trace-err-1"}, timeout=30)
    assert response.status_code == 400 and response.headers["x-request-id"] == "trace-err-1"
    line = wait_for_line(json_server, lambda e: e.get("request_id") == "trace-err-1")
    assert line["status"] == 400


def test_text_format_keeps_the_key_value_line(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/images/generations", json={"model": MODEL, "prompt": "x", **SMALL},
                          headers={"x-request-id": "trace-text-1"}, timeout=120)
    job_id = response.json()["id"]
    deadline = time.monotonic() + 10
    while f"job done id={job_id}" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in server.log().splitlines() if f"job done id={job_id}" in line)
    assert " INFO server.worker job done " in line
    assert "request_id=trace-text-1" in line and "size=64x96" in line and "steps=2" in line
    for stage in STAGES:
        assert f"{stage}=" in line
