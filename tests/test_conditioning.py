"""image_url and reference_images end to end: the app on a loopback port fetching from a loopback image origin.

The server serves the tiny FLUX (img2img), the tiny FLUX with a Redux prior (img2img + references),
the tiny Kontext (editing + references) and a text-only model. Its fetcher may reach the origin only by
the name ``localhost`` (``fetch.allow_hosts``); 127.0.0.1 itself and every other internal address stay
refused, so the hostile cases are the real guards at work.
"""

from __future__ import annotations

import base64
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import REPO, free_port, images_of, mean_abs_diff
from .image_origin import ImageOrigin
from .support.inprocess import InProcessServer

TINY = "darkroom/tiny-flux"
REDUX = "darkroom/tiny-flux-redux"
KONTEXT = "darkroom/tiny-flux-kontext"
TEXT_ONLY = "darkroom/tiny-flux-text-only"
BASE = {"prompt": "a red bicycle", "width": 64, "height": 64, "steps": 2, "seed": 7,
        "response_format": "base64", "output_format": "png"}
VISIBLE = 2.0


@pytest.fixture(scope="module")
def origin() -> Iterator[ImageOrigin]:
    with ImageOrigin(name="localhost", slow_s=4.0) as server:
        yield server


@pytest.fixture(scope="module")
def server(make_app: Any, tmp_path_factory: pytest.TempPathFactory) -> InProcessServer:
    models = tmp_path_factory.mktemp("models")
    for name in ("tiny-flux.yaml", "tiny-flux-redux.yaml", "tiny-flux-kontext.yaml"):
        shutil.copy(REPO / "models" / name, models / name)
    text_only = yaml.safe_load((REPO / "models" / "tiny-flux.yaml").read_text())
    text_only.update(id=TEXT_ONLY, aliases=[])
    text_only["capabilities"]["image_to_image"] = False
    (models / "tiny-flux-text-only.yaml").write_text(yaml.safe_dump(text_only))
    return make_app({
        "models_dir": str(models),
        "models": [TINY, REDUX, KONTEXT, TEXT_ONLY],
        "fetch": {"allow_hosts": ["localhost"], "timeout_s": 1.5, "max_bytes": 1_000_000,
                  "max_pixels": 4_000_000},
    }, listen=True)


def one(server: InProcessServer, **changes: Any) -> Any:
    (image,) = images_of(server.generate(**{**BASE, **changes}))
    return image


def data_url(origin: ImageOrigin, path: str) -> str:
    body, ctype = origin.files[path]
    return f"data:{ctype};base64," + base64.b64encode(body).decode()


# -- image_url -------------------------------------------------------------------------------------


def test_img2img_depends_on_the_image(server: InProcessServer, origin: ImageOrigin) -> None:
    text = one(server, model=REDUX)
    gradient = one(server, model=REDUX, image_url=origin.url("/gradient.png"))
    checker = one(server, model=REDUX, image_url=origin.url("/checker.jpg"))
    assert mean_abs_diff(text, gradient) > VISIBLE
    assert mean_abs_diff(gradient, checker) > VISIBLE


def test_img2img_on_the_default_tiny_model(server: InProcessServer, origin: ImageOrigin) -> None:
    text = one(server, model=TINY)
    edited = one(server, model=TINY, image_url=origin.url("/gradient.png"))
    assert edited.size == (64, 64)
    assert mean_abs_diff(text, edited) > VISIBLE


def test_output_has_the_requested_size(server: InProcessServer, origin: ImageOrigin) -> None:
    # A 96x64 input scaled and cropped to cover 64x128 (and 128x64) outputs.
    for model in (REDUX, KONTEXT):
        for width, height in ((64, 128), (128, 64)):
            image = one(server, model=model, image_url=origin.url("/gradient.png"),
                        width=width, height=height)
            assert image.size == (width, height), model


