"""The official clients work unchanged against Darkroom, each on the path it really sends."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import textwrap

import httpx
import pytest
from openai import OpenAI
from PIL import Image
from together import Together

from .conftest import MODEL, TOGETHER1_PYTHON, Server, decode_image


def test_together_v3_default_base_url_form(server: Server) -> None:
    client = Together(base_url=server.url, api_key="any-key", max_retries=0)
    response = client.images.generate(
        model=MODEL, prompt="a lighthouse", width=128, height=96, steps=2, seed=7,
        response_format="base64",
    )
    assert response.model == MODEL
    assert response.object == "list"
    assert response.id
    assert len(response.data) == 1
    item = response.data[0]
    assert item.index == 0 and item.type == "b64_json"
    image = decode_image(item.b64_json)
    assert image.format == "JPEG" and image.size == (128, 96)


def test_together_v3_url_response(server: Server) -> None:
    client = Together(base_url=server.url, api_key="any-key", max_retries=0)
    response = client.images.generate(
        model=MODEL, prompt="a lighthouse", width=64, height=64, steps=1, response_format="url",
        output_format="png",
    )
    item = response.data[0]
    assert item.type == "url"
    fetched = httpx.get(item.url, timeout=30)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(fetched.content))
    assert image.format == "PNG" and image.size == (64, 64)


def _run_together_v1(script: str) -> dict:
    if not TOGETHER1_PYTHON.exists():
        pytest.fail(f"{TOGETHER1_PYTHON} is missing: run `make test`, which installs together 1.x there")
    out = subprocess.run(
        [str(TOGETHER1_PYTHON), "-c", textwrap.dedent(script)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_together_v1_base_url_with_v1(server: Server) -> None:
    """1.x appends ``images/generations`` to a base URL ending in /v1, and always sends n/width/height."""
    result = _run_together_v1(f"""
        import json, together
        client = together.Together(base_url="{server.url}/v1", api_key="any-key")
        r = client.images.generate(prompt="a lighthouse", model="{MODEL}", width=96, height=64,
                                   steps=2, seed=3, n=2, response_format="base64")
        print(json.dumps({{"version": together.version, "model": r.model,
                          "data": [{{"index": d.index, "b64": d.b64_json}} for d in r.data]}}))
    """)
    assert result["version"].startswith("1.")
    assert result["model"] == MODEL
    assert [d["index"] for d in result["data"]] == [0, 1]
    for item in result["data"]:
        assert decode_image(item["b64"]).size == (96, 64)


def test_together_v1_defaults_are_accepted(server: Server) -> None:
    """1.x sends width=height=1024 unless told otherwise; the tiny model serves that size too."""
    result = _run_together_v1(f"""
        import json, together
        client = together.Together(base_url="{server.url}/v1", api_key="k")
        r = client.images.generate(prompt="x", model="{MODEL}", steps=1, response_format="base64")
        print(json.dumps({{"b64": r.data[0].b64_json}}))
    """)
    assert decode_image(result["b64"]).size == (1024, 1024)


def test_openai_client(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="any-key", max_retries=0)
    response = client.images.generate(prompt="a lighthouse", size="128x64", response_format="b64_json")
    assert response.created > 0
    image = decode_image(response.data[0].b64_json)
    assert image.size == (128, 64)


def test_openai_client_with_together_fields(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="any-key", max_retries=0)
    response = client.images.generate(
        model=MODEL, prompt="a lighthouse", size="64x64", response_format="b64_json",
        output_format="png", quality="high",
        extra_body={"steps": 1, "seed": 11},
    )
    image = decode_image(response.data[0].b64_json)
    assert image.format == "PNG" and image.size == (64, 64)
    assert response.data[0].model_extra.get("seed") == 11


def test_curl_json_body(server: Server) -> None:
    body = json.dumps({"model": MODEL, "prompt": "a lighthouse", "width": 64, "height": 80,
                       "steps": 1, "response_format": "base64"})
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{server.url}/v1/images/generations",
         "-H", "Authorization: Bearer x", "-H", "Content-Type: application/json", "-d", body,
         "-w", "\n%{http_code} %{content_type}"],
        capture_output=True, text=True, timeout=60,
    )
    payload, status_line = out.stdout.rsplit("\n", 1)
    assert status_line == "200 application/json"
    data = json.loads(payload)
    assert data["object"] == "list" and isinstance(data["created"], int)
    image = Image.open(io.BytesIO(base64.b64decode(data["data"][0]["b64_json"])))
    assert image.size == (64, 80)


def test_models_list(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="any-key", max_retries=0)
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [MODEL]
    raw = httpx.get(f"{server.url}/v1/models").json()
    card = raw["data"][0]
    assert raw["object"] == "list" and card["object"] == "model"
    assert card["capabilities"]["text_to_image"] is True
    # The tiny FLUX does img2img (image_url); it has no Redux prior, so no reference_images.
    assert card["capabilities"]["image_to_image"] is True
    assert card["capabilities"]["reference_images"] is False
    assert card["defaults"]["steps"] == 4
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.url}/v1/models/tiny-flux").json()["id"] == MODEL


def test_health_and_ready(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_together_v1_models_list(server: Server) -> None:
    """1.x asserts that GET {base}/models answers a bare list (Together's shape); it gets one."""
    result = _run_together_v1(f"""
        import json, together
        client = together.Together(base_url="{server.url}/v1", api_key="k")
        models = client.models.list()
        print(json.dumps([[m.id, m.type, m.object, m.pricing.input] for m in models]))
    """)
    assert result == [[MODEL, "image", "model", 0.0]]
    # The same path, without the 1.x client, keeps the OpenAI shape.
    assert httpx.get(f"{server.url}/v1/models").json()["object"] == "list"


def test_together_v1_aspect_ratio_and_image_base64(server: Server) -> None:
    """1.x passes extra keyword arguments through: aspect_ratio (with its default width/height dropped by
    passing None) and image_base64, the input image it documents."""
    buffer = io.BytesIO()
    Image.new("RGB", (80, 64), (10, 200, 10)).save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    result = _run_together_v1(f"""
        import json, together
        client = together.Together(base_url="{server.url}/v1", api_key="k")
        wide = client.images.generate(prompt="a", model="{MODEL}", width=None, height=None, steps=1,
                                      aspect_ratio="16:9", response_format="base64")
        edited = client.images.generate(prompt="a", model="{MODEL}", width=64, height=64, steps=2, seed=1,
                                        image_base64="{b64}", response_format="base64")
        plain = client.images.generate(prompt="a", model="{MODEL}", width=64, height=64, steps=2, seed=1,
                                       response_format="base64")
        print(json.dumps([wide.data[0].b64_json, edited.data[0].b64_json, plain.data[0].b64_json]))
    """)
    wide, edited, plain = (decode_image(b) for b in result)
    assert wide.size == (688, 384)  # 16:9 at about the tiny model's 512 x 512 area
    assert edited.size == (64, 64) and edited.tobytes() != plain.tobytes()


def test_curl_multipart_edit(server: Server, tmp_path) -> None:
    photo = tmp_path / "photo.png"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(photo)
    out = subprocess.run(
        ["curl", "-sS", f"{server.url}/v1/images/edits", "-H", "Authorization: Bearer x",
         "-F", f"image=@{photo};type=image/png", "-F", "prompt=make it blue", "-F", f"model={MODEL}",
         "-F", "size=72x88", "-F", "steps=2", "-F", "n=2", "-F", "response_format=b64_json",
         "-F", "output_format=png", "-w", "\n%{http_code}"],
        capture_output=True, text=True, timeout=120,
    )
    payload, status = out.stdout.rsplit("\n", 1)
    assert status == "200", payload
    images = [decode_image(item["b64_json"]) for item in json.loads(payload)["data"]]
    assert [(i.format, i.size) for i in images] == [("PNG", (72, 88))] * 2
    bad = subprocess.run(
        ["curl", "-sS", f"{server.url}/v1/images/edits", "-F", f"image=@{photo}", "-F", "prompt=a",
         "-F", f"mask=@{photo}", "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=60)
    payload, status = bad.stdout.rsplit("\n", 1)
    assert status == "400" and json.loads(payload)["error"]["param"] == "mask"
