"""Every error path of the server, through raw HTTP and through each official SDK.

Raw HTTP pins the exact status, the error envelope ``{"error": {"message", "type", "param", "code"}}``
and the field it names; the SDK tests pin the exception class each client raises for that status
(together 3.x, openai, and together 1.x run in its own virtualenv) and that the client surfaces the
server's message. Two configurations: a plain one, and a strict one (API keys, small prompt and body
limits, a queue of one job for 503s). Both run in-process with the stand-in engine
(tests/support/inprocess.py); the strict one is also served on a loopback port with the tiny engine, for
together 1.x (which lives in its own virtualenv, so it can only call a real socket) and for the full queue
(heavy jobs of the tiny engine).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import together

from .conftest import MODEL, images_of, openai_client, run_together1, together3
from .support.inprocess import InProcessServer

GEN = "/v1/images/generations"
SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 1}
KEY = "secret-key"
STRICT_PROMPT_CHARS = 50
STRICT_BODY_BYTES = 4096
HEAVY: dict[str, Any] = {"width": 384, "height": 384, "steps": 4}  # keeps the strict server's worker busy


# --------------------------------------------------------------------------------------------- servers


STRICT: dict[str, Any] = {
    "server": {"default_response_format": "base64", "api_keys": [KEY], "max_body_bytes": STRICT_BODY_BYTES},
    "limits": {"max_prompt_chars": STRICT_PROMPT_CHARS},
    "queue": {"max_jobs": 1, "retry_after_s": 1},
    "scheduler": {"max_batch_images": 1, "batch_window_ms": 0},
}


@pytest.fixture(scope="module")
def plain(make_app: Any) -> InProcessServer:
    """Default limits, no keys (any key works), base64 answers."""
    return make_app({"server": {"default_response_format": "base64"}}, engine="stand-in")


@pytest.fixture(scope="module")
def strict(make_app: Any) -> InProcessServer:
    """API keys, small prompt and body limits, and a queue where one job may wait (no batching, so a
    heavy job holds the worker while the next one waits): 503s come easily. Tests here are sequential,
    so the tiny queue only matters to the 503 test."""
    return make_app(STRICT, engine="stand-in")


@pytest.fixture(scope="module")
def strict_served(make_app: Any) -> InProcessServer:
    """The strict configuration with the tiny engine, served on a loopback port (together 1.x, the full
    queue)."""
    return make_app(STRICT, listen=True)


# --------------------------------------------------------------------------------------------- helpers


def post(server: InProcessServer, body: Any = None, *, path: str = GEN, key: str | None = None,
         content: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["authorization"] = f"Bearer {key}"
    if content is not None:
        return server.client.post(path, content=content, headers=hdrs, timeout=120)
    return server.client.post(path, json=body, headers=hdrs, timeout=120)


def gen_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "a red fox", **SMALL, **fields}


_ANY = object()


def assert_error(resp: httpx.Response, status: int, *, param: Any = _ANY, code: Any = _ANY,
                 type_: Any = _ANY) -> dict[str, Any]:
    """The exact status and the one error envelope every SDK can parse; returns the error object."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].split(";")[0].strip() == "application/json"
    body = resp.json()
    assert isinstance(body, dict) and list(body) == ["error"], body
    assert "detail" not in body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"].strip()
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    if param is not _ANY:
        assert err["param"] == param, err
    if code is not _ANY:
        assert err["code"] == code, err
    if type_ is not _ANY:
        assert err["type"] == type_, err
    return err


def assert_invalid(resp: httpx.Response, param: str | None,
                   code: str = "invalid_request") -> dict[str, Any]:
    err = assert_error(resp, 400, param=param, code=code, type_="invalid_request_error")
    if param is not None:
        assert param in err["message"], err
    return err


def assert_image_ok(resp: httpx.Response, size: int = 64) -> None:
    [image] = images_of(resp)
    assert image.size == (size, size)
    assert image.getextrema() != ((0, 0), (0, 0), (0, 0))


def t1_call(**fields: Any) -> dict[str, Any]:
    """A together 1.x call: it always sends n/height/width, so set them small."""
    return {"model": MODEL, "prompt": "a red fox", "n": 1, "height": 64, "width": 64, "steps": 1,
            **fields}


