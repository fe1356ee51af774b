"""LoRA fidelity: every tensor of a LoRA file is applied or refused by name, never silently dropped.

One file per row of the README's LoRA format table (``README.md#lora-formats``), built here from the tiny
model's shapes and served from a loopback origin, sent through the in-process app with the tiny engine.
Applied formats are proven by their images: a format that names the same weights differently gives the same
image, bit for bit, as diffusers/peft naming (an oracle computed here from sd-scripts' definition), and a
part (CLIP, DoRA magnitudes, biases) changes the image. Refused formats are a 400 naming the part and its
count, both from the API's check before queueing (``loras.prefetch``) and from the worker's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from server.engine.tiny import ensure_tiny_flux

from .conftest import images_of, mean_abs_diff
from .image_origin import ImageOrigin
from .support.inprocess import InProcessServer
from .support.launch import wait_until
from .support.tiny_loras import (
    BFL_TO_DIFFUSERS,
    CLIP_LAYERS,
    T5_LAYERS,
    TINY_BFL_LAYERS,
    TINY_FLUX_LORA_LAYERS,
    kohya_as_diffusers,
    kohya_lora,
    lora_file_bytes,
    tiny_flux_lora,
    tiny_flux_lora_kohya,
)

SAME = 0.5       # float noise, mean grey levels
VISIBLE = 4.0    # what a LoRA (or a part of one) must change at least
CLIP = {name: (32, 32) for name in CLIP_LAYERS}
T5 = {name: (32, 32) for name in T5_LAYERS}


def _peft_clip(kohya_te: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A kohya CLIP LoRA in diffusers/peft names (``text_encoder.<layer>.lora_A.weight``), alpha applied."""
    out = {}
    for layer in CLIP_LAYERS:
        key = prefix + layer.replace(".", "_")
        down = kohya_te[f"{key}.lora_down.weight"]
        scale = float(kohya_te[f"{key}.alpha"]) / down.shape[0]
        out[f"text_encoder.{layer}.lora_A.weight"] = down * scale
        out[f"text_encoder.{layer}.lora_B.weight"] = kohya_te[f"{key}.lora_up.weight"]
    return out


def _layer_weights(tiny_cache: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ensure_tiny_flux(tiny_cache) / "transformer" /
                         "diffusion_pytorch_model.safetensors"))


def _dora(plain: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], stretch: float
          ) -> dict[str, torch.Tensor]:
    """``plain`` as a DoRA (peft's lora_magnitude_vector per layer): magnitudes the row norms of W + B @ A,
    each times a random factor in 1 ± ``stretch``, so at ``stretch`` 0 DoRA's output is the plain LoRA's
    (peft ``DoraLinearLayer``: output rows rescaled to magnitude / norm)."""
    gen = torch.Generator().manual_seed(7)
    out = dict(plain)
    for layer in TINY_FLUX_LORA_LAYERS:
        a, b = plain[f"transformer.{layer}.lora_A.weight"], plain[f"transformer.{layer}.lora_B.weight"]
        norm = torch.linalg.norm(weights[f"{layer}.weight"] + b @ a, dim=1)
        factor = 1 + stretch * (2 * torch.rand(norm.shape, generator=gen) - 1)
        out[f"transformer.{layer}.lora_magnitude_vector"] = norm * factor
    return out