def test_same_request_same_bytes(server: InProcessServer, origin: ImageOrigin) -> None:
    for changes in ({"model": REDUX, "image_url": origin.url("/checker.jpg")},
                    {"model": KONTEXT, "image_url": origin.url("/checker.jpg")},
                    {"model": REDUX, "reference_images": [origin.url("/gradient.png")]}):
        first = server.generate(**{**BASE, **changes})
        second = server.generate(**{**BASE, **changes})
        assert first.status_code == 200, first.text
        assert first.json()["data"][0]["b64_json"] == second.json()["data"][0]["b64_json"], changes


def test_data_url_gives_the_same_image_as_http(server: InProcessServer, origin: ImageOrigin) -> None:
    over_http = server.generate(**BASE, model=REDUX, image_url=origin.url("/checker.jpg"))
    inline = server.generate(**BASE, model=REDUX, image_url=data_url(origin, "/checker.jpg"))
    assert inline.status_code == 200, inline.text
    assert inline.json()["data"][0]["b64_json"] == over_http.json()["data"][0]["b64_json"]


def test_n_images_fetch_once(server: InProcessServer, origin: ImageOrigin) -> None:
    path = "/rgba.png"
    before = origin.hits.get(path, 0)
    response = server.generate(**{**BASE, "n": 3}, model=REDUX, image_url=origin.url(path))
    images = images_of(response)
    assert len(images) == 3 and mean_abs_diff(images[0], images[1]) > VISIBLE
    server.generate(**BASE, model=REDUX, image_url=origin.url(path))
    assert origin.hits[path] == before + 1  # the second request is served from the cache


def test_kontext_edits_the_input_image(server: InProcessServer, origin: ImageOrigin) -> None:
    text = one(server, model=KONTEXT)
    gradient = one(server, model=KONTEXT, image_url=origin.url("/gradient.png"))
    checker = one(server, model=KONTEXT, image_url=origin.url("/checker.jpg"))
    assert mean_abs_diff(text, gradient) > 1.0
    assert mean_abs_diff(gradient, checker) > 0.5


# -- reference_images ------------------------------------------------------------------------------


def test_redux_references_change_the_output(server: InProcessServer, origin: ImageOrigin) -> None:
    text = one(server, model=REDUX)
    gradient = one(server, model=REDUX, reference_images=[origin.url("/gradient.png")])
    checker = one(server, model=REDUX, reference_images=[origin.url("/checker.jpg")])
    both = one(server, model=REDUX, reference_images=[origin.url("/gradient.png"),
                                                      origin.url("/checker.jpg")])
    assert mean_abs_diff(text, gradient) > VISIBLE
    assert mean_abs_diff(gradient, checker) > VISIBLE
    assert mean_abs_diff(both, gradient) > 1.0


def test_redux_with_img2img_and_negative_prompt(server: InProcessServer, origin: ImageOrigin) -> None:
    refs = [origin.url("/checker.jpg")]
    with_refs = one(server, model=REDUX, image_url=origin.url("/gradient.png"), reference_images=refs)
    without = one(server, model=REDUX, image_url=origin.url("/gradient.png"))
    assert mean_abs_diff(with_refs, without) > 1.0
    negative = one(server, model=REDUX, reference_images=refs, negative_prompt="blurry")
    assert mean_abs_diff(negative, one(server, model=REDUX, reference_images=refs)) > VISIBLE


def test_kontext_references_change_the_output(server: InProcessServer, origin: ImageOrigin) -> None:
    edit = one(server, model=KONTEXT, image_url=origin.url("/gradient.png"))
    with_ref = one(server, model=KONTEXT, image_url=origin.url("/gradient.png"),
                   reference_images=[origin.url("/checker.jpg")])
    refs_only = one(server, model=KONTEXT, reference_images=[origin.url("/checker.jpg")])
    assert mean_abs_diff(edit, with_ref) > 0.5
    assert mean_abs_diff(refs_only, one(server, model=KONTEXT)) > 1.0


# -- what a model cannot do ------------------------------------------------------------------------


