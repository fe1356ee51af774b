"""FLUX.2 [dev] / [klein] and FLUX.1 Canny / Depth through the SDKs, on their tiny models, in-process.

One app serves darkroom/tiny-flux2, tiny-flux2-klein, tiny-flux-canny and tiny-flux-depth; a loopback origin
(allowed in the app's fetch config) serves the reference and control images and the LoRA files. Images are
compared as PNG pixels. together 1.x needs a process of its own: tests/test_flux2_together1.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO, decode_image, images_of, mean_abs_diff, openai_client, together3
from .image_origin import ImageOrigin, _encode, checker, gradient
from .support.inprocess import InProcessServer
from .support.tiny_loras import lora_file_bytes, tiny_flux2_lora, tiny_flux2_lora_ai_toolkit, tiny_flux_lora

DEV = "darkroom/tiny-flux2"
KLEIN = "darkroom/tiny-flux2-klein"
CANNY = "darkroom/tiny-flux-canny"
DEPTH = "darkroom/tiny-flux-depth"
BASE = {"prompt": "a red bicycle", "width": 64, "height": 64, "steps": 2, "seed": 7,
        "response_format": "base64", "output_format": "png"}
# What an input must change, at least, in mean grey levels (the tiny models change by 3-30, see
# tests/test_flux2_builders.py); and float noise between a batched call and the same request alone.
VISIBLE = 1.5
SAME = 0.5


def _noise(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def origin() -> Iterator[ImageOrigin]:
    with ImageOrigin() as server:
        png = "image/png"
        server.files.update({
            "/noise.png": (_encode(_noise(1), "PNG"), png),
            "/noise2.png": (_encode(_noise(2), "PNG"), png),
            "/checker96.png": (_encode(checker(96, 64, 16), "PNG"), png),
            "/wide.png": (_encode(gradient(640, 64), "PNG"), png),  # aspect ratio 10
            "/large.png": (_encode(_noise(3, (1200, 900)), "PNG"), png),
            "/loras/flux2.safetensors": (lora_file_bytes(tiny_flux2_lora(5)), "application/octet-stream"),
            "/loras/flux1.safetensors": (lora_file_bytes(tiny_flux_lora(5)), "application/octet-stream"),
        })
        aitk, same_in_diffusers = tiny_flux2_lora_ai_toolkit(6)
        server.files["/loras/aitk.safetensors"] = (lora_file_bytes(aitk), "application/octet-stream")
        server.files["/loras/aitk-as-diffusers.safetensors"] = (
            lora_file_bytes(same_in_diffusers), "application/octet-stream")
        yield server


@pytest.fixture(scope="module")
def app(make_app: Any) -> InProcessServer:
    return make_app({
        "models": [DEV, KLEIN, CANNY, DEPTH],
        "server": {"default_response_format": "base64"},
        "fetch": {"allow_hosts": ["127.0.0.1"], "max_pixels": 4_000_000},
        "loras": {"max_count": 2},
        # A window long enough that concurrent requests meet in the queue.
        "scheduler": {"batch_window_ms": 100, "max_batch_images": 8},
    })


def one(app: InProcessServer, **changes: Any) -> Image.Image:
    (image,) = images_of(app.generate(**{**BASE, **changes}))
    return image


def same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def assert_400(app: InProcessServer, field: str, **changes: Any) -> str:
    response = app.generate(**{**BASE, **changes})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field, error
    assert set(error) == {"message", "type", "param", "code"}
    return str(error["message"])


# -- FLUX.2: reference images ---------------------------------------------------------------------


@pytest.mark.parametrize("model", [DEV, KLEIN])
def test_the_sdks_send_reference_images(model: str, app: InProcessServer, origin: ImageOrigin) -> None:
    """together 3.x (a named argument) and openai (extra_body) give the same image for the same request."""
    refs = [origin.url("/noise.png"), origin.url("/gradient.png")]
    resp = together3(app).images.generate(
        model=model, prompt="a red bicycle", width=64, height=64, steps=2, seed=7, reference_images=refs,
        response_format="base64", output_format="png")
    via_together = decode_image(resp.data[0].b64_json)
    assert via_together.size == (64, 64)
    resp = openai_client(app).images.generate(
        model=model, prompt="a red bicycle", size="64x64", response_format="b64_json",
        extra_body={"reference_images": refs, "steps": 2, "seed": 7, "output_format": "png"})
    via_openai = decode_image(resp.data[0].b64_json)
    assert same(via_together, via_openai)
    assert same(via_together, one(app, model=model, reference_images=refs))


@pytest.mark.parametrize("model", [DEV, KLEIN])
def test_each_reference_steers_the_output_in_order(model: str, app: InProcessServer,
                                                    origin: ImageOrigin) -> None:
    a, b, c = origin.url("/noise.png"), origin.url("/gradient.png"), origin.url("/checker.jpg")
    plain = one(app, model=model)
    first = one(app, model=model, reference_images=[a, b])
    assert same(first, one(app, model=model, reference_images=[a, b]))  # same request, same bytes
    assert mean_abs_diff(plain, first) > VISIBLE
    assert mean_abs_diff(first, one(app, model=model, reference_images=[c, b])) > VISIBLE  # swap the 1st
    assert mean_abs_diff(first, one(app, model=model, reference_images=[a, c])) > VISIBLE  # swap the 2nd
    assert mean_abs_diff(first, one(app, model=model, reference_images=[b, a])) > VISIBLE  # order matters
    assert mean_abs_diff(first, one(app, model=model, reference_images=[a])) > VISIBLE  # each one counts


@pytest.mark.parametrize("model", [DEV, KLEIN])
def test_image_url_is_the_first_reference(model: str, app: InProcessServer, origin: ImageOrigin) -> None:
    a, b = origin.url("/noise.png"), origin.url("/gradient.png")
    assert same(one(app, model=model, image_url=a), one(app, model=model, reference_images=[a]))
    assert same(one(app, model=model, image_url=a, reference_images=[b]),
                one(app, model=model, reference_images=[a, b]))


def test_large_references_are_scaled_down(app: InProcessServer, origin: ImageOrigin) -> None:
    """A 1200x900 reference is scaled (aspect kept) to the manifest's max_reference_pixels, not refused."""
    image = one(app, model=DEV, reference_images=[origin.url("/large.png")])
    assert image.size == (64, 64)
    assert mean_abs_diff(image, one(app, model=DEV)) > VISIBLE


