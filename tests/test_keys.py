"""API keys through the app on loopback ports: per-key request and image limits with Together's ``x-ratelimit-*`` headers
and 429 + ``retry-after``, allowed models, the safety-disable permission, keys from a mounted file (hashed,
re-read on change), the SDKs' view of a 429, and limits shared by two API servers over a real Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import together
import yaml
from PIL import Image

from .conftest import MODEL, REPO, images_of, openai_client, together3
from .support.inprocess import InProcessServer

OTHER = "darkroom/tiny-flux-b"
SMALL = {"width": 64, "height": 64, "steps": 1}

KEYS = {
    "rpm": "sk-test-rpm-0123456789",
    "ipm": "sk-test-ipm-0123456789",
    "both": "sk-test-both-0123456789",
    "models": "sk-test-models-0123456789",
    "safe": "sk-test-safe-0123456789",
    "plain": "sk-test-plain-0123456789",
    "sdk": "sk-test-sdk-0123456789",
    "openai": "sk-test-openai-0123456789",
}
FILED = "sk-test-filed-0123456789"
LATER = "sk-test-later-0123456789"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def post(server: InProcessServer, key: str | None, **body: Any) -> httpx.Response:
    body.setdefault("model", MODEL)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/images/generations", json={**SMALL, "prompt": "a lighthouse", **body},
                      headers=headers, timeout=120)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    return body["error"]


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [{"name": "filed", "sha256": sha(FILED), "requests_per_minute": 50}]}))
    return path


@pytest.fixture(scope="module")
def keyed(make_app: Any, tmp_path_factory: pytest.TempPathFactory, keys_file: Path) -> InProcessServer:
    models = tmp_path_factory.mktemp("models")
    for file in ("tiny-flux.yaml",):
        shutil.copy(REPO / "models" / file, models / file)
    other = yaml.safe_load((REPO / "models" / "tiny-flux.yaml").read_text())
    other.update(id=OTHER, aliases=["tiny-b"])
    (models / "tiny-flux-b.yaml").write_text(yaml.safe_dump(other))
    return make_app({
        "models_dir": str(models), "models": [MODEL, OTHER],
        "server": {"default_response_format": "base64"},
        "auth": {
            "keys": [
                {"name": "rpm", "key": KEYS["rpm"], "requests_per_minute": 3},
                {"name": "ipm", "key": KEYS["ipm"], "images_per_minute": 3},
                {"name": "both", "key": KEYS["both"], "requests_per_minute": 10, "images_per_minute": 10},
                {"name": "models", "key": KEYS["models"], "models": ["tiny-b"]},
                {"name": "safe", "sha256": sha(KEYS["safe"]), "disable_safety_checker": True},
                {"name": "plain", "key": KEYS["plain"]},
                {"name": "sdk", "key": KEYS["sdk"], "requests_per_minute": 1},
                {"name": "openai", "key": KEYS["openai"], "images_per_minute": 1},
            ],
            "keys_file": str(keys_file),
            "reload_interval_s": 0.2,
        },
        # per_key with no disable_keys: the key store's permissions decide.
        "safety": {"allow_disable": "per_key"},
    }, listen=True)


def test_missing_and_unknown_keys_are_401(keyed: InProcessServer) -> None:
    assert_error(post(keyed, None), 401, "invalid_api_key")
    assert_error(post(keyed, "sk-not-a-key"), 401, "invalid_api_key")
    assert httpx.get(f"{keyed.url}/v1/models", timeout=10).status_code == 401


def test_requests_per_minute_headers_and_429(keyed: InProcessServer) -> None:
    remaining = []
    for _ in range(3):
        response = post(keyed, KEYS["rpm"])
        assert len(images_of(response)) == 1
        assert response.headers["x-ratelimit-limit"] == "3"
        reset = int(response.headers["x-ratelimit-reset"])
        assert 0 < reset <= 60
        remaining.append(int(response.headers["x-ratelimit-remaining"]))
        assert "x-ratelimit-limit-images" not in response.headers  # this key has no image limit
    assert remaining == [2, 1, 0]

    refused = post(keyed, KEYS["rpm"])
    error = assert_error(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error" and "3 requests per minute" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.headers["x-ratelimit-limit"] == "3"
    # Header names are lowercase on the wire (Together's spelling).
    raw = httpx.post(f"{keyed.url}/v1/images/generations", json={**SMALL, "prompt": "x", "model": MODEL},
                     headers={"authorization": f"Bearer {KEYS['rpm']}"}, timeout=60)
    names = [name for name, _ in raw.headers.raw]
    assert b"x-ratelimit-remaining" in names and b"retry-after" in names


def test_images_per_minute_counts_n(keyed: InProcessServer) -> None:
    first = post(keyed, KEYS["ipm"], n=2)
    assert len(images_of(first)) == 2
    assert first.headers["x-ratelimit-limit-images"] == "3"
    assert first.headers["x-ratelimit-remaining-images"] == "1"
    assert "x-ratelimit-limit" not in first.headers  # no request limit on this key

    # Two more images do not fit; nothing is charged for the refusal, so one still does.
    refused = post(keyed, KEYS["ipm"], n=2)
    error = assert_error(refused, 429, "rate_limit_exceeded")
    assert "3 images per minute" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-images"] == "1"
    last = post(keyed, KEYS["ipm"], n=1)
    assert len(images_of(last)) == 1 and last.headers["x-ratelimit-remaining-images"] == "0"

    # More images than the key may ever have in a minute is a plain 400, not a 429 to retry forever.
    over = assert_error(post(keyed, KEYS["ipm"], n=4), 400, "over_key_limit")
    assert over["param"] == "n"


def test_both_limits_report_both_header_sets(keyed: InProcessServer) -> None:
    response = post(keyed, KEYS["both"], n=2)
    assert len(images_of(response)) == 2
    assert (response.headers["x-ratelimit-remaining"], response.headers["x-ratelimit-remaining-images"]) == (
        "9", "8")


def test_errors_after_admission_still_carry_the_headers(keyed: InProcessServer) -> None:
    """A request charged and then refused (here: its prompt is on the word list) still shows its quota."""
    response = post(keyed, KEYS["both"], prompt="csam")
    assert_error(response, 422, "prompt_flagged")
    assert response.headers["x-ratelimit-limit"] == "10"
    assert response.headers["x-request-id"]


def test_allowed_models(keyed: InProcessServer) -> None:
    error = assert_error(post(keyed, KEYS["models"], model=MODEL), 403, "model_not_allowed")
    assert error["param"] == "model" and error["type"] == "permission_error"
    assert len(images_of(post(keyed, KEYS["models"], model=OTHER))) == 1
    assert len(images_of(post(keyed, KEYS["models"], model="tiny-b"))) == 1  # aliases too
    listed = httpx.get(f"{keyed.url}/v1/models", headers={"authorization": f"Bearer {KEYS['models']}"},
                       timeout=10).json()
    assert [m["id"] for m in listed["data"]] == [OTHER]
    everything = httpx.get(f"{keyed.url}/v1/models", headers={"authorization": f"Bearer {KEYS['plain']}"},
                           timeout=10).json()
    assert [m["id"] for m in everything["data"]] == [MODEL, OTHER]


def test_safety_disable_permission_comes_from_the_key(keyed: InProcessServer) -> None:
    assert len(images_of(post(keyed, KEYS["safe"], disable_safety_checker=True))) == 1
    error = assert_error(post(keyed, KEYS["plain"], disable_safety_checker=True), 403,
                         "safety_checker_required")
    assert error["param"] == "disable_safety_checker"
    counters = httpx.get(f"{keyed.url}/ready", timeout=10).json()["safety"]["counters"]
    assert counters["disable_honored"] >= 1 and counters["disable_refused"] >= 1


def test_keys_file_is_hashed_and_reloaded(keyed: InProcessServer, keys_file: Path) -> None:
    response = post(keyed, FILED)
    assert len(images_of(response)) == 1 and response.headers["x-ratelimit-limit"] == "50"
    assert_error(post(keyed, LATER), 401, "invalid_api_key")

    # Rotate: the file now holds only the new key (as a plain key this time).
    keys_file.write_text(yaml.safe_dump([{"name": "later", "key": LATER, "requests_per_minute": 7}]))
    deadline = time.monotonic() + 15
    while post(keyed, LATER).status_code == 401 and time.monotonic() < deadline:
        time.sleep(0.3)
    response = post(keyed, LATER)
    assert response.status_code == 200 and response.headers["x-ratelimit-limit"] == "7"
    assert_error(post(keyed, FILED), 401, "invalid_api_key")

    # A broken file keeps the previous keys.
    keys_file.write_text("keys: [{name: broken}]")
    time.sleep(0.5)
    assert post(keyed, LATER).status_code == 200


def test_sdks_see_the_429_and_the_headers(keyed: InProcessServer) -> None:
    client = together.Together(base_url=keyed.url, api_key=KEYS["sdk"], max_retries=0)
    raw = client.images.with_raw_response.generate(model=MODEL, prompt="a lighthouse", response_format="base64",
                                                   **SMALL)
    assert raw.headers["x-ratelimit-limit"] == "1" and raw.headers["x-ratelimit-remaining"] == "0"
    assert raw.parse().data[0].b64_json
    with pytest.raises(together.RateLimitError) as caught:
        client.images.generate(model=MODEL, prompt="again", response_format="base64", **SMALL)
    assert caught.value.status_code == 429
    assert int(caught.value.response.headers["retry-after"]) >= 1

    oa = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEYS["openai"], max_retries=0)
    first = oa.images.with_raw_response.generate(model=MODEL, prompt="a lighthouse", size="64x64",
                                                 response_format="b64_json")
    assert first.headers["x-ratelimit-remaining-images"] == "0"
    with pytest.raises(openai.RateLimitError) as refused:
        oa.images.generate(model=MODEL, prompt="again", size="64x64", response_format="b64_json")
    assert refused.value.response.headers["x-ratelimit-limit-images"] == "1"


def test_keys_are_never_logged(keyed: InProcessServer) -> None:
    log = keyed.log()
    assert "request done" in log  # the request lines name keys...
    assert "key=rpm" in log
    for key in [*KEYS.values(), FILED, LATER]:  # ...never by their secret
        assert key not in log


# -- limits shared over Redis -------------------------------------------------------------------------


def test_limits_hold_across_two_api_servers(make_app: Any, tmp_path: Path) -> None:
    """Two API servers (each its own app, limiter and worker; in this process, served on loopback ports) share
    a key's limits through Redis alone."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from .support.launch import RedisProcess

    redis_proc = RedisProcess(tmp_path).start()
    apps: list[Any] = []
    try:
        config = {
            "server": {"default_response_format": "base64"},
            "queue": {"backend": "redis", "redis_url": redis_proc.url, "key_prefix": "dr-keys-test"},
            "auth": {"keys": [{"name": "shared", "key": "sk-shared-0123456789", "requests_per_minute": 4},
                              {"name": "traced", "key": "sk-traced-0123456789"}]},
        }
        first, second = apps[:] = make_app(config, listen=True), make_app(config, listen=True)
        seen = []
        for server in (first, second, first, second):
            response = post(server, "sk-shared-0123456789")
            assert response.status_code == 200, response.text
            seen.append(response.headers["x-ratelimit-remaining"])
        assert seen == ["3", "2", "1", "0"]
        for server in (first, second):
            refused = post(server, "sk-shared-0123456789")
            assert_error(refused, 429, "rate_limit_exceeded")
            assert int(refused.headers["retry-after"]) >= 1
        # The request id travels with the job through Redis into the worker's line (either process's).
        response = httpx.post(f"{first.url}/v1/images/generations", timeout=120,
                              json={**SMALL, "prompt": "traced", "model": MODEL},
                              headers={"authorization": "Bearer sk-traced-0123456789",
                                       "x-request-id": "trace-redis-1"})
        assert response.status_code == 200, response.text
        assert "x-ratelimit-limit" not in response.headers  # a key without limits
        line = f"job done id={response.json()['id']}"
        deadline = time.monotonic() + 10
        while line not in first.log() + second.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        done = next(x for x in (first.log() + second.log()).splitlines() if line in x)
        assert "request_id=trace-redis-1" in done
        keys = [k.decode() for k in redis_proc.client().keys("dr-keys-test:ratelimit:*")]
        assert keys and all("sk-shared" not in k for k in keys)  # named by the key's name, not the secret
    finally:
        for app in apps:  # while their Redis still answers: stopping returns what their workers hold
            app.stop()
        redis_proc.stop()


