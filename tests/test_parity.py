"""Drop-in parity with Together's current API and the SDKs (issue 14), each point through the SDK a user has.

In-process with the stand-in engine (what reached the engine is recorded) or the tiny engine (real images);
together 1.x and curl need a real process: tests/test_clients.py.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import openai
import pytest
import together
import yaml
from PIL import Image

from server.registry import Registry

from .conftest import MODEL, REPO, decode_image, images_of, openai_client, together3
from .support.inprocess import InProcessServer

KONTEXT = "darkroom/tiny-flux-kontext"
CLOSED = "black-forest-labs/FLUX.1.1-pro"  # a closed model users name; the operator maps it here
GEN = "/v1/images/generations"


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(width, height)).decode()


@pytest.fixture(scope="module")
def standin(make_app: Any) -> InProcessServer:
    """The stand-in engine behind the real API: two models (img2img and Kontext) and an operator alias."""
    return make_app({"server": {"default_response_format": "base64"}, "models": [MODEL, KONTEXT],
                     "aliases": {CLOSED: MODEL, "black-forest-labs/FLUX.1-kontext-pro": KONTEXT}},
                    engine="stand-in")


def last_call(server: InProcessServer) -> Any:
    """The params of the last request that reached the stand-in engine."""
    return server.engines[0].calls[-1][-1]


# -- 1. GET /v1/models in openai and together 3.x (together 1.x: tests/test_clients.py) -------------------


def test_models_list_openai_and_plain_http(standin: InProcessServer) -> None:
    models = openai_client(standin).models.list()
    assert [m.id for m in models.data] == [MODEL, KONTEXT]
    raw = standin.client.get("/v1/models").json()
    assert raw["object"] == "list"  # plain HTTP callers keep the OpenAI shape
    card = raw["data"][0]
    assert {"id", "object", "created", "owned_by", "type", "display_name", "organization",
            "pricing"} <= set(card)
    assert card["type"] == "image" and card["object"] == "model"
    assert CLOSED in card["aliases"] and "tiny-flux" in card["aliases"]
    # The explicit override and together 1.x's header get Together's bare array.
    assert [m["id"] for m in standin.client.get("/v1/models?format=together").json()] == [MODEL, KONTEXT]
    bare = standin.client.get("/models", headers={"X-Together-Client-User-Agent": "{}"}).json()
    assert isinstance(bare, list) and bare[1]["id"] == KONTEXT
    assert openai_client(standin).models.retrieve(CLOSED).id == MODEL


def test_models_list_together3(standin: InProcessServer) -> None:
    from together import Together

    client = Together(base_url=standin.url, api_key="x", max_retries=0, http_client=standin.http_client,
                      project_id="any-project")
    listed = client.models.list()
    assert [m.id for m in listed] == [MODEL, KONTEXT]
    assert listed.data[0].project_id == "any-project" and listed.data[0].name == MODEL
    assert client.models.retrieve(CLOSED).id == MODEL  # an alias resolves
    supported = together3(standin).models.list_supported()  # needs no project
    assert [m.id for m in supported] == [MODEL, KONTEXT]
    assert supported.data[1].input_modalities == ["MODALITY_TEXT", "MODALITY_IMAGE"]
    assert together3(standin).models.retrieve_supported(KONTEXT).display_type == "image"
    first = together3(standin).models.list_supported(limit=1)
    assert [m.id for m in first.data] == [MODEL] and first.next_cursor == MODEL
    assert [m.id for m in first.get_next_page().data] == [KONTEXT]


# -- 7. Model ids users already have -------------------------------------------------------------------------


def test_operator_alias_runs_and_is_echoed(standin: InProcessServer) -> None:
    response = together3(standin).images.generate(model=CLOSED, prompt="a fox", width=64, height=64, steps=1)
    assert response.model == CLOSED  # the id the client asked for, as Together echoes it
    assert last_call(standin).model == MODEL
    oa = openai_client(standin).images.generate(model="black-forest-labs/FLUX.1-kontext-pro", prompt="a fox",
                                                size="64x64", response_format="b64_json",
                                                extra_body={"steps": 1})
    assert oa.model_extra["model"] == "black-forest-labs/FLUX.1-kontext-pro"
    assert last_call(standin).model == KONTEXT


def test_shipped_together_ids_resolve_to_the_same_weights() -> None:
    registry = Registry.from_settings(REPO / "models", ["black-forest-labs/FLUX.1-schnell-Free",
                                                        "black-forest-labs/FLUX.1-dev-lora"])
    assert [m.id for m in registry.models] == ["black-forest-labs/FLUX.1-schnell",
                                               "black-forest-labs/FLUX.1-dev"]
    assert registry.get("black-forest-labs/FLUX.1-dev-lora").capabilities.loras


@pytest.mark.parametrize(("aliases", "message"), [
    ({CLOSED: "acme/not-served"}, "not served"),
    ({"tiny-flux": MODEL}, "already names"),
])
def test_bad_operator_aliases_stop_the_start(aliases: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Registry.from_settings(REPO / "models", [MODEL], aliases)


# -- 2. aspect_ratio -----------------------------------------------------------------------------------------

RATIOS = ["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21", "5:4"]


@pytest.mark.parametrize("ratio", RATIOS)
def test_aspect_ratio_sizes_the_output(standin: InProcessServer, ratio: str) -> None:
    """About the model's default area (512 x 512 for the tiny model; a megapixel for FLUX), in multiples of
    16, in the ratio asked for."""
    image = decode_image(together3(standin).images.generate(
        model=MODEL, prompt="a fox", steps=1, response_format="base64",
        extra_body={"aspect_ratio": ratio}).data[0].b64_json)
    w, h = image.size
    rw, rh = (int(p) for p in ratio.split(":"))
    assert w % 16 == 0 and h % 16 == 0, image.size
    assert abs(w / h - rw / rh) / (rw / rh) < 0.05, image.size
    assert abs(w * h - 512 * 512) / (512 * 512) < 0.08, image.size


def test_explicit_sides_win_over_aspect_ratio(standin: InProcessServer) -> None:
    both = standin.generate(prompt="a", steps=1, width=96, height=96, aspect_ratio="16:9")
    assert images_of(both)[0].size == (96, 96)
    one_side = standin.generate(prompt="a", steps=1, width=320, aspect_ratio="16:9")
    assert images_of(one_side)[0].size == (320, 176)  # the other side from the ratio, in multiples of 16


def test_match_input_image_takes_the_inputs_ratio(standin: InProcessServer) -> None:
    response = together3(standin).images.generate(
        model=KONTEXT, prompt="make it blue", steps=1, image_url=data_url(300, 200), response_format="base64",
        extra_body={"aspect_ratio": "match_input_image"})
    w, h = decode_image(response.data[0].b64_json).size
    assert abs(w / h - 1.5) < 0.05 and abs(w * h - 512 * 512) / (512 * 512) < 0.08, (w, h)
    params = last_call(standin)
    assert params.conditioning == "kontext" and (params.image.width, params.image.height) == (w, h)


def test_kontext_aspect_ratio_is_the_output_shape_and_the_input_keeps_its_own(
        standin: InProcessServer) -> None:
    """On Kontext an aspect_ratio names the output's size (as width/height do): the output takes it, and the
    input image keeps its own aspect ratio at the output's area (Kontext never crops: server/api/kontext.py)."""
    response = together3(standin).images.generate(
        model=KONTEXT, prompt="make it blue", steps=1, image_url=data_url(300, 200), response_format="base64",
        extra_body={"aspect_ratio": "16:9"})
    w, h = decode_image(response.data[0].b64_json).size
    assert abs(w / h - 16 / 9) < 0.05, (w, h)
    image = last_call(standin).image
    assert abs(image.width / image.height - 1.5) < 0.05, (image.width, image.height)
    assert abs(image.width * image.height - w * h) / (w * h) < 0.1, (image.width, image.height, w, h)