def test_batched_requests_keep_their_own_references(app: InProcessServer, origin: ImageOrigin) -> None:
    """Concurrent requests with references of the same sizes share one pipeline call; each image is the
    one its request gives alone."""
    bodies = [
        {**BASE, "model": DEV, "reference_images": [origin.url("/noise.png"), origin.url("/gradient.png")]},
        {**BASE, "model": DEV, "seed": 8, "prompt": "a blue car",
         "reference_images": [origin.url("/checker.jpg"), origin.url("/checker96.png")]},
        {**BASE, "model": DEV, "n": 2,
         "reference_images": [origin.url("/noise2.png"), origin.url("/gradient.png")]},
    ]
    alone = [images_of(app.generate(**body)) for body in bodies]
    for _ in range(3):  # the queue's window decides what meets; retry until they did
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda body: app.generate(**body), bodies))
        if all(r.json()["batch"]["jobs"] == len(bodies) for r in responses):
            break
    else:
        pytest.fail("the requests never shared a batch")
    for response, lone in zip(responses, alone):
        together = images_of(response)
        assert len(together) == len(lone)
        for x, y in zip(together, lone):
            assert mean_abs_diff(x, y) < SAME
    assert mean_abs_diff(alone[0][0], alone[2][0]) > VISIBLE


