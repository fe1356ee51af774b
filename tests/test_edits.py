"""``POST /v1/images/edits``: openai's ``client.images.edit`` (multipart), its limits and its errors.

In-process: the stand-in engine (what reached it is recorded) and the tiny engine (real edits); curl against
a real process is in tests/test_clients.py.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from PIL import Image

from .conftest import MODEL, REPO, decode_image, openai_client
from .image_origin import png_bomb
from .support.inprocess import InProcessServer

KONTEXT = "darkroom/tiny-flux-kontext"
EDITS = "/v1/images/edits"


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def standin(make_app: Any) -> InProcessServer:
    return make_app({"server": {"default_response_format": "base64"}, "models": [KONTEXT, MODEL],
                     "uploads": {"max_bytes": 400_000, "max_parts": 12, "max_field_bytes": 20_000},
                     "fetch": {"max_bytes": 200_000, "max_pixels": 1_000_000}},
                    engine="stand-in")


def last_call(server: InProcessServer) -> Any:
    return server.engines[0].calls[-1][-1]


def post_form(server: InProcessServer, data: dict[str, Any] | None = None,
              files: list[tuple[str, tuple[str, bytes, str]]] | None = None, **kwargs: Any) -> httpx.Response:
    files = files or [("image", ("a.png", png(64, 64), "image/png"))]
    return server.client.post(EDITS, data=data or {}, files=files, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    return err


# -- through openai ---------------------------------------------------------------------------------------


def test_openai_edit_on_kontext(standin: InProcessServer) -> None:
    response = openai_client(standin).images.edit(
        image=("photo.png", png(96, 64), "image/png"), prompt="make it blue", model=KONTEXT, n=2,
        size="64x64", response_format="b64_json", output_format="png", extra_body={"steps": 1, "seed": 5})
    images = [decode_image(item.b64_json) for item in response.data]
    assert [(i.format, i.size) for i in images] == [("PNG", (64, 64))] * 2
    params = last_call(standin)
    assert params.conditioning == "kontext" and params.seeds == (5, 6) and params.steps == 1
    assert params.image is not None and params.image.to_pil().getpixel((32, 32)) == (200, 30, 30)


def test_openai_edit_several_images_and_default_model(standin: InProcessServer) -> None:
    """Several images: the first is edited, the others are references. Without ``model``, the first served
    model that edits (Kontext here)."""
    response = openai_client(standin).images.edit(
        image=[("a.png", png(64, 64), "image/png"),
               ("b.jpg", png(80, 64, (0, 0, 250), "JPEG"), "image/jpeg")],
        prompt="put b in a", size="64x64", response_format="b64_json", extra_body={"steps": 1})
    assert len(response.data) == 1
    params = last_call(standin)
    assert params.model == KONTEXT and len(params.references) == 1
    assert params.references[0].to_pil().getpixel((10, 10))[2] > 200


def test_openai_edit_img2img_model_and_aspect_ratio(standin: InProcessServer) -> None:
    response = openai_client(standin).images.edit(
        image=("a.png", png(300, 200), "image/png"), prompt="a", model=MODEL, response_format="b64_json",
        extra_body={"steps": 2, "aspect_ratio": "match_input_image"})
    w, h = decode_image(response.data[0].b64_json).size
    assert abs(w / h - 1.5) < 0.05 and last_call(standin).conditioning == "img2img"


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"mask": ("m.png", png(64, 64), "image/png")}, "mask"),
    ({"image": ("a.txt", b"not an image at all", "text/plain")}, "image"),
    ({"image": ("bomb.png", png_bomb(5000, 5000), "image/png")}, "image"),
    ({"image": ("big.bmp", png(320, 220, fmt="BMP"), "image/bmp")}, "image"),  # over fetch.max_bytes
    ({"image": [("a.png", png(64, 64), "image/png")] * 5}, "image"),  # Kontext takes 1 + 3 here
    ({"background": "transparent"}, "background"),
    ({"n": 9}, "n"),
    ({"model": "acme/none"}, "model"),
    ({"extra_body": {"image_url": "https://example.com/a.png"}}, "image_url"),
    ({"extra_body": {"steps": "many"}}, "steps"),
])
def test_openai_edit_errors_name_the_field(standin: InProcessServer, kwargs: dict[str, Any],
                                           param: str) -> None:
    call = {"image": ("a.png", png(64, 64), "image/png"), "prompt": "a", "size": "64x64",
            "response_format": "b64_json", **kwargs}
    call["extra_body"] = {"steps": 1, **call.get("extra_body", {})}
    with pytest.raises(openai.APIStatusError) as info:
        openai_client(standin).images.edit(**call)
    assert info.value.status_code in (400, 404, 413), info.value
    assert info.value.param == param, info.value.body


def test_a_model_that_does_not_edit(make_app: Any, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    text_only = yaml.safe_load((REPO / "models" / "tiny-flux.yaml").read_text())
    text_only.update(id="darkroom/text-only", aliases=[])
    text_only["capabilities"]["image_to_image"] = False
    (models / "text-only.yaml").write_text(yaml.safe_dump(text_only))
    shutil.copy(REPO / "models" / "tiny-flux.yaml", models / "tiny-flux.yaml")
    server = make_app({"models_dir": str(models), "models": ["darkroom/text-only"]}, engine="stand-in")
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(server).images.edit(image=("a.png", png(8, 8), "image/png"), prompt="a")
    assert info.value.param == "model" and "no model served here edits" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(server).images.edit(image=("a.png", png(8, 8), "image/png"), prompt="a",
                                          model="darkroom/text-only")
    assert info.value.param == "model"
    assert server.engines[0].calls == []


def test_tiny_engine_edit_depends_on_the_image(make_app: Any) -> None:
    server = make_app({"server": {"default_response_format": "base64"}, "models": [KONTEXT]})

    def edit(colour: tuple[int, int, int]) -> Image.Image:
        response = openai_client(server).images.edit(
            image=("a.png", png(64, 64, colour), "image/png"), prompt="a", size="64x64",
            response_format="b64_json", output_format="png", extra_body={"steps": 2, "seed": 1})
        return decode_image(response.data[0].b64_json)

    red, blue = edit((250, 0, 0)), edit((0, 0, 250))
    assert red.size == (64, 64) and red.tobytes() != blue.tobytes()


# -- the bounded multipart reader, raw ------------------------------------------------------------------


def test_form_limits(standin: InProcessServer) -> None:
    many = {f"field{i}": "x" for i in range(20)}
    err = assert_error(post_form(standin, {"prompt": "a", **many}), 400, None)
    assert "more than 12 parts" in err["message"]
    long_field = {"prompt": "a", "user": "u" * 30_000}
    assert_error(post_form(standin, long_field), 413, "user")
    big = [("image", ("a.png", b"\x89PNG" + b"\0" * 250_000, "image/png"))]
    assert_error(post_form(standin, {"prompt": "a"}, big), 413, "image")
    huge = [("image", ("a.png", b"\0" * 180_000, "image/png"))] * 3
    err = assert_error(post_form(standin, {"prompt": "a"}, huge), 413, None)
    assert "larger than 400000 bytes" in err["message"]


@pytest.mark.parametrize(("content", "ctype", "status"), [
    (b'{"prompt": "a"}', "application/json", 415),
    (b"prompt=a", "application/x-www-form-urlencoded", 415),
    (b"--B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na\r\n",
     "multipart/form-data; boundary=B", 400),  # truncated
    (b"garbage", "multipart/form-data; boundary=B", 400),
    (b"--B\r\nContent-Disposition: form-data\r\n\r\na\r\n--B--\r\n", "multipart/form-data; boundary=B", 400),
    (b"--B\r\nContent-Disposition: form-data; name=\"prompt\"\r\nX-Pad: " + b"p" * 10_000
     + b"\r\n\r\na\r\n--B--\r\n", "multipart/form-data; boundary=B", 400),  # headers too long
    (b"--B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n\xff\xfe\r\n--B--\r\n",
     "multipart/form-data; boundary=B", 400),  # not UTF-8
    (b"x", "multipart/form-data", 400),  # no boundary
])
def test_malformed_forms(standin: InProcessServer, content: bytes, ctype: str, status: int) -> None:
    response = standin.client.post(EDITS, content=content, headers={"content-type": ctype})
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in standin.log()


def noise_png(size: int) -> bytes:
    """A PNG of random pixels: incompressible, so larger than the text field limit (20 000 bytes here)."""
    import numpy as np

    pixels = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("disposition", [
    b'form-data; name="image"',  # curl -F 'image=<photo.png': no filename (RFC 7578 4.2: optional)
    b"form-data; name=\"image\"; filename*=UTF-8''x%C3%A9.png",  # RFC 8187 only
    b'form-data; name="image[]"',
], ids=["no filename", "filename*", "image[] without filename"])
@pytest.mark.parametrize("ctype", [b"", b"Content-Type: image/png\r\n"], ids=["no type", "image/png"])
def test_image_parts_are_files_without_a_filename(standin: InProcessServer, disposition: bytes,
                                                   ctype: bytes) -> None:
    photo = noise_png(96)
    assert len(photo) > 20_000
    fields = {"prompt": "make it blue", "model": MODEL, "steps": "2", "size": "96x96"}
    part = b'--B\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
    body = b"".join(part % (k.encode(), v.encode()) for k, v in fields.items())
    body += b"--B\r\nContent-Disposition: " + disposition + b"\r\n" + ctype + b"\r\n" + photo
    body += b"\r\n--B--\r\n"
    form = {"content-type": "multipart/form-data; boundary=B"}
    response = standin.client.post(EDITS, content=body, headers=form)
    assert response.status_code == 200, response.text
    params = last_call(standin)
    assert params.conditioning == "img2img" and params.image is not None
    assert params.image.to_pil().size == (96, 96)
    assert params.image.to_pil().getpixel((5, 7)) == Image.open(io.BytesIO(photo)).getpixel((5, 7))
    mask = body.replace(b'name="size"', b'name="mask"', 1)  # a mask without a filename is a file too: refused
    assert_error(standin.client.post(EDITS, content=mask, headers=form), 400, "mask")


def test_multipart_fuzz_never_5xx(standin: InProcessServer) -> None:
    """A few hundred seeded mutations of a valid form (bytes flipped, cut, duplicated, boundaries and
    headers mangled): every answer is a 2xx or 4xx in the error shape, never a 5xx."""
    import random

    rng = random.Random(1234)
    valid = (b"--fuzzb\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na fox\r\n"
             b"--fuzzb\r\nContent-Disposition: form-data; name=\"steps\"\r\n\r\n1\r\n"
             b"--fuzzb\r\nContent-Disposition: form-data; name=\"size\"\r\n\r\n64x64\r\n"
             b"--fuzzb\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
             b"Content-Type: image/png\r\n\r\n" + png(16, 16) + b"\r\n--fuzzb--\r\n")
    pieces = [b"--fuzzb", b"\r\n", b"Content-Disposition: form-data; name=\"", b"\"; filename=\"",
              b"\xff\xfe", b"\x00", b"--fuzzb--", b"image[]", b"n\"\r\n\r\n99999999999999999999", b"[][",
              b"Content-Type: image/png"]
    statuses: dict[int, int] = {}
    for _ in range(300):
        body = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            op, at = rng.randrange(4), rng.randrange(len(body) + 1)
            if op == 0 and body:
                body[min(at, len(body) - 1)] = rng.randrange(256)
            elif op == 1:
                del body[at:at + rng.randint(1, 40)]
            elif op == 2:
                body[at:at] = rng.choice(pieces)
            else:
                body[at:at] = body[rng.randrange(len(body)):][:rng.randint(1, 80)]
        response = standin.client.post(
            EDITS, content=bytes(body), headers={"content-type": "multipart/form-data; boundary=fuzzb"})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text, bytes(body)[:300])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert statuses.get(200, 0) and sum(v for k, v in statuses.items() if k >= 400), statuses


def test_openai_edit_on_flux2_takes_every_image_as_a_reference(make_app: Any) -> None:
    """On FLUX.2 the first image is one of the references, and counts against the same limit."""
    server = make_app({"server": {"default_response_format": "base64"}, "models": ["darkroom/tiny-flux2"]},
                      engine="stand-in")
    most = server.runtime.registry.default.limits.max_reference_images
    images = [("a.png", png(64, 64), "image/png"), ("b.png", png(96, 64, (0, 0, 250)), "image/png")]
    openai_client(server).images.edit(image=images, prompt="b in a", size="64x64", response_format="b64_json",
                                      extra_body={"steps": 1})
    params = last_call(server)
    assert params.conditioning == "references" and params.image is None and len(params.references) == 2
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(server).images.edit(image=[images[0]] * (most + 1), prompt="a", size="64x64",
                                          extra_body={"steps": 1})
    assert info.value.param == "image"