# -- the limiter itself, both backends ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_sliding_window_all_or_nothing(backend: str, tmp_path: Path) -> None:
    from server.api.ratelimit import Ask, MemoryLimiter, RedisLimiter

    redis_proc = None
    if backend == "redis":
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        from .support.launch import RedisProcess

        redis_proc = RedisProcess(tmp_path).start()

    def asks(images: int) -> list[Any]:
        return [Ask("requests", 2, 1), Ask("images", 3, images)]

    async def scenario() -> None:
        limiter: Any = (RedisLimiter(redis_proc.url, "dr-unit", window_s=0.8) if redis_proc is not None
                        else MemoryLimiter(window_s=0.8))
        try:
            first = await limiter.acquire("k", asks(2))
            assert first.allowed and [q.remaining for q in first.quotas] == [1, 1]
            assert all(0 < q.reset_s <= 0.8 + 1e-6 for q in first.quotas)
            # Images would overflow: refused, and nothing (not even the request) is charged.
            refused = await limiter.acquire("k", asks(2))
            assert not refused.allowed and [q.remaining for q in refused.quotas] == [1, 1]
            assert 0 < refused.retry_after_s <= 0.8 + 1e-6
            # A charge given back (the request was refused before its job was queued) counts no more.
            taken = await limiter.acquire("k", asks(1))
            assert taken.allowed and taken.charge
            await limiter.refund("k", asks(1), taken.charge)
            assert (await limiter.acquire("k", asks(1))).allowed
            full = await limiter.acquire("k", asks(1))
            assert not full.allowed and [q.remaining for q in full.quotas] == [0, 0]
            assert (await limiter.acquire("other", asks(3))).allowed  # keys are independent
            await asyncio.sleep(full.retry_after_s + 0.1)
            later = await limiter.acquire("k", asks(1))
            assert later.allowed, later
        finally:
            await limiter.aclose()

    try:
        asyncio.run(scenario())
    finally:
        if redis_proc is not None:
            redis_proc.stop()


