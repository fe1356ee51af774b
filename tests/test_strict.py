"""Strict request fields (issue 12, items 3a and 6): every text field is valid Unicode without NUL, strings
are not numbers, only JSON booleans are booleans, an empty URL is an error, and only a JSON body reaches
the generation path (415 otherwise) — while everything the official SDKs send is still accepted.

In-process with the stand-in engine: a refused request never reaches it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from .conftest import MODEL, openai_client, together3
from .support.inprocess import InProcessServer

GEN = "/v1/images/generations"
BASE: dict[str, Any] = {"model": MODEL, "prompt": "a red fox", "width": 64, "height": 64, "steps": 1}


@pytest.fixture(scope="module")
def plain(make_app: Any) -> InProcessServer:
    return make_app({"server": {"default_response_format": "base64"},
                     "loras": {"registered": {"house-style": "/nonexistent.safetensors"}}}, engine="stand-in")


def post_raw(server: InProcessServer, body: dict[str, Any], ctype: str = "application/json") -> Any:
    """The body as JSON text with \\u escapes (so lone surrogates travel as JSON allows them)."""
    return server.client.post(GEN, content=json.dumps(body), headers={"content-type": ctype})


def assert_400(response: Any, param: str) -> str:
    assert response.status_code == 400, response.text
    err = response.json()["error"]
    assert err["param"] == param and param in err["message"], err
    return err["message"]


def calls(server: InProcessServer) -> int:
    return sum(len(batch) for batch in server.engines[0].calls)


# -- 3a: every text field alike ------------------------------------------------------------------------

# (field path, body fragment with {bad} where the bad text goes, param)
TEXT_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("prompt", {"prompt": "a {bad} fox"}, "prompt"),
    ("negative_prompt", {"negative_prompt": "{bad}"}, "negative_prompt"),
    ("model", {"model": "{bad}"}, "model"),
    ("size", {"size": "64x64{bad}"}, "size"),
    ("aspect_ratio", {"aspect_ratio": "1:1{bad}"}, "aspect_ratio"),
    ("response_format", {"response_format": "url{bad}"}, "response_format"),
    ("output_format", {"output_format": "png{bad}"}, "output_format"),
    ("image_url", {"image_url": "https://example.com/{bad}.png"}, "image_url"),
    ("reference_images", {"reference_images": ["https://example.com/{bad}.png"]}, "reference_images"),
    ("image_loras.path", {"image_loras": [{"path": "https://example.com/{bad}.safetensors"}]}, "image_loras"),
    ("image_base64", {"image_base64": "aGk{bad}"}, "image_base64"),
    ("user", {"user": "{bad}"}, "user"),
    ("safety_identifier", {"safety_identifier": "{bad}"}, "safety_identifier"),
    ("quality", {"quality": "hd{bad}"}, "quality"),
    ("style", {"style": "{bad}"}, "style"),
    ("moderation", {"moderation": "{bad}"}, "moderation"),
]


def _with_bad(fragment: Any, bad: str) -> Any:
    if isinstance(fragment, str):
        return fragment.replace("{bad}", bad)
    if isinstance(fragment, list):
        return [_with_bad(item, bad) for item in fragment]
    return {key: _with_bad(value, bad) for key, value in fragment.items()}


@pytest.mark.parametrize("bad", ["\ud800", "\udfff", "\x00"], ids=["high surrogate", "low surrogate", "NUL"])
@pytest.mark.parametrize(("fragment", "param"), [(f[1], f[2]) for f in TEXT_FIELDS],
                         ids=[f[0] for f in TEXT_FIELDS])
def test_every_text_field_refuses_invalid_text(plain: InProcessServer, fragment: dict[str, Any], param: str,
                                               bad: str) -> None:
    before = calls(plain)
    message = assert_400(post_raw(plain, {**BASE, **_with_bad(fragment, bad)}), param)
    assert ("surrogate" in message) if bad != "\x00" else ("NUL" in message)
    assert calls(plain) == before


def test_reported_negative_prompt_surrogate(plain: InProcessServer) -> None:
    """The reported input: a lone surrogate in negative_prompt reached the tokenizer and failed the batch."""
    raw = b'{"model": "darkroom/tiny-flux", "prompt": "a fox", "steps": 1, "width": 64, "height": 64, ' \
          b'"negative_prompt": "\\ud800"}'
    response = plain.client.post(GEN, content=raw, headers={"content-type": "application/json"})
    assert "lone surrogate \\ud800" in assert_400(response, "negative_prompt")
    # Text that is valid Unicode, emoji and newlines included, is fine.
    assert post_raw(plain, {**BASE, "negative_prompt": "blurry \U0001f600\nlow quality"}).status_code == 200


# -- 6: strict types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param"), [
    ({"guidance_scale": "5"}, "guidance_scale"),
    ({"guidance_scale": True}, "guidance_scale"),
    ({"steps": "4"}, "steps"),
    ({"steps": 4.0}, "steps"),
    ({"steps": True}, "steps"),
    ({"n": "1"}, "n"),
    ({"seed": "7"}, "seed"),
    ({"width": 64.0}, "width"),
    ({"disable_safety_checker": "false"}, "disable_safety_checker"),
    ({"disable_safety_checker": 0}, "disable_safety_checker"),
    ({"image_url": ""}, "image_url"),
    ({"image_url": "   "}, "image_url"),
    ({"reference_images": [""]}, "reference_images"),
    ({"image_loras": [{"path": "house-style", "scale": "1"}]}, "image_loras"),
    ({"image_loras": [{"path": 5}]}, "image_loras"),
    ({"output_compression": "50"}, "output_compression"),
    ({"stream": "false"}, "stream"),
    ({"prompt": 5}, "prompt"),
    ({"size": 64}, "size"),
])
def test_strict_types(plain: InProcessServer, fields: dict[str, Any], param: str) -> None:
    assert_400(post_raw(plain, {**BASE, **fields}), param)


@pytest.mark.parametrize(("content_type", "body"), [
    ("text/plain", json.dumps(BASE)),  # what a browser may post cross-site with no preflight
    ("text/plain;charset=UTF-8", json.dumps(BASE)),
    ("application/x-www-form-urlencoded", "prompt=a+fox"),
    ("multipart/form-data; boundary=x", "--x--"),
    (None, json.dumps(BASE)),
])
def test_a_body_that_is_not_json_is_415(plain: InProcessServer, content_type: str | None, body: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = plain.client.post(GEN, content=body, headers=headers)
    assert response.status_code == 415, response.text
    err = response.json()["error"]
    assert err == {**err, "type": "invalid_request_error", "code": "unsupported_media_type", "param": None}
    assert "application/json" in err["message"]


def test_json_content_types_are_accepted(plain: InProcessServer) -> None:
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON",
                  "application/vnd.api+json"):
        assert post_raw(plain, BASE, ctype).status_code == 200, ctype


def test_what_the_sdks_send_is_still_accepted(plain: InProcessServer) -> None:
    """Every typed argument of together 3.x and openai, with the Python values users pass (ints for floats,
    False for booleans), and the fields openai sends."""
    before = calls(plain)
    together3(plain).images.generate(
        model=MODEL, prompt="a", width=64, height=64, steps=2, n=2, seed=3, guidance_scale=5,
        negative_prompt="blur", output_format="png", response_format="base64", disable_safety_checker=False,
        reference_images=[], image_loras=[], image_url=None)  # type: ignore[arg-type]
    openai_client(plain).images.generate(
        model=MODEL, prompt="a", n=1, size="64x64", response_format="b64_json", output_format="webp",
        output_compression=80, quality="auto", style="natural", background="auto", moderation="auto",
        user="u", stream=False, partial_images=0, extra_body={"steps": 1, "guidance_scale": 3.5, "seed": 0})
    assert calls(plain) == before + 2