def _files(tiny_cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    kohya = tiny_flux_lora_kohya(33)
    te1 = kohya_lora(CLIP, "lora_te1_", 44)
    plain = tiny_flux_lora(11)
    weights = _layer_weights(tiny_cache)
    xlabs: dict[str, torch.Tensor] = {}  # xlabs names the fused qkv and the projection of block 0
    for slot, bfl in (("qkv_lora1", "double_blocks.0.img_attn.qkv"),
                      ("proj_lora1", "double_blocks.0.img_attn.proj")):
        key = "lora_unet_" + bfl.replace(".", "_")
        scale = float(kohya[f"{key}.alpha"]) / 4
        xlabs[f"double_blocks.0.processor.{slot}.down.weight"] = kohya[f"{key}.lora_down.weight"] * scale
        xlabs[f"double_blocks.0.processor.{slot}.up.weight"] = kohya[f"{key}.lora_up.weight"]
    xlabs_oracle = {k: v for k, v in kohya_as_diffusers(kohya).items()
                    if any(p in k for p in (*BFL_TO_DIFFUSERS["double_blocks.0.img_attn.qkv"],
                                            *BFL_TO_DIFFUSERS["double_blocks.0.img_attn.proj"]))}
    mixture = {}  # "lora_transformer_" names (diffusers' mixture converter), same weights as the peft oracle
    oracle = kohya_as_diffusers(kohya)
    for key, value in oracle.items():
        layer, kind = key.removeprefix("transformer.").rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        if ".attn.to_" in layer and not layer.endswith("to_out.0"):
            name = "lora_transformer_" + layer.replace(".", "_")
            mixture[f"{name}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = value.clone()
            mixture[f"{name}.alpha"] = torch.tensor(4.0)
    mixture_oracle = {k: v for k, v in oracle.items() if ".attn.to_" in k and "to_out" not in k}
    return {
        # applied
        "peft": plain,
        "peft-alpha": {**tiny_flux_lora(11, gain=0.5),
                       **{f"transformer.{n}.alpha": torch.tensor(8.0) for n in TINY_FLUX_LORA_LAYERS}},
        "kohya": kohya,
        "kohya-oracle": oracle,
        "comfyui": tiny_flux_lora_kohya(33, naming="comfyui"),
        "kohya-clip": {**kohya, **te1},
        "comfyui-clip": {**tiny_flux_lora_kohya(33, naming="comfyui"),
                         **kohya_lora(CLIP, "text_encoders.clip_l.transformer.", 44, naming="comfyui")},
        "peft-clip": {**oracle, **_peft_clip(te1, "lora_te1_")},
        "xlabs": xlabs,
        "xlabs-oracle": xlabs_oracle,
        "mixture": mixture,
        "mixture-oracle": mixture_oracle,
        "dora-unit": _dora(plain, weights, 0.0),
        "dora": _dora(plain, weights, 0.8),
        "lora-bias": {**plain, **{f"transformer.{n}.lora_B.bias": torch.randn(fan_out, generator=gen) * 20
                                  for n, (_, fan_out) in TINY_FLUX_LORA_LAYERS.items()}},
        # refused
        "kohya-t5": {**kohya, **kohya_lora(T5, "lora_te2_", 45)},
        "comfyui-t5": {**tiny_flux_lora_kohya(33, naming="comfyui"),
                       **kohya_lora(T5, "text_encoders.t5xxl.transformer.", 45, naming="comfyui")},
        "peft-t5": {**plain, **{f"text_encoder_2.{k.removeprefix('transformer.')}": v for k, v in
                                tiny_flux_lora(46, layers=tuple(TINY_FLUX_LORA_LAYERS)[:4]).items()}},
        "kohya-dora": {**kohya, **{f"lora_unet_{n.replace('.', '_')}.dora_scale": torch.rand(fan_out, 1) + 0.5
                                   for n, (_, fan_out) in TINY_BFL_LAYERS.items()}},
        "loha": {**{f"lora_unet_double_blocks_0_img_attn_proj.hada_{w}": torch.randn(4, 32)
                    for w in ("w1_a", "w1_b", "w2_a", "w2_b")},
                 "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(4.0)},
        "lokr": {"lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.randn(4, 4),
                 "lora_unet_double_blocks_0_img_attn_proj.lokr_w2": torch.randn(8, 8)},
        "diff": {**kohya, "lora_unet_double_blocks_0_img_attn_proj.diff": torch.randn(32, 32)},
        "diff-b": {**kohya, "lora_unet_double_blocks_0_img_attn_proj.diff_b": torch.randn(32)},
        "bfl-control-norm": {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 32),
                             "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(96, 4),
                             "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16),
                             "double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(16)},
        "comfyui-norm-diff": {**kohya,
                              "lora_unet_double_blocks_0_img_attn_norm_query_norm.diff": torch.ones(16)},
        "clip-embedding": {**te1, **kohya_lora({"text_model.embeddings.position_embedding": (77, 32)},
                                               "lora_te1_", 47)},
        "mixed-naming": {**kohya_as_diffusers(kohya, target="transformer."),
                         **{k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v
                            for k, v in tiny_flux_lora(12, layers=("transformer_blocks.0.attn.to_q",)).items()
                            },
                         **te1},
        "unpaired": {**plain, "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32),
                     "transformer.transformer_blocks.0.norm1.linear.lora_A.weight": torch.randn(4, 32)},
        "unknown-kohya-layer": {**kohya, **kohya_lora({"double_blocks.0.img_attn.extra": (32, 32)},
                                                      "lora_unet_", 48)},
        "same-layer-twice": {**kohya, **{k: v for k, v in tiny_flux_lora_kohya(49, naming="comfyui").items()
                                         if ".img_attn.proj." in k}},
        "nan": {**plain, "transformer.transformer_blocks.0.attn.to_q.lora_B.weight":
                torch.full((32, 4), float("nan"))},
        "inf-alpha": {**kohya, "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(float("inf"))},
    }


class FormatOrigin(ImageOrigin):
    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__()
        for name, body in files.items():
            self.files[f"/{name}.safetensors"] = (body, "application/octet-stream")


@pytest.fixture(scope="module")
def origin(tiny_cache: Path) -> Iterator[FormatOrigin]:
    with FormatOrigin({name: lora_file_bytes(sd) for name, sd in _files(tiny_cache).items()}) as o:
        yield o


def _config(tmp: Path, prefetch: bool) -> dict[str, Any]:
    return {"server": {"default_response_format": "base64"}, "fetch": {"allow_hosts": ["127.0.0.1"]},
            "loras": {"prefetch": prefetch, "cache_dir": str(tmp / "loras"), "max_resident": 8},
            "scheduler": {"batch_window_ms": 0}}


@pytest.fixture(scope="module")
def app(make_app: Callable[..., InProcessServer],
        tmp_path_factory: pytest.TempPathFactory) -> InProcessServer:
    return make_app(_config(tmp_path_factory.mktemp("formats"), prefetch=True))


@pytest.fixture(scope="module")
def worker_checks(make_app: Callable[..., InProcessServer],
                  tmp_path_factory: pytest.TempPathFactory) -> InProcessServer:
    """No prefetch: the API queues the job and the worker's own checks (the engine's) refuse the file."""
    return make_app(_config(tmp_path_factory.mktemp("formats-worker"), prefetch=False), engine="tiny")


def body(origin: FormatOrigin, *names: str, scale: float = 1.0) -> dict[str, Any]:
    return {"prompt": "a red barn", "width": 64, "height": 64, "steps": 2, "seed": 3, "output_format": "png",
            "image_loras": [{"path": origin.url(f"/{n}.safetensors"), "scale": scale} for n in names]}


def image(app: InProcessServer, origin: FormatOrigin, *names: str) -> Image.Image:
    return images_of(app.generate(**body(origin, *names)))[0]


def refusal(app: InProcessServer, origin: FormatOrigin, name: str) -> str:
    resp = app.generate(**body(origin, name))
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "image_loras" and err["type"] == "invalid_request_error"
    assert origin.url(f"/{name}.safetensors") in err["message"]
    return str(err["message"])


# ------------------------------------------------------------------------------- the three reports


def test_kohya_clip_weights_are_applied(app: InProcessServer, origin: FormatOrigin) -> None:
    """Report 1: a kohya LoRA with CLIP-L weights (lora_te1_...) next to transformer weights: 200, and the
    image is not the transformer-only LoRA's; ComfyUI's and diffusers' names for the same weights agree."""
    with_clip = image(app, origin, "kohya-clip")
    assert mean_abs_diff(with_clip, image(app, origin, "kohya")) > VISIBLE
    assert mean_abs_diff(with_clip, image(app, origin, "comfyui-clip")) <= SAME
    assert mean_abs_diff(with_clip, image(app, origin, "peft-clip")) <= SAME


@pytest.mark.parametrize(("name", "count", "sample"), [
    ("kohya-t5", 12, "lora_te2_encoder_block_0_layer_0_SelfAttention_"),
    ("comfyui-t5", 12, "text_encoders.t5xxl.transformer.encoder.block.0"),
    ("peft-t5", 8, "text_encoder_2.transformer_blocks.0.attn."),
])
def test_t5_weights_are_refused_naming_t5(app: InProcessServer, worker_checks: InProcessServer,
                                          origin: FormatOrigin, name: str, count: int, sample: str) -> None:
    """Report 2: T5 weights in kohya (lora_te2_), ComfyUI (t5xxl) or diffusers (text_encoder_2) naming are
    one 400, naming T5 and the count, never a silent partial load."""
    for server in (app, worker_checks):
        message = refusal(server, origin, name)
        assert f"{count} T5 weights ({sample}" in message, message
        assert "which Darkroom cannot apply" in message


def test_kohya_dora_scale_is_refused(app: InProcessServer, worker_checks: InProcessServer,
                                     origin: FormatOrigin) -> None:
    """Report 3: kohya/LyCORIS DoRA magnitudes (dora_scale), which diffusers drops with a warning: 400."""
    for server in (app, worker_checks):
        message = refusal(server, origin, "kohya-dora")
        assert "5 DoRA magnitudes (lora_unet_double_blocks_0_" in message
        assert "DoRA LoRAs are not supported" in message


# ------------------------------------------------------------------------- applied: the table rows


def test_plain_formats_apply_the_same_weights(app: InProcessServer, origin: FormatOrigin) -> None:
    """kohya, ComfyUI, xlabs and diffusers' mixture names are converted to exactly the weights of the
    diffusers/peft file computed here from sd-scripts' definition (alpha / rank folded in, fused qkv
    split)."""
    plain = image(app, origin)
    kohya = image(app, origin, "kohya")
    assert mean_abs_diff(plain, kohya) > VISIBLE
    assert mean_abs_diff(kohya, image(app, origin, "kohya-oracle")) <= SAME
    assert mean_abs_diff(kohya, image(app, origin, "comfyui")) <= SAME
    xlabs = image(app, origin, "xlabs")
    assert mean_abs_diff(plain, xlabs) > VISIBLE / 2
    assert mean_abs_diff(xlabs, image(app, origin, "xlabs-oracle")) <= SAME
    mixture = image(app, origin, "mixture")
    assert mean_abs_diff(plain, mixture) > VISIBLE / 2
    assert mean_abs_diff(mixture, image(app, origin, "mixture-oracle")) <= SAME


def test_peft_alphas_are_applied(app: InProcessServer, origin: FormatOrigin) -> None:
    """Per-layer alphas (alpha 8 at rank 4) act as a scale of 2: half the weights with them are the LoRA."""
    assert mean_abs_diff(image(app, origin, "peft-alpha"), image(app, origin, "peft")) <= SAME


def test_dora_magnitudes_are_applied_as_dora(app: InProcessServer, origin: FormatOrigin) -> None:
    """diffusers/peft DoRA (lora_magnitude_vector): with magnitudes equal to the row norms of W + BA the
    output is the plain LoRA's (DoRA's definition); other magnitudes change it."""
    plain = image(app, origin, "peft")
    assert mean_abs_diff(image(app, origin, "dora-unit"), plain) <= SAME
    assert mean_abs_diff(image(app, origin, "dora"), plain) > VISIBLE


def test_lora_biases_are_applied(app: InProcessServer, origin: FormatOrigin) -> None:
    """peft's lora_B.bias (lora_bias=True adapters)."""
    assert mean_abs_diff(image(app, origin, "lora-bias"), image(app, origin, "peft")) > VISIBLE


# ------------------------------------------------------------------------- refused: the table rows

REFUSED = [
    ("loha", "4 LyCORIS LoHa weights (lora_unet_double_blocks_0_img_attn_proj.hada_w1_a"),
    ("lokr", "2 LyCORIS LoKr weights (lora_unet_double_blocks_0_img_attn_proj.lokr_w1"),
    ("diff", "1 full-weight deltas (lora_unet_double_blocks_0_img_attn_proj.diff)"),
    ("diff-b", "1 bias deltas (lora_unet_double_blocks_0_img_attn_proj.diff_b)"),
    ("bfl-control-norm", "2 norm weights (double_blocks.0.img_attn.norm.key_norm.scale"),
    ("comfyui-norm-diff", "1 norm weights (lora_unet_double_blocks_0_img_attn_norm_query_norm.diff)"),
    ("clip-embedding", "3 embedding weights (lora_te1_text_model_embeddings_position_embedding"),
    ("mixed-naming", "12 weights diffusers' converter would drop (lora_te1_"),
    ("unpaired", "1 LoRA weights without their other half (transformer.transformer_blocks.0.norm1.linear"),
    ("unknown-kohya-layer",
     "3 weights of layers FLUX does not have (lora_unet_double_blocks_0_img_attn_extra"),
    ("same-layer-twice",
     "1 of the 8 transformer LoRA layers it names would be lost in diffusers' conversion"),
    ("nan",
     "1 weights with NaN or infinite values (transformer.transformer_blocks.0.attn.to_q.lora_B.weight)"),
    ("inf-alpha", "1 weights with NaN or infinite values (lora_unet_double_blocks_0_img_attn_proj.alpha)"),
]


@pytest.mark.parametrize(("name", "fragment"), REFUSED, ids=[n for n, _ in REFUSED])
def test_refused_formats_name_the_part_and_count(worker_checks: InProcessServer, origin: FormatOrigin,
                                                 name: str, fragment: str) -> None:
    assert fragment in refusal(worker_checks, origin, name)


def test_refusals_come_before_the_queue_with_prefetch(make_app: Callable[..., InProcessServer],
                                                       tmp_path: Path, origin: FormatOrigin) -> None:
    """With loras.prefetch the API refuses each of these files before queueing: no job reaches the engine."""
    standin = make_app(_config(tmp_path, prefetch=True), engine="stand-in")
    for name, fragment in REFUSED:
        if name != "same-layer-twice":  # found after diffusers' conversion, by the worker
            assert fragment in refusal(standin, origin, name)
    assert standin.engines[0].calls == []
    assert standin.generate(**body(origin, "kohya-clip")).status_code == 200
    assert len(standin.engines[0].calls) == 1


def test_job_log_line_and_metrics_show_the_loras(app: InProcessServer, origin: FormatOrigin) -> None:
    before_one, before_none = app.batches_with_loras("1.0"), app.batches_with_loras("0.0")
    resp = app.generate(**body(origin, "peft", scale=0.7))
    assert resp.status_code == 200
    path = origin.url("/peft.safetensors")
    done = f"job done id={resp.json()['id']}"
    # The worker logs the line just after it answers the job.
    wait_until(lambda: done in app.log(), "the job's log line", timeout_s=10, interval_s=0.02)
    line = next(ln for ln in app.log().splitlines() if done in ln)
    assert f"image_loras={path}@0.7 " in line
    assert app.batches_with_loras("1.0") == before_one + 1 and app.batches_with_loras("0.0") == before_none


def test_hotswap_slots_refuse_what_they_cannot_hold(origin: FormatOrigin, tiny_cache: Path,
                                                    tmp_path: Path) -> None:
    """In hotswap mode (slots of plain LoRA matrices on the transformer), CLIP weights, DoRA magnitudes and
    lora_B biases are refused by name rather than dropped by the swap."""
    from diffusers import FluxPipeline

    from server.config import FetchSettings, LoraSettings
    from server.engine.adapters import LoraManager
    from server.loras import LoraError, LoraStore

    pipe = FluxPipeline.from_pretrained(ensure_tiny_flux(tiny_cache), dtype=torch.float32)
    store = LoraStore(LoraSettings(cache_dir=tmp_path, hotswap=True, hotswap_target_rank=8),
                      FetchSettings(allow_hosts=["127.0.0.1"]), tmp_path)
    manager = LoraManager(store)
    manager.prepare("darkroom/tiny-flux", pipe)  # the slots, as a worker makes them before any LoRA
    for name, fragment in (("kohya-clip", "has text-encoder weights"),
                           ("dora", "has DoRA magnitudes \\(lora_magnitude_vector\\), which"),
                           ("lora-bias", "has lora_B biases, which"), ("peft", None)):
        url = origin.url(f"/{name}.safetensors")
        with store.use(url) as file:
            if fragment is None:
                assert manager.inspect("darkroom/tiny-flux", pipe, file, url).rank == 4
            else:
                with pytest.raises(LoraError, match=fragment):
                    manager.inspect("darkroom/tiny-flux", pipe, file, url)
    store.close()


def test_each_loader_is_accounted_for_as_it_converts() -> None:
    """The same names under FLUX.1's loader and FLUX.2's: FLUX.2 loads the transformer only, knows its own
    kohya layers (any number of blocks, no per-block modulation) and keeps linear1 fused; a check for no
    particular model (None: a prefetch that does not know it) refuses only what no loader applies."""
    from server.lora_format import FLUX1, FLUX2, check_header, classify
    from server.safetensors_header import FormatError, Limits

    clip = {**tiny_flux_lora(11),
            **{f"text_encoder.{n}.lora_A.weight": torch.zeros(4, 32) for n in CLIP_LAYERS},
            **{f"text_encoder.{n}.lora_B.weight": torch.zeros(32, 4) for n in CLIP_LAYERS}}
    assert classify(clip, FLUX1).problem() is None
    assert "8 text-encoder weights (text_encoder." in classify(clip, FLUX2).problem().message
    deep = kohya_lora({"single_blocks.40.linear1": (32, 224), "double_blocks.0.img_attn.qkv": (32, 96)},
                      "lora_unet_", 50)
    assert classify(deep, FLUX2).problem() is None
    assert classify(deep, FLUX2).converted_layers["transformer"] == 4  # qkv: three; linear1: one
    assert "3 weights of layers FLUX does not have (lora_unet_single_blocks_40_linear1" in \
        classify(deep, FLUX1).problem().message
    mod = kohya_lora({"double_blocks.0.img_mod.lin": (32, 192)}, "lora_unet_", 51)
    assert classify(mod, FLUX1).problem() is None and classify(mod, FLUX2).problem() is not None

    def header(state: dict[str, torch.Tensor]) -> bytes:
        raw = lora_file_bytes(state)
        return raw[8 : 8 + int.from_bytes(raw[:8], "little")]

    for state in (clip, deep):  # each applies on one of the two
        check_header(header(state), Limits())
    with pytest.raises(FormatError, match="12 T5 weights"):  # and T5 on neither
        check_header(header({**tiny_flux_lora_kohya(33), **kohya_lora(T5, "lora_te2_", 45)}), Limits())