# ---------------------------------------------------------------------------------- validation: 400

MISSING = object()  # the field is left out of the body

VALIDATION_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("missing prompt", {"prompt": MISSING}, "prompt"),
    ("null prompt", {"prompt": None}, "prompt"),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("prompt not a string", {"prompt": 123}, "prompt"),
    ("prompt a list", {"prompt": ["a", "b"]}, "prompt"),
    ("prompt over 4000 chars", {"prompt": "x" * 4001}, "prompt"),
    ("negative_prompt over 4000 chars", {"negative_prompt": "x" * 4001}, "negative_prompt"),
    ("steps 0", {"steps": 0}, "steps"),
    ("steps negative", {"steps": -3}, "steps"),
    ("steps above model max", {"steps": 51}, "steps"),
    ("steps not a number", {"steps": "abc"}, "steps"),
    ("steps fractional", {"steps": 2.5}, "steps"),
    ("n 0", {"n": 0}, "n"),
    ("n above max_n", {"n": 5}, "n"),
    ("n not a number", {"n": "two"}, "n"),
    ("width not multiple of 8", {"width": 100}, "width"),
    ("height not multiple of 8", {"height": 70}, "height"),
    ("width too big", {"width": 2048}, "width"),
    ("height too big", {"height": 1040}, "height"),
    ("width too small", {"width": 32}, "width"),
    ("width zero", {"width": 0}, "width"),
    ("width not a number", {"width": "wide"}, "width"),
    ("negative seed", {"seed": -1}, "seed"),
    ("seed above 2**63-1", {"seed": 2**63}, "seed"),
    ("seed + n overflows", {"seed": 2**63 - 1, "n": 2}, "seed"),
    ("seed not a number", {"seed": "lucky"}, "seed"),
    ("bad response_format", {"response_format": "gif"}, "response_format"),
    ("bad output_format", {"output_format": "bmp"}, "output_format"),
    ("guidance_scale negative", {"guidance_scale": -1}, "guidance_scale"),
    ("guidance_scale not a number", {"guidance_scale": "high"}, "guidance_scale"),
    ("model not a string", {"model": 5}, "model"),
    ("disable_safety_checker not a bool", {"disable_safety_checker": "maybe"}, "disable_safety_checker"),
    ("reference_images not a list", {"reference_images": "http://a/b.png"}, "reference_images"),
    ("image_loras without path", {"image_loras": [{"scale": 1.0}]}, "image_loras"),
    ("image_loras not a list", {"image_loras": {"path": "a"}}, "image_loras"),
]

SIZE_CASES = ["big", "64x", "x64", "64x64x64", "0x64", "-64x64", "64*64", ""]


@pytest.mark.parametrize(("fields", "param"), [(c[1], c[2]) for c in VALIDATION_CASES],
                         ids=[c[0] for c in VALIDATION_CASES])
def test_validation_error_names_the_field(plain: InProcessServer, fields: dict[str, Any], param: str) -> None:
    body = {k: v for k, v in gen_body(**fields).items() if v is not MISSING}
    err = assert_invalid(post(plain, body), param)
    if fields == {"prompt": MISSING}:
        assert err["message"] == "'prompt' is required"


@pytest.mark.parametrize("size", SIZE_CASES)
def test_bad_size_string(plain: InProcessServer, size: str) -> None:
    body = {"model": MODEL, "prompt": "a fox", "steps": 1, "size": size}
    assert_invalid(post(plain, body), "size")


def test_limit_messages_state_the_limit(plain: InProcessServer) -> None:
    assert "at most 50" in assert_invalid(post(plain, gen_body(steps=51)), "steps")["message"]
    assert "at most 4" in assert_invalid(post(plain, gen_body(n=5)), "n")["message"]
    assert "multiple of 8" in assert_invalid(post(plain, gen_body(width=100)), "width")["message"]
    assert "4000" in assert_invalid(post(plain, gen_body(prompt="y" * 4001)), "prompt")["message"]