@pytest.mark.parametrize(("fields", "param"), [
    ({"aspect_ratio": "match_input_image"}, "aspect_ratio"),  # no input image
    ({"aspect_ratio": "16x9"}, "aspect_ratio"),
    ({"aspect_ratio": "100:1"}, "aspect_ratio"),
    ({"aspect_ratio": "0:1"}, "aspect_ratio"),
])
def test_bad_aspect_ratio_is_400(standin: InProcessServer, fields: dict[str, Any], param: str) -> None:
    response = standin.generate(prompt="a", steps=1, **fields)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


# -- 3. Sizes --------------------------------------------------------------------------------------------


def test_multiples_of_8_come_back_exactly(standin: InProcessServer) -> None:
    """Together asks for multiples of 8; FLUX runs at the next multiple of 16 and the worker crops."""
    response = together3(standin).images.generate(model=MODEL, prompt="a", width=72, height=88, steps=1,
                                                  response_format="base64")
    assert decode_image(response.data[0].b64_json).size == (72, 88)
    params = last_call(standin)
    assert (params.width, params.height, params.output_size) == (80, 96, (72, 88))
    oa = openai_client(standin).images.generate(model=MODEL, prompt="a", size="120x64",
                                                response_format="b64_json", extra_body={"steps": 1})
    assert decode_image(oa.data[0].b64_json).size == (120, 64)


def test_cropped_size_with_the_tiny_engine(app: InProcessServer) -> None:
    [image] = images_of(app.generate(prompt="a lighthouse", width=104, height=72, steps=1, seed=3))
    assert image.size == (104, 72)


def test_size_and_width_conflict_names_both(standin: InProcessServer) -> None:
    response = standin.generate(prompt="a", steps=1, size="256x256", width=320)
    err = response.json()["error"]
    assert response.status_code == 400 and err["param"] == "size"
    assert "'size'" in err["message"] and "'width'" in err["message"]
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(standin).images.generate(model=MODEL, prompt="a", size="256x256",
                                               extra_body={"width": 320, "steps": 1})
    assert info.value.param == "size"
    # size fills only what is missing; an agreeing width is fine.
    assert images_of(standin.generate(prompt="a", steps=1, size="128x64", width=128))[0].size == (128, 64)