def test_klein_negative_prompt_and_dev_refusal(app: InProcessServer) -> None:
    """FLUX.2 [klein] base runs true CFG against the negative prompt; FLUX.2 [dev] has no negative
    conditioning, and says so naming the field."""
    assert mean_abs_diff(one(app, model=KLEIN), one(app, model=KLEIN, negative_prompt="blurry")) > VISIBLE
    assert "negative_prompt" in assert_400(app, "negative_prompt", model=DEV, negative_prompt="blurry")


# -- FLUX.2: LoRAs --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [DEV, KLEIN])
def test_loras_apply_on_flux2(model: str, app: InProcessServer, origin: ImageOrigin) -> None:
    lora = origin.url("/loras/flux2.safetensors")
    plain = one(app, model=model)
    with_lora = one(app, model=model, image_loras=[{"path": lora, "scale": 1.0}])
    assert mean_abs_diff(plain, with_lora) > VISIBLE
    half = one(app, model=model, image_loras=[{"path": lora, "scale": 0.5}])
    assert mean_abs_diff(half, with_lora) > SAME and mean_abs_diff(half, plain) > SAME
    # Adapters are switched off for a request without LoRAs: exactly the plain image again.
    assert same(plain, one(app, model=model))
    # The ai-toolkit format (BFL's layer names) is the same LoRA as its diffusers-format conversion.
    aitk = origin.url("/loras/aitk.safetensors")
    converted = origin.url("/loras/aitk-as-diffusers.safetensors")
    assert same(one(app, model=model, image_loras=[{"path": aitk}]),
                one(app, model=model, image_loras=[{"path": converted}]))


def test_flux1_lora_is_refused_on_flux2(app: InProcessServer, origin: ImageOrigin) -> None:
    message = assert_400(app, "image_loras", model=DEV,
                         image_loras=[{"path": origin.url("/loras/flux1.safetensors")}])
    assert "flux1.safetensors" in message
    assert one(app, model=DEV).size == (64, 64)  # and the model keeps serving


# -- FLUX.1 Canny / Depth -------------------------------------------------------------------------


@pytest.mark.parametrize("model", [CANNY, DEPTH])
def test_control_image_steers_the_output(model: str, app: InProcessServer, origin: ImageOrigin) -> None:
    resp = together3(app).images.generate(
        model=model, prompt="a red bicycle", width=64, height=64, steps=2, seed=7,
        image_url=origin.url("/checker.jpg"), response_format="base64", output_format="png")
    checked = decode_image(resp.data[0].b64_json)
    resp = openai_client(app).images.generate(
        model=model, prompt="a red bicycle", size="64x64", response_format="b64_json",
        extra_body={"image_url": origin.url("/checker.jpg"), "steps": 2, "seed": 7, "output_format": "png"})
    assert same(checked, decode_image(resp.data[0].b64_json))
    assert checked.size == (64, 64)
    assert mean_abs_diff(checked, one(app, model=model, image_url=origin.url("/noise.png"))) > VISIBLE
    # Another size: the photo is fitted to it, the control image follows.
    assert one(app, model=model, image_url=origin.url("/gradient.png"), width=96).size == (96, 64)


@pytest.mark.parametrize("model", [CANNY, DEPTH])
def test_control_models_refuse_what_they_cannot_use(model: str, app: InProcessServer,
                                                    origin: ImageOrigin) -> None:
    assert "required" in assert_400(app, "image_url", model=model)
    assert_400(app, "reference_images", model=model, image_url=origin.url("/checker.jpg"),
               reference_images=[origin.url("/noise.png")])
    assert_400(app, "negative_prompt", model=model, image_url=origin.url("/checker.jpg"),
               negative_prompt="blurry")


# -- bad input: a 400 naming the field, and the server keeps serving -------------------------------