def test_size_string_cannot_exceed_limits(plain: InProcessServer) -> None:
    assert_invalid(post(plain, {"model": MODEL, "prompt": "a", "steps": 1, "size": "2048x64"}), "width")
    assert_invalid(post(plain, {"model": MODEL, "prompt": "a", "steps": 1, "size": "64x70"}), "height")


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"size": "99999999999x99999999999"}, "size", "size 99999999999x99999999999 is too large"),
    ({"size": "1" + "0" * 5000 + "x64"}, "size", "is too large"),
    ({"size": "0" * 5000 + "64x64"}, None, None),  # leading zeros: 64x64, answered
    ({"quality": "q" * 65}, "quality", "must be at most 64 characters (got 65)"),
    ({"user": "u" * 257}, "user", "must be at most 256 characters (got 257)"),
    ({"aspect_ratio": "1:4", "width": 1024}, "aspect_ratio",
     "aspect_ratio 1:4 with width 1024 makes the height 4096, above the limit of 1024"),
    ({"aspect_ratio": "4:1", "height": 512}, "aspect_ratio", "makes the width 2048, above the limit of 1024"),
    ({"aspect_ratio": "4:1", "width": 128}, "aspect_ratio", "makes the height 32, below the minimum of 64"),
], ids=["size too large", "size of 5001 digits", "size with leading zeros", "quality too long",
        "user too long", "aspect_ratio height", "aspect_ratio width", "aspect_ratio below"])
def test_messages_name_what_the_client_sent(plain: InProcessServer, fields: dict[str, Any], param: str | None,
                                            says: str | None) -> None:
    resp = post(plain, {"model": MODEL, "prompt": "a fox", "steps": 1, **fields})
    if says is None:
        assert_image_ok(resp)
        return
    err = assert_invalid(resp, param)
    assert says in err["message"] and "items" not in err["message"] and "look like" not in err["message"], err


def test_expires_that_is_not_an_integer_is_named(plain: InProcessServer) -> None:
    err = assert_invalid(plain.client.get("/v1/files/x?expires=1e3&signature=a"), "expires")
    assert "integer" in err["message"]
    err = assert_invalid(plain.client.get("/v1/files/x?signature=a"), None)
    assert "needs its 'expires'" in err["message"]


@pytest.mark.parametrize(("content", "headers"), [
    (b"[1, 2, 3]", {"content-type": "application/json"}),
    (b'[{"prompt": "a fox"}]', {"content-type": "application/json"}),
    (b'"a fox"', {"content-type": "application/json"}),
    (b"null", {"content-type": "application/json"}),
    (b"42", {"content-type": "application/json"}),
    (b"not json at all", {"content-type": "application/json"}),
    (b'{"prompt": "a fox",', {"content-type": "application/json"}),
    (b"\xff\xfe\x00garbage", {"content-type": "application/json"}),
    (b'{"prompt": "a fox", "junk": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
     {"content-type": "application/json"}),
    (b"", {"content-type": "application/json"}),
    (b"", {"content-type": "application/json; charset=utf-8"}),
], ids=["array", "array of object", "string", "null", "number", "not json", "truncated json",
        "invalid utf-8", "nested too deep", "empty body", "empty body with charset"])
def test_body_that_is_not_a_json_object(plain: InProcessServer, content: bytes,
                                        headers: dict[str, str]) -> None:
    hdrs = dict(headers)
    resp = plain.client.post(GEN, content=content, headers=hdrs, timeout=60)
    err = assert_invalid(resp, None)
    assert "body" in err["message"]


# ------------------------------------------------------------------------ not implemented yet: 400


UNSUPPORTED_CASES: list[tuple[str, Any]] = [
    # The tiny FLUX has no Redux prior (image_url itself is served: see test_conditioning.py).
    ("reference_images", ["https://example.com/style.png"]),
]


@pytest.mark.parametrize(("field", "value"), UNSUPPORTED_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(UNSUPPORTED_CASES)])
def test_unsupported_field_is_refused_by_name(plain: InProcessServer, field: str, value: Any) -> None:
    err = assert_invalid(post(plain, gen_body(**{field: value})), field, code="unsupported_parameter")
    assert "not supported" in err["message"]


@pytest.mark.parametrize("fields", [
    {"disable_safety_checker": False},
    {"reference_images": []},
    {"image_loras": []},
    {"image_url": None, "reference_images": None, "image_loras": None, "disable_safety_checker": None},
    {"some_future_field": {"nested": [1, 2]}},
], ids=["safety checker false", "no reference images", "no loras", "all null", "unknown field ignored"])
def test_neutral_values_of_pending_fields_are_accepted(plain: InProcessServer,
                                                       fields: dict[str, Any]) -> None:
    assert_image_ok(post(plain, gen_body(seed=7, **fields)))


