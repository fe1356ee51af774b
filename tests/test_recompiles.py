"""No compile after warm-up: what the warm-up covers, LoRA switches under hotswap slots, the counters.

torch.compile runs with dynamo's ``eager`` backend here: dynamo traces, guards and recompiles exactly as
with inductor (the counts are dynamo's), without generating code, so these tests take seconds on a CPU.
One engine is shared by the module: it is warmed once, as a worker does before ``/ready``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.config import EngineSettings, FetchSettings, LoraSettings, SafetySettings
from server.engine import optimize
from server.engine.compile_stats import graphs_compiled
from server.engine.pipelines import Engine
from server.errors import InvalidRequest
from server.loras import LoraStore
from server.params import GenerationParams, LoraRef
from server.registry import ModelManifest, Registry

from .conftest import MODEL, REPO
from .support.tiny_loras import lora_file_bytes, tiny_flux_lora

TINY = yaml.safe_load((REPO / "models" / "tiny-flux.yaml").read_text())
SIZES = [(64, 64), (96, 80)]
MAX_BATCH = 4
ENGINE = {"compile": {"transformer": "regional", "vae_decoder": True, "backend": "eager"},
          "sequence_buckets": [32], "warmup": {"sizes": [list(s) for s in SIZES], "steps": 1}}


def manifest(engine: dict[str, Any]) -> ModelManifest:
    data = {**TINY, "engine": engine}
    data.pop("safety", None)
    return ModelManifest.model_validate(data)


@pytest.fixture(scope="module")
def warmed(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    folder = tmp_path_factory.mktemp("loras")
    registered = {}
    for seed, name in enumerate("abc", start=1):
        registered[name] = folder / f"{name}.safetensors"
        registered[name].write_bytes(lora_file_bytes(tiny_flux_lora(seed)))
    store = LoraStore(LoraSettings(cache_dir=folder / "cache", registered=registered, hotswap=True,
                                   hotswap_target_rank=8), FetchSettings(), tiny_cache)
    engine = Engine(Registry([manifest(ENGINE)]), EngineSettings(cache_dir=tiny_cache), "cpu",
                    SafetySettings(enabled=False), loras=store)
    engine.load()
    engine.warmup(max_batch_images=MAX_BATCH)
    return engine


def call(engine: Engine, width: int, height: int, length: int, images: int, loras: tuple[str, ...] = (),
         jobs: int = 1) -> None:
    """One pipeline call of ``images`` images spread over ``jobs`` requests (as the scheduler batches)."""
    per_job = [images // jobs + (1 if i < images % jobs else 0) for i in range(jobs)]
    batch = [GenerationParams(model=MODEL, prompt=f"a fox {i}", width=width, height=height, steps=1,
                              guidance_scale=3.5, seeds=tuple(range(10 * i, 10 * i + n)),
                              max_sequence_length=length, loras=tuple(LoraRef(name) for name in loras))
             for i, n in enumerate(per_job)]
    engine.generate(batch)


def test_warmup_plan_covers_the_batches_the_scheduler_forms() -> None:
    m = manifest(ENGINE)
    plan = optimize.warmup_plan(m, max_batch_images=MAX_BATCH)
    # Every size at every length (bucket 32, full 64), at batch 1, 2 and the largest (4: the scheduler's cap).
    assert plan == [(w, h, 1, length, b) for (w, h) in SIZES for length in (32, 64) for b in (1, 2, 4)]
    # scheduler.max_batch_pixels lowers the largest batch at a size; a lone request's n (max_n 4) still runs.
    assert {b for *_, b in optimize.warmup_plan(m, 8, max_batch_pixels=2 * 64 * 64)} == {1, 2, 4}
    assert {b for *_, b in optimize.warmup_plan(m, 8)} == {1, 2, 8}
    # Static shapes: every batch size; eager: batch 1 only.
    static = manifest({**ENGINE, "compile": {**ENGINE["compile"], "dynamic": False}})
    assert sorted({b for *_, b in optimize.warmup_plan(static, MAX_BATCH)}) == [1, 2, 3, 4]
    assert {b for *_, b in optimize.warmup_plan(manifest({}), MAX_BATCH)} == {1}


def test_after_warmup_a_mixed_run_compiles_nothing(warmed: Engine) -> None:
    counter = warmed.compile_counter
    assert counter.snapshot()["graphs"] > 0 and counter.snapshot()["recompiles_after_ready"] == 0
    before = graphs_compiled()
    lora_sets = itertools.cycle([(), ("a",), ("b",), ("a", "b"), ("c",), (), ("b", "c")])
    # Every warmed size, both lengths, every batch size the scheduler can form (as n or as several jobs),
    # with LoRAs switching on, off and between slots along the way.
    for (width, height), length, images in itertools.product(SIZES, (32, 64), range(1, MAX_BATCH + 1)):
        call(warmed, width, height, length, images, next(lora_sets), jobs=1 + (images > 2))
    assert graphs_compiled() == before
    assert counter.snapshot()["recompiles_after_ready"] == 0


def test_ten_lora_switches_compile_nothing(warmed: Engine) -> None:
    before = graphs_compiled()
    swaps = warmed.loras.swaps
    for names in [("a",), ("b",), ("c",), ("a", "b"), (), ("c",), ("b", "a"), ("a",), (), ("c", "b")]:
        call(warmed, 64, 64, 32, 1, names)
    assert graphs_compiled() == before and warmed.loras.swaps > swaps


def test_a_new_shape_is_counted_and_refused_under_fail_on_recompile(warmed: Engine) -> None:
    import torch

    counter = warmed.compile_counter
    before = counter.snapshot()["recompiles_after_ready"]
    try:
        counter.mark_ready(fail_on_recompile=True, compiled=True)  # as engine.fail_on_recompile does
        # A text length of 1: torch specialises sizes of 1, so no symbolic graph covers it.
        with pytest.raises(InvalidRequest, match="would compile anew.*engine.fail_on_recompile"):
            call(warmed, 64, 64, 1, 1)
        call(warmed, 96, 80, 32, 3)  # warmed shapes still run
    finally:
        torch.compiler.set_stance("default")
        counter.stance = "default"
    # Without the stance the same request compiles, and the counter says so.
    call(warmed, 64, 64, 1, 1)
    assert counter.snapshot()["recompiles_after_ready"] > 0 == before