def test_not_a_multiple_of_8_is_400(standin: InProcessServer) -> None:
    with pytest.raises(together.BadRequestError) as info:
        together3(standin).images.generate(model=MODEL, prompt="a", width=100, height=64, steps=1)
    assert "multiple of 8" in str(info.value) and info.value.body["error"]["param"] == "width"


# -- 4. img2img at one step ---------------------------------------------------------------------------------


def test_img2img_at_one_step_is_400_naming_steps(standin: InProcessServer) -> None:
    with pytest.raises(together.BadRequestError) as info:
        together3(standin).images.generate(model=MODEL, prompt="a", width=64, height=64, steps=1,
                                           image_url=data_url(64, 64))
    assert info.value.body["error"]["param"] == "steps"
    assert "at least 2 steps" in info.value.body["error"]["message"]
    # Two steps run, with the image; Kontext edits at one step (it does not re-noise the input).
    together3(standin).images.generate(model=MODEL, prompt="a", width=64, height=64, steps=2,
                                       image_url=data_url(64, 64))
    assert last_call(standin).conditioning == "img2img" and last_call(standin).image is not None
    together3(standin).images.generate(model=KONTEXT, prompt="a", width=64, height=64, steps=1,
                                       image_url=data_url(64, 64))


# -- 5. Fields other SDKs send ----------------------------------------------------------------------------


def test_openai_fields_honoured_or_ignored_and_logged(standin: InProcessServer) -> None:
    response = openai_client(standin).images.generate(
        model=MODEL, prompt="a fox", size="64x64", response_format="b64_json", output_format="jpeg",
        output_compression=30, quality="high", style="vivid", moderation="low", background="opaque",
        user="end-user-42", extra_body={"steps": 1, "complexity": "low", "our_own_field": 1})
    image = decode_image(response.data[0].b64_json)
    reference = io.BytesIO()
    Image.new("RGB", (64, 64)).save(reference, format="JPEG", quality=30)
    assert image.quantization == Image.open(reference).quantization  # encoded at quality 30
    log = standin.log()
    assert "fields=quality,style,moderation,complexity,our_own_field" in log
    assert "user=end-user-42" in log


@pytest.mark.parametrize(("fields", "param"), [
    ({"background": "transparent"}, "background"),
    ({"stream": True}, "stream"),
    ({"frame_count": 4}, "frame_count"),
    ({"svg": {"model": "x"}}, "svg"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_compression": 101}, "output_compression"),
    ({"image_base64": "aGVsbG8=", "image_url": "https://example.com/a.png"}, "image_base64"),
])
def test_refused_sdk_fields_name_the_field(standin: InProcessServer, fields: dict[str, Any],
                                           param: str) -> None:
    response = standin.generate(prompt="a", steps=1, width=64, height=64, **fields)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_image_base64_is_the_input_image(standin: InProcessServer) -> None:
    """together 1.x documents ``image_base64``: the input image, as image_url would be."""
    b64 = base64.b64encode(png(96, 64)).decode()
    assert images_of(standin.generate(prompt="a", steps=2, width=64, height=64, image_base64=b64))
    params = last_call(standin)
    assert params.conditioning == "img2img" and params.image is not None
    assert params.image.to_pil().getpixel((32, 32)) == (200, 30, 30)
    bad = standin.generate(prompt="a", steps=2, width=64, height=64, image_base64="bm90IGFuIGltYWdl")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "image_base64"


def test_ignored_field_names_are_logged_escaped(standin: InProcessServer) -> None:
    body = json.dumps({"model": MODEL, "prompt": "a", "steps": 1, "width": 64, "height": 64, "odd\nname": 1})
    response = standin.client.post(GEN, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert "fields=odd\\nname" in standin.log()
    # A name that is not valid Unicode is refused outright.
    body = json.dumps({"model": MODEL, "prompt": "a", "steps": 1, "\ud800": 1})
    response = standin.client.post(GEN, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "unicode" in response.json()["error"]["message"]


def test_image_base64_on_a_model_without_image_input(make_app: Any, tmp_path: Path) -> None:
    """A served model without image input refuses image_base64 by name, before any engine work."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(REPO / "models" / "tiny-flux.yaml", models / "tiny-flux.yaml")
    text_only = yaml.safe_load((REPO / "models" / "tiny-flux.yaml").read_text())
    text_only.update(id="darkroom/text-only", aliases=[])
    text_only["capabilities"]["image_to_image"] = False
    (models / "text-only.yaml").write_text(yaml.safe_dump(text_only))
    server = make_app({"models_dir": str(models), "models": ["darkroom/text-only"]}, engine="stand-in")
    response = server.generate(model="darkroom/text-only", prompt="a", steps=1, width=64, height=64,
                               image_base64=base64.b64encode(png(8, 8)).decode())
    assert response.status_code == 400 and response.json()["error"]["param"] == "image_base64"
    assert server.engines[0].calls == []