# -- keys limited to some models: the default model and the 404's list are the key's (in-process) -----------

THIRD = "darkroom/tiny-flux-c"
LIMITED, TEXT_ONLY = "sk-test-limited-0123456789", "sk-test-text-only-0123456789"


@pytest.fixture(scope="module")
def limited(make_app: Any, tmp_path_factory: pytest.TempPathFactory) -> InProcessServer:
    """MODEL (edits), OTHER (text to image only) and THIRD (edits); keys limited to OTHER and THIRD, and to
    OTHER alone."""
    models = tmp_path_factory.mktemp("limited-models")
    shutil.copy(REPO / "models" / "tiny-flux.yaml", models / "tiny-flux.yaml")
    for model_id, alias, edits in ((OTHER, "tiny-b", False), (THIRD, "tiny-c", True)):
        manifest = yaml.safe_load((REPO / "models" / "tiny-flux.yaml").read_text())
        manifest.update(id=model_id, aliases=[alias])
        manifest["capabilities"]["image_to_image"] = edits
        (models / f"{model_id.split('/')[1]}.yaml").write_text(yaml.safe_dump(manifest))
    return make_app({
        "models_dir": str(models), "models": [MODEL, OTHER, THIRD],
        "server": {"default_response_format": "base64"},
        "auth": {"keys": [{"name": "limited", "key": LIMITED, "models": ["tiny-b", "tiny-c"]},
                          {"name": "text-only", "key": TEXT_ONLY, "models": [OTHER]}]},
    }, engine="stand-in")