# ------------------------------------------------------------------------------- models and routes


def test_unknown_model_is_404_model_not_found(plain: InProcessServer) -> None:
    err = assert_error(post(plain, gen_body(model="acme/no-such-model")), 404,
                       param="model", code="model_not_found")
    assert "acme/no-such-model" in err["message"]
    assert MODEL in err["message"]  # names what is served


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/no/such/route"),
    ("POST", "/v1/no-such-endpoint"),
    ("GET", "/v1/images"),
    ("POST", "/v2/images/generations"),
    ("GET", "/v1/files/"),
])
def test_unknown_route_is_404_in_error_shape(plain: InProcessServer, method: str, path: str) -> None:
    resp = plain.client.request(method, path, json={} if method == "POST" else None, timeout=30)
    err = assert_error(resp, 404, param=None, code="not_found")
    assert path in err["message"]


@pytest.mark.parametrize("path", [GEN, "/images/generations", "/v1/v1/images/generations"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_wrong_method_is_405_in_error_shape(plain: InProcessServer, method: str, path: str) -> None:
    resp = plain.client.request(method, path, timeout=30)
    err = assert_error(resp, 405, param=None, code="method_not_allowed")
    assert method in err["message"]


def test_head_wherever_get_answers(plain: InProcessServer) -> None:
    """RFC 9110 §9.3.2: HEAD answers the GET's status and headers, without a body."""
    stored = post(plain, gen_body(seed=3, response_format="url"))
    assert stored.status_code == 200, stored.text
    url = httpx.URL(stored.json()["data"][0]["url"])
    signed = f"{url.path}?{url.query.decode()}"
    paths = ["/health", "/", "/ready", "/v1/models", "/models", f"/v1/models/{MODEL}", "/metrics",
             "/playground", "/openapi.json", "/docs", signed, "/v1/files/abc.jpeg", "/no/such/route", GEN]
    for path in paths:
        get, head = plain.client.get(path), plain.client.head(path)
        assert head.status_code == get.status_code, (path, head.status_code, get.status_code)
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
    assert plain.client.head(signed).headers["content-length"] == str(len(plain.client.get(signed).content))
    assert plain.client.head(GEN).headers["allow"] == "POST"


def test_api_docs_are_counted_by_their_route(plain: InProcessServer) -> None:
    for path in ("/openapi.json", "/docs", "/docs/assets/no-such-file.css"):
        plain.client.get(path)
    scraped = plain.client.get("/metrics").text
    for route, status in (("/openapi.json", 200), ("/docs", 200), ("/docs/assets", 404)):
        assert f'darkroom_requests_total{{model="",route="{route}",status="{status}"}}' in scraped, route


@pytest.mark.parametrize("path", ["/v1/images/generations", "/images/generations",
                                  "/v1/v1/images/generations"])
def test_every_generation_path_works(plain: InProcessServer, path: str) -> None:
    assert_image_ok(post(plain, gen_body(seed=3), path=path))


def test_stored_file_without_signature_is_400_and_bad_signature_is_refused(plain: InProcessServer) -> None:
    assert_error(plain.client.get("/v1/files/abc.jpeg", timeout=30), 400, code="invalid_request")
    resp = plain.client.get("/v1/files/abc.jpeg?expires=99999999999&signature=00", timeout=30)
    assert resp.status_code in (403, 404)
    assert_error(resp, resp.status_code)


# ------------------------------------------------------------------------------- body too big: 413


def test_body_over_default_limit_is_413(plain: InProcessServer) -> None:
    body = json.dumps(gen_body(prompt="z" * 1_100_000)).encode()
    err = assert_error(post(plain, content=body, headers={"content-type": "application/json"}), 413,
                       param=None, code="payload_too_large")
    assert "1000000" in err["message"]


def test_chunked_body_over_limit_is_413(plain: InProcessServer) -> None:
    """No content-length: the server counts while it reads."""
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(120):
            yield b"z" * 10_000
        yield b'"}'

    resp = post(plain, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert_error(resp, 413, code="payload_too_large")


def test_configured_body_limit(strict: InProcessServer) -> None:
    big = json.dumps(gen_body(negative_prompt="q" * STRICT_BODY_BYTES)).encode()
    assert len(big) > STRICT_BODY_BYTES
    err = assert_error(post(strict, content=big, key=KEY, headers={"content-type": "application/json"}),
                       413, code="payload_too_large")
    assert str(STRICT_BODY_BYTES) in err["message"]
    # Under the byte limit, the same server answers on the merits.
    assert_image_ok(post(strict, gen_body(prompt="p" * STRICT_PROMPT_CHARS), key=KEY))


def test_configured_prompt_limit(strict: InProcessServer) -> None:
    err = assert_invalid(post(strict, gen_body(prompt="p" * (STRICT_PROMPT_CHARS + 1)), key=KEY), "prompt")
    assert str(STRICT_PROMPT_CHARS) in err["message"]
    assert_invalid(post(strict, gen_body(negative_prompt="n" * (STRICT_PROMPT_CHARS + 1)), key=KEY),
                   "negative_prompt")
    models = strict.client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    assert models.status_code == 200
    [card] = models.json()["data"]
    assert card["limits"]["max_prompt_chars"] == STRICT_PROMPT_CHARS


# ------------------------------------------------------------------------------------------ auth


@pytest.mark.parametrize("headers", [
    {},
    {"authorization": "Bearer wrong-key"},
    {"authorization": "Bearer secret-key-but-longer"},
    {"authorization": "Bearer"},
    {"authorization": "Basic secret-key"},
    {"authorization": "secret-key"},
    {"x-api-key": KEY},
], ids=["no header", "wrong key", "key prefix", "empty bearer", "basic scheme", "no scheme",
        "other header"])
def test_missing_or_wrong_key_is_401(strict: InProcessServer, headers: dict[str, str]) -> None:
    resp = strict.client.post(GEN, json=gen_body(), headers=headers, timeout=30)
    assert_error(resp, 401, param=None, code="invalid_api_key", type_="authentication_error")


def test_key_is_checked_before_the_body(strict: InProcessServer) -> None:
    resp = strict.client.post(GEN, content=b"not json", headers={"authorization": "Bearer nope"},
                      timeout=30)
    assert_error(resp, 401, code="invalid_api_key")
    resp = strict.client.post(GEN, json=gen_body(model="acme/secret-model"), timeout=30)
    assert_error(resp, 401, code="invalid_api_key")


def test_right_key_is_200(strict: InProcessServer) -> None:
    assert_image_ok(post(strict, gen_body(seed=1), key=KEY))
    assert_image_ok(post(strict, gen_body(seed=1), key=KEY, path="/images/generations"))
    # The scheme is case-insensitive.
    assert_image_ok(post(strict, gen_body(seed=1), headers={"authorization": f"bearer {KEY}"}))


def test_health_and_ready_need_no_key(strict: InProcessServer) -> None:
    assert strict.client.get("/health", timeout=30).status_code == 200
    ready = strict.client.get("/ready", timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True


@pytest.mark.parametrize("path", ["/v1/models", "/models"])
def test_models_need_the_key(strict: InProcessServer, path: str) -> None:
    assert_error(strict.client.get(path, timeout=30), 401, code="invalid_api_key")
    assert_error(strict.client.get(path, headers={"authorization": "Bearer wrong"}, timeout=30),
                 401, code="invalid_api_key")
    resp = strict.client.get(path, headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    assert resp.status_code == 200
    assert [m["id"] for m in resp.json()["data"]] == [MODEL]


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer anything-at-all"},
                                     {"authorization": f"Bearer {KEY}"}])
def test_without_configured_keys_any_key_works(plain: InProcessServer, headers: dict[str, str]) -> None:
    assert_image_ok(plain.client.post(GEN, json=gen_body(seed=2), headers=headers, timeout=120))
    assert plain.client.get("/v1/models", headers=headers, timeout=30).status_code == 200


# ------------------------------------------------------------------------- SDK exception classes

# (id, raw body fields, together 3.x kwargs, openai kwargs, status, param, code)
SDK_CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], int, str | None, str]] = [
    ("steps 0", {"steps": 0},
     {"steps": 0, "width": 64, "height": 64},
     {"size": "64x64", "extra_body": {"steps": 0}}, 400, "steps", "invalid_request"),
    ("n too many", {"n": 5},
     {"n": 5, "steps": 1, "width": 64, "height": 64},
     {"n": 5, "size": "64x64", "extra_body": {"steps": 1}}, 400, "n", "invalid_request"),
    ("width not multiple", {"width": 100},
     {"steps": 1, "width": 100, "height": 64},
     {"size": "100x64", "extra_body": {"steps": 1}}, 400, "width", "invalid_request"),
    ("image_url", {"image_url": "http://169.254.169.254/latest/", "steps": 2},
     {"steps": 2, "width": 64, "height": 64, "image_url": "http://169.254.169.254/latest/"},
     {"size": "64x64", "extra_body": {"steps": 2, "image_url": "http://169.254.169.254/latest/"}},
     400, "image_url", "url_not_allowed"),
    ("disable_safety_checker", {"disable_safety_checker": True},
     {"steps": 1, "width": 64, "height": 64, "disable_safety_checker": True},
     {"size": "64x64", "extra_body": {"steps": 1, "disable_safety_checker": True}},
     403, "disable_safety_checker", "safety_checker_required"),
    ("unknown model", {"model": "acme/no-such-model"},
     {"steps": 1, "width": 64, "height": 64, "model": "acme/no-such-model"},
     {"size": "64x64", "model": "acme/no-such-model", "extra_body": {"steps": 1}},
     404, "model", "model_not_found"),
]
SDK_IDS = [c[0] for c in SDK_CASES]