def test_bad_references_name_the_field(app: InProcessServer, origin: ImageOrigin) -> None:
    ok = origin.url("/noise.png")
    # More references than the manifest allows (tiny-flux2: 6, tiny-flux2-klein: 4); image_url counts too.
    assert "at most 6" in assert_400(app, "reference_images", model=DEV, reference_images=[ok] * 7)
    assert "at most 6" in assert_400(app, "reference_images", model=DEV, image_url=ok,
                                     reference_images=[ok] * 6)
    assert "at most 4" in assert_400(app, "reference_images", model=KLEIN, reference_images=[ok] * 5)
    # A reference the guarded fetcher refuses: its own index is named.
    assert "404" in assert_400(app, "reference_images[1]", model=DEV,
                               reference_images=[ok, origin.url("/missing.png")])
    assert_400(app, "reference_images[0]", model=KLEIN, reference_images=["http://10.0.0.1/x.png"])
    assert_400(app, "image_url", model=DEV, image_url=origin.url("/not-image.png"))
    # Images FLUX.2 cannot take as references: too small, too elongated.
    assert "64x64" in assert_400(app, "reference_images[0]", model=DEV,
                                 reference_images=[origin.url("/cmyk.jpg")])
    assert "aspect ratio" in assert_400(app, "reference_images[1]", model=KLEIN,
                                        reference_images=[ok, origin.url("/wide.png")])
    assert one(app, model=DEV, reference_images=[ok]).size == (64, 64)


def test_models_list_the_new_families(app: InProcessServer) -> None:
    listed = {m["id"]: m for m in app.client.get("/v1/models").json()["data"]}
    assert {k: m["family"] for k, m in listed.items()} == {
        DEV: "flux2", KLEIN: "flux2-klein", CANNY: "flux-control", DEPTH: "flux-control"}
    dev = listed[DEV]["capabilities"]
    assert dev["reference_images"] and dev["image_to_image"] and not dev["negative_prompt"]
    assert listed[KLEIN]["capabilities"]["negative_prompt"]
    assert not listed[CANNY]["capabilities"]["reference_images"]
    assert listed[DEV]["limits"]["max_reference_images"] == 6


# -- the engine directly: one call per batch, each request's own inputs -----------------------------


def test_engine_batches_by_family_kind_and_reference_sizes(tiny_cache: Path) -> None:
    from server.config import EngineSettings
    from server.engine.pipelines import Engine
    from server.params import ConditioningImage, GenerationParams
    from server.registry import Registry

    registry = Registry.from_settings(REPO / "models", [DEV, KLEIN, CANNY, DEPTH])
    engine = Engine(registry, EngineSettings(cache_dir=tiny_cache, devices=["cpu"]), "cpu")
    engine.load()
    noise, grad = ConditioningImage.from_pil(_noise(1)), ConditioningImage.from_pil(gradient(64, 64))
    check, wide = ConditioningImage.from_pil(checker()), ConditioningImage.from_pil(gradient(96, 64))

    def params(model: str, **changes: Any) -> GenerationParams:
        base = GenerationParams(model=model, prompt="a cat", width=64, height=64, steps=2,
                                guidance_scale=4.0, seeds=(3,), max_sequence_length=64)
        return dataclasses.replace(base, **changes)

    batches = [
        [params(DEV, conditioning="references", references=(noise, wide)),
         params(DEV, conditioning="references", references=(check, wide), seeds=(4, 5), prompt="a dog")],
        [params(KLEIN, conditioning="references", references=(grad,), negative_prompt="blurry"),
         params(KLEIN, conditioning="references", references=(check,), negative_prompt="", seeds=(9,))],
        [params(CANNY, conditioning="control", image=grad),
         params(CANNY, conditioning="control", image=check)],
        [params(DEPTH, conditioning="control", image=noise),
         params(DEPTH, conditioning="control", image=check)],
    ]
    for batch in batches:
        assert len({p.batch_key() for p in batch}) == 1
        together = engine.generate(batch).images
        for p, images in zip(batch, together):
            alone = engine.generate([p]).images[0]
            assert len(images) == p.n
            for x, y in zip(images, alone):
                assert mean_abs_diff(x, y) < SAME, p.model
        assert mean_abs_diff(together[0][0], together[1][0]) > VISIBLE
    # Requests that cannot share a call: another model (family), another conditioning kind, another number
    # or size of references.
    keys = {
        params(DEV).batch_key(),
        params(KLEIN).batch_key(),
        params(DEV, conditioning="references", references=(noise,)).batch_key(),
        params(DEV, conditioning="references", references=(noise, grad)).batch_key(),
        params(DEV, conditioning="references", references=(noise, wide)).batch_key(),
        params(CANNY, conditioning="control", image=grad).batch_key(),
        params(DEPTH, conditioning="control", image=grad).batch_key(),
    }
    assert len(keys) == 7
    # Same sizes, other pixels: one key.
    assert (params(DEV, conditioning="references", references=(noise, grad)).batch_key()
            == params(DEV, conditioning="references", references=(check, noise)).batch_key())