def assert_error(response: httpx.Response, param: str, *words: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert isinstance(error["code"], str)
    for word in words:
        assert word in error["message"], error
    return error


def test_models_without_the_capability(server: InProcessServer, origin: ImageOrigin) -> None:
    url = origin.url("/red.png")
    assert_error(server.generate(**BASE, model=TINY, reference_images=[url]), "reference_images", TINY)
    assert_error(server.generate(**BASE, model=TEXT_ONLY, image_url=url), "image_url", TEXT_ONLY)
    too_many = [url] * 4
    assert_error(server.generate(**BASE, model=KONTEXT, reference_images=too_many),
                 "reference_images", "at most 3")


def test_capabilities_are_listed(server: InProcessServer) -> None:
    models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]}
    caps = {name: (m["capabilities"]["image_to_image"], m["capabilities"]["reference_images"])
            for name, m in models.items()}
    assert caps == {TINY: (True, False), REDUX: (True, True), KONTEXT: (True, True),
                    TEXT_ONLY: (False, False)}


# -- batching --------------------------------------------------------------------------------------


def test_batched_conditioning_matches_lone_calls(tiny_cache: Path) -> None:
    """In one pipeline call each request keeps its own images; an image is what it would be alone."""
    from PIL import Image

    from server.config import EngineSettings
    from server.engine.pipelines import Engine
    from server.images import fit_cover
    from server.params import ConditioningImage, GenerationParams
    from server.registry import Registry

    from .image_origin import checker, gradient

    registry = Registry.from_settings(REPO / "models", [REDUX, KONTEXT])
    engine = Engine(registry, EngineSettings(cache_dir=tiny_cache, devices=["cpu"]), "cpu")
    engine.load()
    grad = ConditioningImage.from_pil(fit_cover(gradient(), 64, 64))
    check = ConditioningImage.from_pil(fit_cover(checker(), 64, 64))
    red = ConditioningImage.from_pil(Image.new("RGB", (64, 64), (230, 20, 20)))

    def params(model: str, **changes: Any) -> GenerationParams:
        base = GenerationParams(model=model, prompt="a cat", width=64, height=64, steps=2,
                                guidance_scale=3.5, seeds=(3,), max_sequence_length=64)
        return dataclasses.replace(base, **changes)

    batches = [
        [params(REDUX, conditioning="img2img", image=grad, strength=0.75),
         params(REDUX, conditioning="img2img", image=check, strength=0.75, seeds=(4, 5), prompt="a dog")],
        [params(REDUX, conditioning="redux", references=(grad,)),
         params(REDUX, conditioning="redux", references=(check,), seeds=(9,))],
        [params(KONTEXT, conditioning="kontext", image=grad, references=(red,)),
         params(KONTEXT, conditioning="kontext", image=check, references=(grad,), seeds=(1, 2))],
    ]
    for batch in batches:
        assert len({p.batch_key() for p in batch}) == 1
        together = engine.generate(batch).images
        for p, images in zip(batch, together):
            alone = engine.generate([p]).images[0]
            assert len(images) == p.n
            for a, b in zip(images, alone):
                assert mean_abs_diff(a, b) < 0.5, p.conditioning
        assert mean_abs_diff(together[0][0], together[1][0]) > 0.5
    # Requests that cannot share a call have different keys.
    keys = {
        params(REDUX).batch_key(),
        params(REDUX, conditioning="img2img", image=grad, strength=0.75).batch_key(),
        params(REDUX, conditioning="img2img", image=grad, strength=0.5).batch_key(),
        params(REDUX, conditioning="redux", references=(grad,)).batch_key(),
        params(REDUX, conditioning="redux", references=(grad, check)).batch_key(),
        params(REDUX, conditioning="img2img+redux", image=grad, strength=0.75, references=(grad,)).batch_key(),
        params(KONTEXT, conditioning="kontext", image=grad).batch_key(),
        params(KONTEXT, conditioning="kontext", references=(grad,)).batch_key(),
        params(KONTEXT, conditioning="kontext", image=grad, references=(grad,)).batch_key(),
    }
    assert len(keys) == 9