T3_CLASSES = {400: together.BadRequestError, 401: together.AuthenticationError,
              403: together.PermissionDeniedError, 404: together.NotFoundError,
              429: together.RateLimitError}
OPENAI_CLASSES = {400: openai.BadRequestError, 401: openai.AuthenticationError,
                  403: openai.PermissionDeniedError, 404: openai.NotFoundError,
                  429: openai.RateLimitError}
T1_CLASSES = {400: "InvalidRequestError", 403: "InvalidRequestError", 404: "InvalidRequestError",
              401: "AuthenticationError",
              429: "RateLimitError"}


def server_message(server: InProcessServer, fields: dict[str, Any], key: str | None = None) -> str:
    """What the server itself says to a raw request with these fields."""
    resp = post(server, gen_body(**fields), key=key)
    return assert_error(resp, resp.status_code)["message"]


def check_sdk_error(exc: BaseException, status: int, message: str, param: str | None,
                    code: str | None) -> None:
    assert getattr(exc, "status_code") == status
    assert message in str(exc), (message, str(exc))
    body = getattr(exc, "body")
    assert isinstance(body, dict)
    # openai hands back the inner error object; together 3.x may hand back the whole envelope.
    err = body.get("error", body)
    assert err["message"] == message
    assert err["param"] == param and err["code"] == code
    assert "detail" not in body


