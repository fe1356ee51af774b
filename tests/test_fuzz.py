"""Every parser of client bytes answers 400 in the error shape, never 500 (issue 12 item 4): the reported
inputs as regression tests, then a seeded, time-bounded fuzz run per parser (request JSON and headers, query
parameters, data URLs, image headers). Safetensors headers are fuzzed in tests/test_lora_store.py.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from server.config import FetchSettings
from server.errors import FetchError
from server.fetch import Fetcher
from server.images import decode_image

from .support.inprocess import InProcessServer

RUNS = 300
BUDGET_S = 20.0  # each fuzz run stops early past this, so a slow machine never stalls the suite


def fuzz_inputs(seed: int, make: Callable[[random.Random], Any]) -> Iterator[Any]:
    """``RUNS`` inputs from ``make`` with a seeded generator, or fewer once ``BUDGET_S`` has passed."""
    rng = random.Random(seed)
    deadline = time.monotonic() + BUDGET_S
    for _ in range(RUNS):
        if time.monotonic() > deadline:
            return
        yield make(rng)


@pytest.fixture(scope="module")
def fuzzed(make_app: Callable[..., InProcessServer]) -> InProcessServer:
    return make_app({"server": {"default_response_format": "base64"}}, engine="stand-in")


def assert_client_error(response: httpx.Response, sent: Any) -> None:
    assert response.status_code < 500, (sent, response.status_code, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}, (sent, body)


# -- the reported inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b'{"prompt": "a fox", "seed": ' + b"9" * 5000 + b"}",          # more digits than int() converts
    b'{"prompt": "a fox", "extra": [' + b"1" * 4301 + b"]}",       # anywhere in the body, ignored field too
    b'{"prompt": "a fox", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # nested too deep
    b'{"prompt": "\\ud800", "steps": 1e400}',
])
def test_json_that_python_cannot_hold_is_a_400(fuzzed: InProcessServer, raw: bytes) -> None:
    response = fuzzed.client.post("/v1/images/generations", content=raw,
                                  headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert_client_error(response, raw)


@pytest.mark.parametrize("query", ["expires=%C2%B2&signature=00", "expires=" + "9" * 5000 + "&signature=00",
                                   "expires=1&signature=%C3%A9%ED%A0%80", "expires=-1&signature=x",
                                   "expires=%00&signature=%00"])
def test_file_url_parameters(fuzzed: InProcessServer, query: str) -> None:
    response = fuzzed.client.get(f"/v1/files/{'a' * 32}.png?{query}")
    assert response.status_code in (400, 403, 404), response.text
    assert_client_error(response, query)


# -- request JSON and headers --------------------------------------------------------------------------------

HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 2**63, -(2**63) - 1, 1e308, -0.0, 0.5, "", " ", "\x00", "\ud800", "\udfff",
    "a" * 10_000, [], {}, [[[]]], {"path": None}, [{"path": 1, "scale": "x"}], "data:image/png;base64,",
    "http://[::1", "1024x768", "0x0", "²x²", "9" * 30 + "x1", "NaN", "Infinity",
]
FIELDS = ["prompt", "model", "steps", "seed", "n", "width", "height", "size", "negative_prompt",
          "guidance_scale", "response_format", "output_format", "image_url", "reference_images",
          "image_loras", "disable_safety_checker"]


def hostile_body(rng: random.Random) -> tuple[bytes, dict[str, Any]]:
    body: dict[str, Any] = {"prompt": "a fox", "width": 64, "height": 64, "steps": 1}
    for _ in range(rng.randint(1, 3)):
        body[rng.choice(FIELDS)] = rng.choice(HOSTILE_VALUES)
    raw = bytearray(json.dumps(body).encode())
    kind = rng.random()
    if kind < 0.3:  # byte-level damage
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(raw))
            raw[at:at + rng.randint(0, 3)] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 3)))
    elif kind < 0.4:  # literals Python's json accepts and nothing else does
        raw = raw.replace(b"64", rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"9" * 4400]), 1)
    headers: dict[str, Any] = {"content-type": "application/json"}
    if rng.random() < 0.3:  # header bytes as sent on the wire (latin-1, as Starlette reads them)
        headers["authorization"] = b"Bearer " + bytes(rng.randrange(32, 256) for _ in range(20))
    if rng.random() < 0.2:
        headers["x-request-id"] = bytes(rng.randrange(32, 256) for _ in range(rng.randint(0, 300)))
    return bytes(raw), headers


def test_fuzz_request_bodies(fuzzed: InProcessServer) -> None:
    ran = 0
    for raw, headers in fuzz_inputs(1201, hostile_body):
        response = fuzzed.client.post("/v1/images/generations", content=raw, headers=headers)
        assert_client_error(response, raw[:300])
        ran += 1
    assert ran >= 50


def test_fuzz_query_parameters(fuzzed: InProcessServer) -> None:
    alphabet = ["0", "9", "²", "%", "%C2", "%B2", "%00", "%FF", "&", "=", "-", "+", "é", "%ED%A0%80", "a",
                "/"]

    def query(rng: random.Random) -> str:
        def part() -> str:
            return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 5, 40, 5000])))
        key = rng.choice([f"{'a' * 32}.png", part() or "x"])
        return f"/v1/files/{key}?expires={part()}&signature={part()}"

    ran = 0
    for path in fuzz_inputs(1202, query):
        response = fuzzed.client.get(path)
        assert_client_error(response, path[:300])
        ran += 1
    assert ran >= 50


# -- data URLs and image headers -----------------------------------------------------------------------------


def encoded(fmt: str) -> bytes:
    image = Image.new("RGB", (24, 16), (200, 30, 90))
    image.paste((10, 200, 10), (4, 4, 12, 12))
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


SAMPLES = {fmt: encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP")}


def damaged(rng: random.Random) -> bytes:
    data = bytearray(SAMPLES[rng.choice(sorted(SAMPLES))])
    for _ in range(rng.randint(1, 6)):
        head = rng.random() < 0.7  # most damage in the header, where sizes and tables live
        at = rng.randrange(min(len(data), 64) if head else len(data))
        choice = rng.random()
        if choice < 0.5:
            data[at] = rng.randrange(256)
        elif choice < 0.7:
            data[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
        elif choice < 0.85:
            del data[at:at + rng.randint(1, 16)]
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    if rng.random() < 0.2:
        data = data[: rng.randrange(1, len(data))]
    return bytes(data)


def test_fuzz_image_headers() -> None:
    ran = 0
    for data in fuzz_inputs(1203, damaged):
        try:
            image = decode_image(data, "image_url", 4_000_000, 64_000_000)
        except FetchError as exc:
            assert exc.status == 400 and exc.param == "image_url"
        else:
            assert image.mode == "RGB"
        ran += 1
    assert ran >= 50


def test_fuzz_data_urls() -> None:
    fetcher = Fetcher(FetchSettings(max_bytes=100_000))

    def data_url(rng: random.Random) -> str:
        payload = base64.b64encode(damaged(rng) if rng.random() < 0.5 else SAMPLES["PNG"]).decode()
        head = rng.choice(["data:image/png;base64", "DATA:IMAGE/PNG;BASE64", "data:image/png", "data:;base64",
                           "data:image/png;charset=\ud800;base64", "data:image/\x00;base64", "data:"])
        url = f"{head},{payload}"
        if rng.random() < 0.5:
            chars = list(url)
            for _ in range(rng.randint(1, 5)):
                junk = rng.choice(["=", "\n", " ", "%", "\ud800", "é", ",", ";"])
                chars.insert(rng.randrange(len(chars)), junk)
            url = "".join(chars)
        return url

    ran = 0
    try:
        for url in fuzz_inputs(1204, data_url):
            try:
                fetcher.fetch_image(url, "reference_images[0]")
            except FetchError as exc:
                assert exc.status == 400 and exc.param == "reference_images[0]"
            ran += 1
    finally:
        fetcher.close()
    assert ran >= 50