def test_flux2_hotswap_slots_match_named_adapters(origin: ImageOrigin, tmp_path: Path,
                                                  tiny_cache: Path) -> None:
    """FLUX.2 LoRAs through the compiled-transformer path (hotswap into fixed slots, no compile on CPU)."""
    from server.config import EngineSettings, FetchSettings, LoraSettings, SafetySettings
    from server.engine.pipelines import Engine
    from server.loras import LoraStore
    from server.params import GenerationParams, LoraRef
    from server.registry import Registry

    plain, aitk = origin.url("/loras/flux2.safetensors"), origin.url("/loras/aitk.safetensors")
    sets = [(), ((plain, 1.0),), ((aitk, 0.8),), ((plain, 0.5), (aitk, 1.0)), ()]

    def images(hotswap: bool) -> list[Image.Image]:
        store = LoraStore(LoraSettings(cache_dir=tmp_path / f"loras-{hotswap}", hotswap=hotswap,
                                       hotswap_target_rank=8, max_count=2),
                          FetchSettings(allow_hosts=["127.0.0.1"]), tmp_path)
        engine = Engine(Registry.from_settings(REPO / "models", [DEV]), EngineSettings(cache_dir=tiny_cache),
                        "cpu", SafetySettings(enabled=False), loras=store)
        engine.load()
        return [engine.generate([GenerationParams(
            model=DEV, prompt="a red barn", width=64, height=64, steps=2, guidance_scale=4.0, seeds=(3,),
            max_sequence_length=256, loras=tuple(LoraRef(p, s) for p, s in loras))]).images[0][0]
            for loras in sets]

    named, swapped = images(False), images(True)
    for loras, x, y in zip(sets, named, swapped):
        assert mean_abs_diff(x, y) <= SAME, loras
    assert mean_abs_diff(named[0], named[1]) > VISIBLE and mean_abs_diff(named[1], named[2]) > VISIBLE
    assert same(named[0], named[4])


def test_distilled_klein_weights_refuse_a_negative_prompt_manifest(tmp_path: Path, tiny_cache: Path) -> None:
    """A FLUX.2 [klein] manifest allowing negative prompts on step-distilled weights does not start."""
    import json
    import shutil

    import yaml

    from server.config import EngineSettings
    from server.engine.families import load_runner
    from server.engine.tiny_flux2 import ensure_tiny_flux2_klein
    from server.registry import ModelManifest

    weights = tmp_path / "distilled-klein"
    shutil.copytree(ensure_tiny_flux2_klein(tiny_cache), weights)
    index = json.loads((weights / "model_index.json").read_text())
    (weights / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    data = yaml.safe_load((REPO / "models" / "tiny-flux2-klein.yaml").read_text())
    data["source"] = {"path": str(weights)}
    with pytest.raises(ValueError, match="step-distilled"):
        load_runner(ModelManifest.model_validate(data), EngineSettings(cache_dir=tiny_cache), "cpu")
    data["capabilities"]["negative_prompt"] = False
    assert load_runner(ModelManifest.model_validate(data), EngineSettings(cache_dir=tiny_cache), "cpu").pipe
