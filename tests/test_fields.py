"""Every request field changes the output as it should, and the same request gives the same bytes.

In-process: the app and the real tiny engine run in the test process (tests/support/inprocess.py).
"""

from __future__ import annotations

import base64
import io

from PIL import Image

from .conftest import images_of, mean_abs_diff
from .support.inprocess import InProcessServer

BASE = {"prompt": "a red bicycle", "width": 64, "height": 64, "steps": 2, "seed": 42,
        "response_format": "base64", "output_format": "png"}
VISIBLE = 2.0  # mean absolute difference (0..255) that counts as a visibly different image


def one(app: InProcessServer, **changes: object) -> Image.Image:
    (image,) = images_of(app.generate(**{**BASE, **changes}))
    return image


def test_same_seed_same_bytes(app: InProcessServer) -> None:
    first = app.generate(**BASE).json()["data"][0]["b64_json"]
    second = app.generate(**BASE).json()["data"][0]["b64_json"]
    assert first == second


def test_each_field_changes_the_image(app: InProcessServer) -> None:
    reference = one(app)
    for change in (
        {"seed": 43},
        {"prompt": "a blue whale"},
        {"steps": 3},
        {"guidance_scale": 9.0},
        {"negative_prompt": "blurry"},
    ):
        assert mean_abs_diff(reference, one(app, **change)) > VISIBLE, change


def test_negative_prompt_content_matters(app: InProcessServer) -> None:
    """True CFG uses the negative prompt's text, not only its presence."""
    assert mean_abs_diff(one(app, negative_prompt="blurry"), one(app, negative_prompt="sharp")) > 0.5


def test_n_images_use_seed_plus_i(app: InProcessServer) -> None:
    response = app.generate(**{**BASE, "n": 3})
    images = images_of(response)
    assert [d["seed"] for d in response.json()["data"]] == [42, 43, 44]
    assert [d["index"] for d in response.json()["data"]] == [0, 1, 2]
    assert mean_abs_diff(images[0], images[1]) > VISIBLE
    # The i-th image of a request is the image a lone request with seed + i gives.
    assert mean_abs_diff(images[2], one(app, seed=44)) < 1.0


def test_random_seed_is_reported_and_reproduces(app: InProcessServer) -> None:
    body = {k: v for k, v in BASE.items() if k != "seed"}
    first = app.generate(**body).json()["data"][0]
    second = app.generate(**body).json()["data"][0]
    assert first["seed"] != second["seed"]
    again = app.generate(**{**body, "seed": first["seed"]}).json()["data"][0]
    assert again["b64_json"] == first["b64_json"]


def test_width_and_height(app: InProcessServer) -> None:
    for width, height in ((64, 128), (128, 64), (96, 64)):
        assert one(app, width=width, height=height).size == (width, height)


def test_openai_size_field(app: InProcessServer) -> None:
    body = {k: v for k, v in BASE.items() if k not in ("width", "height")}
    (image,) = images_of(app.generate(**body, size="80x64"))
    assert image.size == (80, 64)


def test_output_formats_are_real(app: InProcessServer) -> None:
    for fmt, pil_name in (("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")):
        assert one(app, output_format=fmt).format == pil_name
    raw = app.generate(**{**BASE, "output_format": "jpeg"}).json()["data"][0]["b64_json"]
    assert base64.b64decode(raw)[:3] == b"\xff\xd8\xff"
    raw = app.generate(**BASE).json()["data"][0]["b64_json"]
    assert base64.b64decode(raw)[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_output_format_is_jpeg(app: InProcessServer) -> None:
    body = {k: v for k, v in BASE.items() if k != "output_format"}
    (image,) = images_of(app.generate(**body))
    assert image.format == "JPEG"


def test_model_defaults_apply(app: InProcessServer) -> None:
    """Without steps the manifest's default (4) runs; without a size, its default size."""
    implicit = one(app, steps=None)
    assert mean_abs_diff(implicit, one(app, steps=4)) == 0
    body = {k: v for k, v in BASE.items() if k not in ("width", "height", "steps")}
    (image,) = images_of(app.generate(**body, steps=1))
    assert image.size == (512, 512)


def test_model_alias_and_default_model(app: InProcessServer) -> None:
    by_alias = app.generate(**BASE, model="tiny-flux")
    assert by_alias.json()["model"] == "darkroom/tiny-flux"
    default = app.generate(**BASE, model=None)
    assert default.json()["model"] == "darkroom/tiny-flux"
    assert by_alias.json()["data"][0]["b64_json"] == default.json()["data"][0]["b64_json"]


def test_unknown_fields_are_ignored(app: InProcessServer) -> None:
    response = app.generate(**BASE, style="vivid", user="someone", quality="hd", something_new=[1, 2])
    assert response.status_code == 200
    assert response.json()["data"][0]["b64_json"] == app.generate(**BASE).json()["data"][0]["b64_json"]


def test_response_shape(app: InProcessServer) -> None:
    body = app.generate(**BASE).json()
    assert body["object"] == "list"
    assert body["id"].startswith("img-")
    assert isinstance(body["created"], int)
    assert set(body["data"][0]) >= {"index", "type", "b64_json", "seed"}
    assert body["data"][0]["type"] == "b64_json"
    Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).verify()