# -- hostile URLs ----------------------------------------------------------------------------------


def hostile_cases(origin: ImageOrigin) -> list[tuple[str, str]]:
    """(URL, a word the message must contain)."""
    port = origin.port
    return [
        (f"http://localhost:{free_port()}/x.png", "cannot connect"),
        ("http://no-such-host.invalid/x.png", "does not resolve"),
        (origin.url("/slow"), "timed out"),
        (origin.url("/drip"), "timed out"),
        (origin.url("/missing.png"), "HTTP 404"),
        (origin.url("/not-image.png"), "not an image"),
        (origin.url("/truncated.jpg"), "truncated"),
        (origin.url("/bomb.png"), "pixels"),
        (origin.url("/huge"), "larger than"),
        (origin.url("/huge-declared"), "larger than"),
        (origin.url("/gzip.png"), "gzip"),
        (f"http://127.0.0.1:{port}/red.png", "loopback"),
        ("http://10.0.0.1/x.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        (f"http://[::1]:{port}/red.png", "loopback"),
        (f"http://[::ffff:127.0.0.1]:{port}/red.png", "loopback"),
        (origin.url(f"/redirect?to=http://127.0.0.1:{port}/red.png"), "loopback"),
        (origin.url("/redirect?to=http://169.254.169.254/latest/"), "link-local"),
        (origin.url("/loop"), "redirected more than"),
        ("file:///etc/passwd", "schemes"),
        ("ftp://localhost/x.png", "schemes"),
        ("data:image/png;base64,%%%", "data URL"),
        ("data:text/html;base64,PGgxPg==", "data URL"),
    ]


def test_hostile_urls_answer_400_and_the_server_keeps_serving(server: InProcessServer, origin: ImageOrigin) -> None:
    before_red = origin.hits.get("/red.png", 0)
    for url, word in hostile_cases(origin):
        response = server.generate(**BASE, model=REDUX, image_url=url)
        assert_error(response, "image_url", word)
    # The same guards, for a reference image, name its index.
    response = server.generate(**BASE, model=REDUX, reference_images=[
        origin.url("/red.png"), "http://169.254.169.254/latest/"])
    assert_error(response, "reference_images[1]", "link-local")
    response = server.generate(**BASE, model=KONTEXT, image_url=origin.url("/red.png"),
                               reference_images=[origin.url("/bomb.png")])
    assert_error(response, "reference_images[0]", "pixels")
    # Nothing ever reached the origin through a refused address.
    assert origin.hits.get("/red.png", 0) <= before_red + 1  # the one legitimate fetch
    # Still healthy, and a normal request still works.
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert one(server, model=REDUX, image_url=origin.url("/blue.png")).size == (64, 64)
    assert one(server, model=TINY).size == (64, 64)


def test_awkward_images_are_accepted(server: InProcessServer, origin: ImageOrigin) -> None:
    for path in ("/cmyk.jpg", "/anim.gif", "/rotated.jpg", "/palette.png", "/gray16.png", "/mislabelled"):
        assert one(server, model=REDUX, image_url=origin.url(path)).size == (64, 64), path


def test_official_client_sends_image_url(server: InProcessServer, origin: ImageOrigin) -> None:
    from together import Together

    client = Together(base_url=server.url, api_key="any-key", max_retries=0)
    response = client.images.generate(prompt="a bicycle", model=REDUX, width=64, height=64, steps=2,
                                      seed=7, image_url=origin.url("/gradient.png"),
                                      response_format="base64")
    assert response.data[0].b64_json


# -- Kontext sizing: upstream's preferred resolutions, never a crop -----------------------------------


class _Images:
    """A stand-in fetcher: every URL is the image given for it."""

    def __init__(self, images: dict[str, Any]) -> None:
        self.images = images

    def fetch_image(self, url: str, field: str) -> Any:
        return self.images[url]


def _edges(image: Any) -> tuple[float, float, float, float]:
    """Mean red of the leftmost and rightmost columns, mean green of the top and bottom rows."""
    import numpy as np

    arr = np.asarray(image.to_pil(), dtype=np.float64)
    return arr[:, 0, 0].mean(), arr[:, -1, 0].mean(), arr[0, :, 1].mean(), arr[-1, :, 1].mean()


def test_kontext_sizes_follow_upstream_and_never_crop() -> None:
    import asyncio

    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS as upstream

    from server.api.conditioning import KontextSizing, attach_images
    from server.api.kontext import PREFERRED_KONTEXT_RESOLUTIONS, preferred_size
    from server.api.lanes import Lanes
    from server.config import LimitSettings, Settings
    from server.params import GenerationParams
    from server.registry import Registry

    from .image_origin import checker, gradient

    assert list(PREFERRED_KONTEXT_RESOLUTIONS) == [tuple(r) for r in upstream]
    manifest = Registry.from_settings(REPO / "models", [KONTEXT]).get(KONTEXT)
    limits = manifest.effective_limits(LimitSettings())
    # FLUX.1 Kontext [dev] (a 1024x1024 default) gets upstream's list itself; a limit skips what exceeds it.
    dev = Registry.from_settings(REPO / "models", ["flux-kontext-dev"]).default
    assert preferred_size(1500, 1000, dev, dev.effective_limits(LimitSettings())) == (1248, 832)
    assert preferred_size(480, 1120, dev, dev.effective_limits(LimitSettings())) == (672, 1568)
    assert preferred_size(480, 1120, dev, dev.effective_limits(LimitSettings(max_height=1390))) == (800, 1328)

    fetcher = _Images({"in": gradient(96, 64), "ref": checker(64, 64)})
    base = GenerationParams(model=KONTEXT, prompt="make it blue", width=512, height=512, steps=2,
                            guidance_scale=2.5, seeds=(1,), conditioning="kontext")

    def attach(explicit: bool, **changes: Any) -> GenerationParams:
        params = dataclasses.replace(base, **changes)
        lanes = Lanes(Settings())
        try:
            return asyncio.run(attach_images(params, "in", ["ref"], fetcher,  # type: ignore[arg-type]
                                             manifest, lanes, "test-key",
                                             kontext=KontextSizing(manifest, limits, explicit_size=explicit)))
        finally:
            lanes.close()

    # No size in the request: the preferred resolution nearest 3:2 (1248x832 scaled to the tiny model's
    # 512x512 default area), the whole input resized to it: its edges keep the gradient's extremes.
    auto = attach(False)
    assert (auto.width, auto.height) == (624, 416)
    assert auto.image is not None and (auto.image.width, auto.image.height) == (624, 416)
    left, right, top, bottom = _edges(auto.image)
    assert left < 8 and right > 247 and top < 8 and bottom > 247
    # References take the input's height, aspect kept.
    assert [(r.width, r.height) for r in auto.references] == [(416, 416)]
    # A size in the request: the output has it; the input keeps its 3:2 at about the output's area, uncropped.
    explicit = attach(True, width=256, height=256)
    assert (explicit.width, explicit.height) == (256, 256)
    assert explicit.image is not None and (explicit.image.width, explicit.image.height) == (320, 208)
    left, right, top, bottom = _edges(explicit.image)
    assert left < 8 and right > 247 and top < 8 and bottom > 247
    assert [(r.width, r.height) for r in explicit.references] == [(208, 208)]


def test_kontext_request_without_a_size_gets_the_preferred_resolution(server: InProcessServer,
                                                                      origin: ImageOrigin) -> None:
    body = {**{k: v for k, v in BASE.items() if k not in ("width", "height")}, "steps": 1}
    response = server.generate(**body, model=KONTEXT, image_url=origin.url("/gradient.png"))
    (image,) = images_of(response)
    assert image.size == (624, 416)  # /gradient.png is 96x64 (3:2)
    # A text-only Kontext request with a size keeps it.
    (text,) = images_of(server.generate(**{**body, "width": 64, "height": 64}, model=KONTEXT))
    assert text.size == (64, 64)
