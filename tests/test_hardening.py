"""Cheap requests that must not starve, charge or mislead (issue 12 items 1 and 10; issue 11's async bullets):
in-process apps with the stand-in engine, a loopback origin that stalls, and the API's lanes themselves.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from server.api.lanes import Lane
from server.errors import DarkroomError

from .image_origin import ImageOrigin
from .support import launch
from .support.inprocess import InProcessServer

PLAIN = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 1}


wait_until = functools.partial(launch.wait_until, timeout_s=20.0, interval_s=0.02)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# -- starvation by slow downloads (issue 12.1) ----------------------------------------------------------


@pytest.fixture(scope="module")
def stall_origin() -> Iterator[ImageOrigin]:
    with ImageOrigin(name="localhost") as origin:
        yield origin


@pytest.fixture(scope="module")
def downloads_app(make_app: Callable[..., InProcessServer]) -> InProcessServer:
    return make_app({
        "server": {"default_response_format": "base64"},
        # Silences of a minute are allowed here, so the stalled downloads stay stalled during the test.
        "fetch": {"allow_hosts": ["localhost"], "max_concurrent": 8, "max_per_key": 3, "read_timeout_s": 60,
                  "timeout_s": 90, "slot_wait_s": 0.5},
        "loras": {"download_timeout_s": 90},
    }, engine="stand-in")


def test_stalled_downloads_never_delay_a_request_that_downloads_nothing(
    downloads_app: InProcessServer, stall_origin: ImageOrigin,
) -> None:
    """40 requests naming LoRA files and images on an origin that sends headers and 40 bytes, then stalls
    (each with its own key): at most max_concurrent download at once, the rest are refused at once, and a
    plain request is served while the downloads still stall."""
    client = downloads_app.client

    def post(i: int) -> httpx.Response:
        url = stall_origin.url(f"/stall?req={i}")
        # A LoRA download checks the file's header first: the stall comes after a valid one.
        lora = {**PLAIN, "image_loras": [{"path": url + "&lora=1", "scale": 0.5}]}
        body = lora if i % 4 else {**PLAIN, "steps": 2, "image_url": url}  # img2img needs 2 steps
        return client.post("/v1/images/generations", json=body, headers={"authorization": f"Bearer k{i}"},
                           timeout=120)

    with ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(post, i) for i in range(40)]
        try:
            wait_until(lambda: stall_origin.stalled == 8 and sum(f.done() for f in futures) == 32,
                       "8 stalled downloads and 32 refusals")
            refused = [f.result() for f in futures if f.done()]
            for response in refused:
                assert response.status_code == 429 and response.headers["retry-after"] == "1"
                assert error_of(response)["code"] == "fetch_busy"
            plain = client.post("/v1/images/generations", json=PLAIN, timeout=30)
            assert plain.status_code == 200, plain.text
            assert stall_origin.stalled == 8  # served while every download slot was still stalled
        finally:
            stall_origin.release()
        answered = [f.result() for f in futures if f not in refused]
    # Released, the stalled ones finish: images decode, the PNG "LoRA" files are refused as LoRAs.
    assert sorted({r.status_code for r in [f.result() for f in futures]}) in ([200, 400, 429], [400, 429],
                                                                               [200, 429])
    assert all(r.status_code < 500 for r in answered)


def test_one_key_holds_at_most_max_per_key_downloads(downloads_app: InProcessServer) -> None:
    """Three downloads of one key stall in flight (its max_per_key); while they hold their slots, that key's
    fourth and fifth are refused with 429; released, the three are served."""
    def post(origin: ImageOrigin, i: int) -> httpx.Response:
        body = {**PLAIN, "steps": 2, "image_url": origin.url(f"/stall?key={i}")}
        return downloads_app.client.post("/v1/images/generations", json=body,
                                         headers={"authorization": "Bearer same-key"}, timeout=60)

    # Its own origin: the module's one was released by the test above, and stalls no more.
    with ImageOrigin(name="localhost") as origin, ThreadPoolExecutor(3) as pool:
        held = [pool.submit(post, origin, i) for i in range(3)]
        try:
            wait_until(lambda: origin.stalled == 3, "3 downloads of the key in flight")
            busy = [post(origin, i) for i in (3, 4)]
        finally:
            origin.release()
        served = [f.result() for f in held]
    assert all(r.status_code == 429 and "already has 3 downloads" in error_of(r)["message"] for r in busy), \
        [r.text for r in busy]
    assert all(r.status_code == 200 for r in served), [r.text for r in served]


# -- the quota counts admitted work only (issue 11, async bullet 4) -------------------------------------


@pytest.fixture(scope="module")
def quota_app(make_app: Callable[..., InProcessServer]) -> InProcessServer:
    return make_app({
        "server": {"default_response_format": "base64"},
        "auth": {"keys": [{"name": "two-a-minute", "key": "sk-quota", "requests_per_minute": 2}]},
    }, engine="stand-in")


def test_refused_requests_are_not_charged(quota_app: InProcessServer) -> None:
    headers = {"authorization": "Bearer sk-quota"}

    def post(**body: Any) -> httpx.Response:
        return quota_app.client.post("/v1/images/generations", json={**PLAIN, **body}, headers=headers)

    refusals = [
        (post(prompt="csam"), 422, "prompt_flagged"),                           # the safety checker
        (post(image_url="data:image/png;base64,@@@@", steps=2), 400, "invalid_image_url"),  # a bad image URL
        (post(image_url="http://10.0.0.1/x.png", steps=2), 400, "url_not_allowed"),     # a refused address
    ]
    for response, status, code in refusals:
        assert response.status_code == status and error_of(response)["code"] == code, response.text
        # The charge was given back: the headers count it back too.
        assert response.headers["x-ratelimit-remaining"] == "2"
    assert post().status_code == 200
    assert post().status_code == 200
    over = post()
    assert over.status_code == 429 and error_of(over)["code"] == "rate_limit_exceeded"


def test_queue_full_refusals_are_not_charged(make_app: Callable[..., InProcessServer]) -> None:
    full = make_app({
        "server": {"default_response_format": "base64"},
        "queue": {"max_jobs": 0},  # every job is refused at admission
        "auth": {"keys": [{"name": "two-a-minute", "key": "sk-full", "requests_per_minute": 2}]},
    }, engine="stand-in")
    for _ in range(4):
        response = full.client.post("/v1/images/generations", json=PLAIN,
                                    headers={"authorization": "Bearer sk-full"})
        assert response.status_code in (429, 503) and error_of(response)["code"] == "queue_full"
        assert response.headers["x-ratelimit-remaining"] == "2"


# -- the prompt classifier is never waited for in a shared thread (issue 11, async bullet 2) -----------


def test_a_loading_classifier_answers_503_at_once(make_app: Callable[..., InProcessServer]) -> None:
    guarded = make_app({
        "server": {"default_response_format": "base64"},
        "safety": {"prompt": {"classifier": {"source": {"builtin": "tiny-text-classifier"},
                                             "threshold": 1.0}}},
    }, engine="stand-in")
    assert guarded.client.post("/v1/images/generations", json=PLAIN).status_code == 200
    guarded.runtime.guard.loaded.clear()  # as while it loads (or reloads)
    try:
        # Before: the request waited for the load in one of Starlette's threads, up to request_timeout_s.
        response = guarded.client.post("/v1/images/generations", json=PLAIN, timeout=30)
    finally:
        guarded.runtime.guard.loaded.set()
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert "prompt classifier is not available" in error_of(response)["message"]


# -- the Host header is never trusted for URLs (issue 12.10) --------------------------------------------


@pytest.fixture(scope="module")
def urls_app(make_app: Callable[..., InProcessServer]) -> InProcessServer:
    return make_app({"server": {"default_response_format": "url"}}, engine="stand-in")


@pytest.fixture(scope="module")
def proxied_app(make_app: Callable[..., InProcessServer]) -> InProcessServer:
    # In-process requests come from 127.0.0.1 (httpx's ASGI transport): the trusted proxy here.
    return make_app({"server": {"default_response_format": "url", "trusted_proxies": ["127.0.0.0/8"],
                                "allowed_hosts": ["testserver", "*.example.com"]}}, engine="stand-in")


FORWARDED = {"x-forwarded-host": "images.example.com", "x-forwarded-proto": "https"}


def image_url_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["data"][0]["url"])


def test_host_header_does_not_go_into_urls(urls_app: InProcessServer) -> None:
    response = urls_app.client.post("/v1/images/generations", json=PLAIN, headers={"host": "evil.example"})
    url = image_url_of(response)
    assert url.startswith("http://testserver/v1/files/"), url  # the bound address (httpx's, in-process)
    assert urls_app.client.get(url.removeprefix("http://testserver")).status_code == 200
    # Forwarded headers from a peer that is not a configured proxy are ignored too.
    forwarded = urls_app.client.post("/v1/images/generations", json=PLAIN, headers=FORWARDED)
    assert image_url_of(forwarded).startswith("http://testserver/v1/files/")


def test_forwarded_headers_from_a_trusted_proxy(proxied_app: InProcessServer) -> None:
    response = proxied_app.client.post("/v1/images/generations", json=PLAIN, headers=FORWARDED)
    assert image_url_of(response).startswith("https://images.example.com/v1/files/")
    ported = proxied_app.client.post("/v1/images/generations", json=PLAIN,
                                     headers={**FORWARDED, "x-forwarded-port": "8443"})
    assert image_url_of(ported).startswith("https://images.example.com:8443/v1/files/")
    junk = proxied_app.client.post("/v1/images/generations", json=PLAIN,
                                   headers={"x-forwarded-host": "evil.example/path?x=",
                                            "x-forwarded-proto": "gopher"})
    assert image_url_of(junk).startswith("http://testserver/v1/files/")  # not a host name: ignored


def test_unknown_hosts_are_refused(proxied_app: InProcessServer) -> None:
    refused = proxied_app.client.post("/v1/images/generations", json=PLAIN, headers={"host": "evil.example"})
    assert refused.status_code == 400 and error_of(refused)["code"] == "invalid_host"
    allowed = proxied_app.client.get("/v1/models", headers={"host": "api.example.com:8443"})
    assert allowed.status_code == 200
    # Probes come by address: never refused.
    assert proxied_app.client.get("/health", headers={"host": "10.1.2.3:8000"}).status_code == 200


# -- the lanes themselves --------------------------------------------------------------------------------


class Busy(DarkroomError):
    status = 429
    code = "busy"


def test_lane_refuses_past_its_limits_and_keeps_its_slots() -> None:
    async def scenario() -> None:
        lane = Lane("test", workers=2, wait_s=0.05, busy=lambda what: Busy(what), per_key=1)
        release = asyncio.Event()

        async def hold(key: str) -> None:
            async with lane.slot(key):
                await release.wait()

        holders = [asyncio.create_task(hold("a")), asyncio.create_task(hold("b"))]
        await asyncio.sleep(0.01)
        with pytest.raises(Busy, match="this API key already has 1 test"):
            async with lane.slot("a"):
                pass
        # Full: many waiters give up after wait_s...
        results = await asyncio.gather(*(lane.run(sum, [1, 2]) for _ in range(20)), return_exceptions=True)
        assert all(isinstance(r, Busy) for r in results)
        release.set()
        await asyncio.gather(*holders)
        # ...and none of them took a slot with it: both are free again.
        assert await asyncio.gather(lane.run(sum, [1, 2]), lane.run(sum, [3], lane_key="a")) == [3, 3]
        lane.close()

    asyncio.run(scenario())