@pytest.mark.parametrize(("fields", "t3_kwargs", "status", "param", "code"),
                         [(c[1], c[2], c[4], c[5], c[6]) for c in SDK_CASES], ids=SDK_IDS)
def test_together3_exception_classes(plain: InProcessServer, fields: dict[str, Any],
                                     t3_kwargs: dict[str, Any],
                                     status: int, param: str | None, code: str) -> None:
    message = server_message(plain, fields)
    kwargs = {"model": MODEL, "prompt": "a red fox", **t3_kwargs}
    with pytest.raises(T3_CLASSES[status]) as info:
        together3(plain).images.generate(**kwargs)
    check_sdk_error(info.value, status, message, param, code)


@pytest.mark.parametrize(("fields", "oa_kwargs", "status", "param", "code"),
                         [(c[1], c[3], c[4], c[5], c[6]) for c in SDK_CASES], ids=SDK_IDS)
def test_openai_exception_classes(plain: InProcessServer, fields: dict[str, Any], oa_kwargs: dict[str, Any],
                                  status: int, param: str | None, code: str) -> None:
    message = server_message(plain, fields)
    kwargs = {"model": MODEL, "prompt": "a red fox", "response_format": "b64_json", **oa_kwargs}
    with pytest.raises(OPENAI_CLASSES[status]) as info:
        openai_client(plain).images.generate(**kwargs)
    check_sdk_error(info.value, status, message, param, code)
    assert info.value.param == param and info.value.code == code


