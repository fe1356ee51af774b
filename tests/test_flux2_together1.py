"""The FLUX.2 and FLUX.1 Canny/Depth tiny models through together 1.x (its own venv, so the app is served on
a loopback port): reference images and control images pass through as keyword arguments, and a bad request
is the client's InvalidRequestError naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import run_together1
from .image_origin import ImageOrigin
from .support.inprocess import InProcessServer

MODELS = ["darkroom/tiny-flux2", "darkroom/tiny-flux2-klein", "darkroom/tiny-flux-canny",
          "darkroom/tiny-flux-depth"]
CALL = {"prompt": "a red bicycle", "width": 64, "height": 64, "steps": 2, "seed": 7,
        "response_format": "base64"}


@pytest.fixture(scope="module")
def origin() -> Iterator[ImageOrigin]:
    with ImageOrigin() as server:
        yield server


@pytest.fixture(scope="module")
def server(make_app: Any) -> InProcessServer:
    return make_app({"models": MODELS, "fetch": {"allow_hosts": ["127.0.0.1"]},
                        "server": {"default_response_format": "base64"}}, listen=True)


def test_together1_serves_the_new_families(server: InProcessServer, origin: ImageOrigin) -> None:
    refs = [origin.url("/gradient.png"), origin.url("/checker.jpg")]
    photo = origin.url("/checker.jpg")
    results = run_together1(server, [
        {**CALL, "model": "darkroom/tiny-flux2", "reference_images": refs, "n": 2},
        {**CALL, "model": "darkroom/tiny-flux2-klein", "reference_images": refs[:1],
         "negative_prompt": "fog"},
        {**CALL, "model": "darkroom/tiny-flux2", "image_url": photo},
        {**CALL, "model": "darkroom/tiny-flux-canny", "image_url": photo},
        {**CALL, "model": "darkroom/tiny-flux-depth", "image_url": photo},
        # Bad input: each a 400, which 1.x raises as InvalidRequestError with the server's message.
        {**CALL, "model": "darkroom/tiny-flux2", "reference_images": refs * 4},
        {**CALL, "model": "darkroom/tiny-flux-depth", "image_url": photo, "reference_images": refs},
        {**CALL, "model": "darkroom/tiny-flux-canny"},
        {**CALL, "model": "darkroom/tiny-flux2", "negative_prompt": "fog"},
    ])
    assert [r[0].get("images") for r in results[:5]] == [2, 1, 1, 1, 1], results
    for attempts, field in zip(results[5:], ["reference_images", "reference_images", "image_url",
                                             "negative_prompt"]):
        (attempt,) = attempts
        assert not attempt["ok"] and attempt["cls"] == "InvalidRequestError", attempt
        assert attempt["status"] == 400 and f"'{field}'" in attempt["message"], attempt