def _named(text: str) -> set[str]:
    """The model ids a message names."""
    return set(re.findall(r"darkroom/[\w-]+", text))


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_without_model_a_limited_key_gets_its_first_model(limited: InProcessServer) -> None:
    generated = openai_client(limited, LIMITED).images.generate(prompt="a lighthouse", size="64x64",
                                                                extra_body={"steps": 1})
    assert len(generated.data) == 1 and limited.engines[0].calls[-1][-1].model == OTHER
    # Edits: the first model this key may use that edits (MODEL edits, but this key may not use it).
    edited = openai_client(limited, LIMITED).images.edit(
        image=("a.png", _png(), "image/png"), prompt="make it blue", size="64x64", extra_body={"steps": 2})
    assert len(edited.data) == 1 and limited.engines[0].calls[-1][-1].model == THIRD
    with pytest.raises(openai.PermissionDeniedError) as refused:
        openai_client(limited, TEXT_ONLY).images.edit(image=("a.png", _png(), "image/png"), prompt="a")
    error = refused.value.body
    assert (error["code"], error["param"], error["type"]) == ("model_not_allowed", "model", "permission_error")
    assert _named(error["message"]) == set()


def test_unknown_model_lists_only_the_keys_models(limited: InProcessServer) -> None:
    with pytest.raises(together.NotFoundError) as missing:
        together3(limited, LIMITED).images.generate(model="nope/model", prompt="a", width=64, height=64,
                                                    steps=1)
    message = missing.value.body["error"]["message"]
    assert message.endswith(f"available: {OTHER}, {THIRD}") and _named(message) == {OTHER, THIRD}
    listed = openai_client(limited, LIMITED).models.list()
    assert [m.id for m in listed.data] == [OTHER, THIRD]  # the same models /v1/models shows this key
    for path in ("/v1/models/nope", "/v2/supported-models/nope"):
        answer = limited.client.get(path, headers={"authorization": f"Bearer {LIMITED}"})
        assert answer.status_code == 404 and MODEL not in _named(answer.text), answer.text
    edit = limited.client.post("/v1/images/edits", data={"prompt": "a", "model": "nope"},
                               files=[("image", ("a.png", _png(), "image/png"))],
                               headers={"authorization": f"Bearer {TEXT_ONLY}"})
    assert edit.status_code == 404 and edit.json()["error"]["message"].endswith(f"available: {OTHER}")
