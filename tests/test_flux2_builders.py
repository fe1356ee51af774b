"""The tiny FLUX.2 [dev], FLUX.2 [klein], FLUX.1 Canny/Depth and depth-estimation builders, and the control
preprocessors, driven directly through their diffusers / transformers pipelines (no server).

Each tiny model must load with the real pipeline class, have the real component classes, and run end to end:
output of the requested size, the same seed giving the same pixels, and every conditioning input (reference
images and their order, control images) changing the pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from .image_origin import checker, gradient


def _noise_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.float64)


def _diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(_px(a) - _px(b)).mean())


@pytest.fixture(scope="module")
def folder(tiny_cache: Path) -> Path:
    """The session's model cache: each tiny model is built once per test run, here or by a server."""
    return tiny_cache


@pytest.fixture(scope="module")
def flux2(folder: Path) -> Any:
    from diffusers import Flux2Pipeline

    from server.engine.tiny_flux2 import ensure_tiny_flux2

    pipe = Flux2Pipeline.from_pretrained(str(ensure_tiny_flux2(folder)), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def klein(folder: Path) -> Any:
    from diffusers import Flux2KleinPipeline

    from server.engine.tiny_flux2 import ensure_tiny_flux2_klein

    pipe = Flux2KleinPipeline.from_pretrained(str(ensure_tiny_flux2_klein(folder)), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe: Any, seed: int = 0, prompt: str = "a cat", width: int = 64, height: int = 64,
         **kwargs: Any) -> Image.Image:
    # 256 text tokens (the pipelines' default is 512): FLUX.2 [dev]'s system message takes ~180 of them.
    return pipe(prompt=[prompt], width=width, height=height, num_inference_steps=2, max_sequence_length=256,
                generator=[torch.Generator().manual_seed(seed)], **kwargs).images[0]


# -- FLUX.2 [dev] and [klein] ------------------------------------------------------------------------


def test_flux2_has_the_real_component_classes(flux2: Any, klein: Any) -> None:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Mistral3ForConditionalGeneration, Qwen2Tokenizer, Qwen3ForCausalLM

    for pipe in (flux2, klein):
        assert isinstance(pipe.transformer, Flux2Transformer2DModel)
        assert isinstance(pipe.vae, AutoencoderKLFlux2)
        # FLUX.2 latents: the VAE's channels x a 2x2 patch, what the transformer takes per token.
        assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
        # The pipelines stack three hidden-state layers of the text encoder.
        text_width = pipe.text_encoder.config.get_text_config().hidden_size
        assert pipe.transformer.config.joint_attention_dim == 3 * text_width
    assert isinstance(flux2.text_encoder, Mistral3ForConditionalGeneration)
    assert flux2.transformer.config.guidance_embeds  # FLUX.2 [dev] is guidance-distilled
    assert isinstance(klein.text_encoder, Qwen3ForCausalLM)
    assert isinstance(klein.tokenizer, Qwen2Tokenizer)
    assert not klein.transformer.config.guidance_embeds
    assert not klein.config.is_distilled  # the tiny klein is a base model: true CFG runs


@pytest.mark.parametrize("which", ["flux2", "klein"])
def test_flux2_text_to_image_size_and_seed(which: str, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(which)
    a = _run(pipe, width=96, height=64)
    assert a.size == (96, 64)
    assert np.array_equal(_px(a), _px(_run(pipe, width=96, height=64)))
    assert _diff(a, _run(pipe, seed=1, width=96, height=64)) > 5
    assert _diff(a, _run(pipe, prompt="a dog", width=96, height=64)) > 3


@pytest.mark.parametrize("which", ["flux2", "klein"])
def test_flux2_reference_images_steer_the_output(which: str, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(which)
    first, second = _noise_image(0), gradient(96, 64)
    plain = _run(pipe)
    one = _run(pipe, image=[first])
    assert one.size == (64, 64)
    assert np.array_equal(_px(one), _px(_run(pipe, image=[first])))
    assert _diff(plain, one) > 3  # a reference changes the output
    assert _diff(one, _run(pipe, image=[second])) > 3  # another reference: another output
    both = _run(pipe, image=[first, second])
    assert _diff(both, one) > 3  # each reference counts
    assert _diff(both, _run(pipe, image=[second, first])) > 3  # and their order (RoPE's time axis)


# -- FLUX.1 Canny / Depth and the depth model -------------------------------------------------------


def _square(offset: int, size: int = 64, side: int = 24) -> Image.Image:
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle([offset, offset, offset + side - 1, offset + side - 1], fill=(255,) * 3)
    return image


def test_canny_finds_the_border_of_a_white_square() -> None:
    from server.engine.control import CannyPreprocessor

    edges = CannyPreprocessor()([_square(20)])[0]
    assert edges.mode == "RGB" and edges.size == (64, 64)
    e = np.asarray(edges)[:, :, 0]
    assert set(np.unique(e)) <= {0, 255}
    # The square spans pixels 20..43: every edge pixel is within a pixel of its border, and the border is
    # traced all round (each side has edge pixels along most of its length).
    ys, xs = np.nonzero(e)
    assert len(ys) > 0
    on_border = ((np.minimum(np.abs(ys - 20), np.abs(ys - 43)) <= 1) & (xs >= 19) & (xs <= 44)) | (
        (np.minimum(np.abs(xs - 20), np.abs(xs - 43)) <= 1) & (ys >= 19) & (ys <= 44))
    assert on_border.all()
    for side in (e[19:22, 20:44], e[42:45, 20:44], e[20:44, 19:22].T, e[20:44, 42:45].T):
        assert (side.max(axis=0) == 255).mean() > 0.8
    # Nothing inside the square or far outside it.
    assert e[24:40, 24:40].max() == 0 and e[:16].max() == 0 and e[48:].max() == 0
    # A flat image has no edges.
    assert np.asarray(CannyPreprocessor()([Image.new("RGB", (64, 64), (90, 90, 90))])[0]).max() == 0


def test_depth_model_loads_with_the_transformers_pipeline(folder: Path) -> None:
    from transformers import DepthAnythingForDepthEstimation, pipeline

    from server.engine.control import DepthPreprocessor
    from server.engine.tiny_control import ensure_tiny_depth_model

    location = str(ensure_tiny_depth_model(folder))
    assert isinstance(pipeline("depth-estimation", model=location).model, DepthAnythingForDepthEstimation)
    depth = DepthPreprocessor(location, "cpu")
    a, b, c = depth([_noise_image(0, (96, 64)), checker(96, 64), _noise_image(0, (96, 64))])
    assert a.size == (96, 64) and a.mode == "RGB"
    assert _px(a).std() > 1  # a map, not a constant
    assert _diff(a, b) > 1
    assert np.array_equal(_px(a), _px(c))


@pytest.mark.parametrize("kind", ["canny", "depth"])
def test_control_pipelines_follow_the_control_image(kind: str, folder: Path) -> None:
    from diffusers import FluxControlPipeline

    from server.engine import tiny_control

    ensure = {"canny": tiny_control.ensure_tiny_flux_canny,
              "depth": tiny_control.ensure_tiny_flux_depth}[kind]
    pipe = FluxControlPipeline.from_pretrained(str(ensure(folder)), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.transformer.config
    # FluxControlPipeline: the control image's latents are concatenated to the noisy ones on channels.
    assert config.in_channels == 2 * config.out_channels == 8 * pipe.vae.config.latent_channels
    if kind == "canny":
        from server.engine.control import CannyPreprocessor

        first, second = CannyPreprocessor()([_square(10), _square(30)])
    else:
        from server.engine.control import DepthPreprocessor

        depth = DepthPreprocessor(str(tiny_control.ensure_tiny_depth_model(folder)), "cpu")
        first, second = depth([_noise_image(0), checker()])
    a = _run(pipe, control_image=[first], guidance_scale=3.5)
    assert a.size == (64, 64)
    assert np.array_equal(_px(a), _px(_run(pipe, control_image=[first], guidance_scale=3.5)))
    assert _diff(a, _run(pipe, control_image=[second], guidance_scale=3.5)) > 2
    assert _diff(a, _run(pipe, seed=1, control_image=[first], guidance_scale=3.5)) > 5


# -- each row's own references in one call (server/engine/flux2.py) ---------------------------------


@pytest.mark.parametrize("which", ["flux2", "klein"])
def test_rows_pipeline_gives_each_row_its_references(which: str, folder: Path,
                                                    request: pytest.FixtureRequest) -> None:
    from server.engine.flux2 import Flux2KleinRowsPipeline, Flux2RowsPipeline
    from server.engine.tiny_flux2 import ensure_tiny_flux2, ensure_tiny_flux2_klein

    cls, ensure = {"flux2": (Flux2RowsPipeline, ensure_tiny_flux2),
                   "klein": (Flux2KleinRowsPipeline, ensure_tiny_flux2_klein)}[which]
    pipe = cls.from_pretrained(str(ensure(folder)), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    mine, yours = [_noise_image(0), gradient(96, 64)], [checker(), checker(96, 64, 16)]

    def call(prompts: list[str], images: list[Image.Image], seeds: list[int]) -> list[Image.Image]:
        return pipe(prompt=prompts, image=images, width=64, height=64, num_inference_steps=2,
                    max_sequence_length=256,
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    together = call(["a cat", "a dog"], mine + yours, [0, 1])
    alone = [call(["a cat"], mine, [0])[0], call(["a dog"], yours, [1])[0]]
    for t, a in zip(together, alone):
        assert _diff(t, a) < 0.5  # float noise of a batched matmul at most
    assert _diff(together[0], together[1]) > 5
    # One row: exactly what the upstream pipeline gives.
    assert np.array_equal(_px(alone[0]), _px(_run(request.getfixturevalue(which), image=mine)))
    # Rows whose references make different numbers of tokens cannot share a call.
    with pytest.raises(ValueError, match="same sizes"):
        call(["a cat", "a dog"], mine + [checker(), checker()], [0, 1])