@pytest.fixture(scope="module")
def together1_results(strict_served: InProcessServer) -> dict[str, dict[str, Any]]:
    """Every SDK case through together 1.x in one subprocess (its import is slow)."""
    calls = [t1_call(**c[1]) for c in SDK_CASES] + [t1_call(seed=5)]
    results = run_together1(strict_served, calls, key=KEY)
    return {name: attempts[0] for name, attempts in zip([*SDK_IDS, "ok"], results, strict=True)}


@pytest.mark.parametrize(("case_id", "fields", "status"), [(c[0], c[1], c[4]) for c in SDK_CASES],
                         ids=SDK_IDS)
def test_together1_exception_classes(plain: InProcessServer, together1_results: dict[str, dict[str, Any]],
                                     case_id: str, fields: dict[str, Any], status: int) -> None:
    result = together1_results[case_id]
    assert result["ok"] is False, result
    assert result["module"] == "together.error"
    assert result["cls"] == T1_CLASSES[status], result
    assert result["status"] == status
    assert server_message(plain, fields) in result["message"]


def test_together1_succeeds_against_the_same_server(together1_results: dict[str, dict[str, Any]]) -> None:
    assert together1_results["ok"] == {"ok": True, "images": 1}


def test_sdks_authentication_errors(strict_served: InProcessServer) -> None:
    message = server_message(strict_served, {}, key="wrong-key")
    kwargs = {"model": MODEL, "prompt": "a red fox", "steps": 1, "width": 64, "height": 64}

    with pytest.raises(together.AuthenticationError) as t3:
        together3(strict_served, "wrong-key").images.generate(**kwargs)
    check_sdk_error(t3.value, 401, message, None, "invalid_api_key")

    with pytest.raises(openai.AuthenticationError) as oa:
        openai_client(strict_served, "wrong-key").images.generate(
            model=MODEL, prompt="a red fox", size="64x64", response_format="b64_json",
            extra_body={"steps": 1})
    check_sdk_error(oa.value, 401, message, None, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai_client(strict_served, "wrong-key").models.list()

    [[wrong], [right]] = run_together1(strict_served, [t1_call(), t1_call(__api_key=KEY)], key="wrong-key")
    assert wrong["ok"] is False and wrong["cls"] == "AuthenticationError", wrong
    assert wrong["module"] == "together.error" and message in wrong["message"]
    assert right == {"ok": True, "images": 1}

    # The right key through the 3.x and openai clients.
    image = together3(strict_served, KEY).images.generate(**kwargs, response_format="base64")
    assert len(image.data) == 1
    assert len(openai_client(strict_served, KEY).models.list().data) == 1


def test_sdks_any_key_without_configured_keys(plain: InProcessServer) -> None:
    kwargs = {"model": MODEL, "prompt": "a red fox", "steps": 1, "width": 64, "height": 64}
    assert len(together3(plain, "whatever").images.generate(**kwargs, response_format="base64").data) == 1
    resp = openai_client(plain, "whatever").images.generate(
        model=MODEL, prompt="a red fox", size="64x64", response_format="b64_json", extra_body={"steps": 1})
    assert resp.data[0].b64_json


# ------------------------------------------------------------------------------- 503: overloaded


class Feeder:
    """Threads that keep posting heavy jobs, so the strict server's one-job queue stays full."""

    def __init__(self, server: InProcessServer, threads: int = 3) -> None:
        self.server = server
        self.stop = threading.Event()
        self.responses: list[httpx.Response] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        seed = index * 1000
        with httpx.Client(timeout=300, headers={"authorization": f"Bearer {KEY}"}) as client:
            while not self.stop.is_set():
                seed += 1
                try:
                    resp = client.post(self.server.url + GEN,
                                       json={"model": MODEL, "prompt": "blocker", "seed": seed, **HEAVY})
                except BaseException as exc:  # noqa: BLE001 - reported by the test
                    with self._lock:
                        self.errors.append(exc)
                    return
                with self._lock:
                    self.responses.append(resp)
                if resp.status_code == 503:
                    self.stop.wait(0.05)

    def __enter__(self) -> Feeder:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(300)

    def wait_until_full(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if httpx.get(self.server.url + "/ready", timeout=30).json()["queue_depth"] >= 1:
                return
            time.sleep(0.02)
        raise AssertionError("the queue never filled")


def until_refused(feeder: Feeder, call: Callable[[], Any], exc_type: type[BaseException],
                       attempts: int = 8) -> Any:
    """Call while the queue is full until the call is refused; an admitted call just runs."""
    for _ in range(attempts):
        feeder.wait_until_full()
        try:
            call()
        except exc_type as exc:
            return exc
    raise AssertionError(f"no {exc_type.__name__} in {attempts} tries against a full queue")


def test_full_queue_is_503_overload_for_raw_http_and_every_sdk(strict_served: InProcessServer) -> None:
    """A full queue is overload (503 with retry-after, as Together answers an overloaded engine), not a
    rate limit (429 stays for per-key limits): together 1.x raises ServiceUnavailableError, 3.x and openai
    InternalServerError; each would retry it (max_retries=0 here) after retry-after."""
    small = {"model": MODEL, "prompt": "late", "steps": 1, "width": 64, "height": 64}
    with Feeder(strict_served) as feeder:
        feeder.wait_until_full()
        raw = until_refused(
            feeder, lambda: post(strict_served, small, key=KEY).raise_for_status(), httpx.HTTPStatusError)
        t3 = until_refused(
            feeder, lambda: together3(strict_served, KEY).images.generate(**small, response_format="base64"),
            together.InternalServerError)
        oa = until_refused(
            feeder, lambda: openai_client(strict_served, KEY).images.generate(
                model=MODEL, prompt="late", size="64x64", response_format="b64_json",
                extra_body={"steps": 1}),
            openai.InternalServerError)
        feeder.wait_until_full()
        [t1_attempts] = run_together1(strict_served, [t1_call(prompt="late")], key=KEY, attempts=8,
                                      until="ServiceUnavailableError")

    assert not feeder.errors, feeder.errors
    statuses = [r.status_code for r in feeder.responses]
    assert 503 in statuses and 200 in statuses, statuses
    assert set(statuses) <= {200, 503}, statuses

    refused = [r for r in feeder.responses if r.status_code == 503]
    for resp in [*refused, raw.response]:
        err = assert_error(resp, 503, param=None, code="queue_full", type_="service_unavailable")
        assert "queue is full" in err["message"]
        assert resp.headers["retry-after"] == "1"
        assert resp.headers["x-should-retry"] == "true"
    for resp in feeder.responses:
        if resp.status_code == 200:
            assert_image_ok(resp, size=HEAVY["width"])
    message = raw.response.json()["error"]["message"]

    check_sdk_error(t3, 503, message, None, "queue_full")
    assert t3.response.headers["retry-after"] == "1"
    check_sdk_error(oa, 503, message, None, "queue_full")
    assert oa.response.headers["retry-after"] == "1"

    last = t1_attempts[-1]
    assert last["ok"] is False and last["cls"] == "ServiceUnavailableError", t1_attempts
    # 1.x raises its own message for any 503 ("The server is overloaded or not ready yet.").
    assert last["module"] == "together.error" and last["status"] == 503 and "overloaded" in last["message"]

    # Healthy afterwards: a normal request is served and the queue is empty again.
    assert_image_ok(post(strict_served, {**small, "prompt": "after the rush", "seed": 9}, key=KEY))
    ready = httpx.get(strict_served.url + "/ready", timeout=30)
    assert ready.status_code == 200 and ready.json() == {**ready.json(), "ready": True, "queue_depth": 0}
    assert all(worker.alive and not worker.failed for worker in strict_served.runtime.workers)


# ------------------------------------------------------------------------------ after the abuse


def test_plain_server_still_serves_after_all_bad_input(plain: InProcessServer) -> None:
    resp = post(plain, gen_body(prompt="still standing", seed=11, steps=2, width=96, height=64,
                                output_format="png"))
    [image] = images_of(resp)
    assert image.format == "PNG" and image.size == (96, 64)
    assert resp.json()["data"][0]["seed"] == 11
    assert all(worker.alive and not worker.failed for worker in plain.runtime.workers)
    log = plain.log()
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]
