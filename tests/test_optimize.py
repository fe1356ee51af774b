"""Engine optimizations (manifest ``engine:`` block, server/engine/optimize.py) on the tiny model, on CPU.

Each option is compared with the plain engine on the same seeds: compile and fused QKV must give the same
images within a small tolerance; sequence buckets shorten T5's padding, which FLUX's attention sees, so
their effect is measured and bounded. A server with warm-up sizes logs every warm-up call before ready.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.engine import optimize
from server.engine.pipelines import Engine
from server.params import GenerationParams

from .conftest import MODEL, images_of, mean_abs_diff
from .support.engines import TINY, cpu_engine, tiny_manifest


def params(**changes: Any) -> GenerationParams:
    base: dict[str, Any] = dict(model=MODEL, prompt="a red fox in the snow", width=64, height=64, steps=2,
                                guidance_scale=3.5, seeds=(11, 12), max_sequence_length=64)
    return GenerationParams(**{**base, **changes})


@pytest.fixture(scope="module")
def plain(tiny_cache: Path) -> Engine:
    return cpu_engine(tiny_manifest(), tiny_cache)


def test_defaults_change_nothing() -> None:
    m = tiny_manifest()
    assert m.engine.attention_backend is None and not m.engine.fuse_qkv
    assert m.engine.compile.transformer == "none" and not m.engine.compile.vae_decoder
    assert m.engine.quantize == "none" and m.engine.sequence_buckets == []
    assert optimize.warmup_plan(m, 8) == [(64, 64, 1, 64, 1)]  # eager: batch 1 only
    assert m.sequence_length("x" * 500) == 64


@pytest.mark.heavy
def test_compiled_transformer_and_vae_match_eager(plain: Engine, tiny_cache: Path, tmp_path: Path) -> None:
    compiled = cpu_engine(tiny_manifest({"compile": {"transformer": "regional", "vae_decoder": True,
                                                "cache_dir": str(tmp_path / "inductor")}}), tiny_cache)
    # Inductor's C++ compiles are what cost here (one g++ run per kernel, about a minute on two CPU cores):
    # one step of one image runs every compiled graph (both block types, the decoder) once, and scalar
    # kernels (simdlen 0) skip the probe builds for each vector ISA. The GPU path generates Triton instead.
    import torch._inductor.config as inductor_config

    one = params(steps=1, seeds=(11,))
    eager_images = plain.generate([one]).images[0]
    with inductor_config.patch({"cpp.simdlen": 0}):
        compiled_images = compiled.generate([one]).images[0]
    assert len(eager_images) == len(compiled_images) == 1
    for a, b in zip(eager_images, compiled_images):
        assert mean_abs_diff(a, b) < 1.0
    # The blocks really run compiled, and inductor wrote its cache where the manifest said.
    blocks = compiled.pipeline(MODEL).transformer.transformer_blocks
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert any((tmp_path / "inductor").iterdir())


def test_fused_qkv_matches_unfused(plain: Engine, tiny_cache: Path) -> None:
    fused = cpu_engine(
        tiny_manifest({"fuse_qkv": True}, capabilities={**TINY["capabilities"], "loras": False}),
        tiny_cache
    )
    attn = fused.pipeline(MODEL).transformer.transformer_blocks[0].attn
    assert attn.fused_projections and hasattr(attn, "to_qkv")
    for a, b in zip(plain.generate([params()]).images[0], fused.generate([params()]).images[0]):
        assert mean_abs_diff(a, b) < 1.0


def test_fused_qkv_refuses_loras() -> None:
    with pytest.raises(ValueError, match="fuse_qkv cannot serve LoRAs"):
        tiny_manifest({"fuse_qkv": True})


def test_attention_backend_native_matches_default(plain: Engine, tiny_cache: Path) -> None:
    native = cpu_engine(tiny_manifest({"attention_backend": "native"}), tiny_cache)
    for a, b in zip(plain.generate([params()]).images[0], native.generate([params()]).images[0]):
        assert mean_abs_diff(a, b) < 1.0
    with pytest.raises(optimize.EngineOptionError, match="attention_backend 'no-such-backend'"):
        cpu_engine(tiny_manifest({"attention_backend": "no-such-backend"}), tiny_cache)


def test_sequence_buckets_pick_the_smallest_that_fits() -> None:
    m = tiny_manifest({"sequence_buckets": [16, 32]})
    assert m.sequence_length("a fox") == 16  # 5 characters + "▁" + </s>
    assert m.sequence_length("x" * 14) == 16
    assert m.sequence_length("x" * 15) == 32
    # The negative prompt is encoded at the same length: the longer of the two decides.
    assert m.sequence_length("a fox", "y" * 20) == 32
    # Past the last bucket: the model's full length, never a truncation a bucket would add.
    assert m.sequence_length("x" * 31) == 64
    # NFKC may lengthen text ("ﬁ" is "fi"): the bound counts the normalised form.
    assert m.sequence_length("ﬁ" * 7) == 16 and m.sequence_length("ﬁ" * 8) == 32
    with pytest.raises(ValueError, match="must not exceed"):
        tiny_manifest({"sequence_buckets": [16, 128]})
    with pytest.raises(ValueError, match="increasing"):
        tiny_manifest({"sequence_buckets": [32, 16]})


def test_sequence_bucket_changes_images_measurably(plain: Engine) -> None:
    # FLUX attends to T5's padding tokens (no attention mask), so a shorter padding is not bit-identical.
    # Measured on the tiny model (mean abs difference of 0..255 pixels, "a fox", seeds 11/12): 64 -> 48
    # about 0.8, 64 -> 32 about 2.4, 64 -> 16 about 5.5, against about 8.4 for another seed. A request's
    # bucket depends on its own prompts only, so its image never depends on what it is batched with.
    short = dict(prompt="a fox")
    full = plain.generate([params(**short, max_sequence_length=64)]).images[0]
    bucket = plain.generate([params(**short, max_sequence_length=32)]).images[0]
    again = plain.generate([params(**short, max_sequence_length=32)]).images[0]
    other_seed = plain.generate([params(**short, seeds=(99, 98))]).images[0]
    for f, b, a, o in zip(full, bucket, again, other_seed):
        assert mean_abs_diff(b, a) == 0
        assert 0 < mean_abs_diff(f, b) < 0.5 * mean_abs_diff(f, o)


def test_fp8_without_torchao_is_a_clear_error(tiny_cache: Path) -> None:
    # torchao is not a dependency; this is about its absence.
    try:
        import torchao  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - an environment that has it still refuses fp8 on a CPU
        with pytest.raises(optimize.EngineOptionError, match="CUDA device"):
            cpu_engine(tiny_manifest({"quantize": "fp8"}), tiny_cache)
        return
    with pytest.raises(optimize.EngineOptionError, match=r"fp8 needs the torchao package.*pip install torchao"):
        cpu_engine(tiny_manifest({"quantize": "fp8"}), tiny_cache)


def test_server_warms_configured_sizes_and_buckets_before_ready(make_app: Any, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    data = {**TINY, "engine": {"sequence_buckets": [16], "warmup": {"sizes": [[64, 64], [96, 80]], "steps": 2}}}
    (models / "tiny-flux.yaml").write_text(yaml.safe_dump(data))
    server = make_app({"models_dir": str(models), "server": {"default_response_format": "base64"}})
    # make_app returned once /ready answered 200: every warm-up call is logged before the worker
    # reported ready.
    log = server.log()
    warmups = re.findall(r"warm-up model=\S+ size=(\d+x\d+) steps=(\d+) max_sequence_length=(\d+)", log)
    assert warmups == [("64x64", "2", "16"), ("64x64", "2", "64"), ("96x80", "2", "16"), ("96x80", "2", "64")]
    assert log.rindex("warm-up model=") < log.index("worker ready")
    # A short prompt runs in the 16 bucket, a long one at the full 64, both served.
    short = images_of(server.generate(prompt="a fox", width=64, height=64, steps=1, seed=5))
    long = images_of(server.generate(prompt="a fox " * 10, width=64, height=64, steps=1, seed=5))
    assert short[0].size == long[0].size == (64, 64)
