"""No compile after ``/ready``: what the warm-up covers, LoRA switches on a compiled model, the counters.

One in-process app serves the tiny model with its transformer (regional) and VAE decoder compiled, LoRAs
on and nothing said about hotswap: a compiled transformer gets hotswap slots by itself. torch.compile runs
with dynamo's ``eager`` backend: dynamo traces, guards and recompiles exactly as with inductor (the counts
are dynamo's), without generating code, so the warm-up takes seconds on a CPU.
"""

from __future__ import annotations

import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.engine import optimize
from server.errors import InvalidRequest
from server.params import GenerationParams

from .conftest import MODEL, decode_image
from .support.engines import TINY, tiny_manifest
from .support.inprocess import InProcessServer
from .support.tiny_loras import lora_file_bytes, tiny_flux_lora

pytestmark = pytest.mark.heavy

SIZES = [(64, 64), (96, 80)]
MAX_BATCH = 4
ENGINE = {"compile": {"transformer": "regional", "vae_decoder": True, "backend": "eager"},
          "sequence_buckets": [32], "warmup": {"sizes": [list(s) for s in SIZES], "steps": 1}}
SHORT, LONG = "a fox", "a red fox in the snow at dawn, long grass"  # the 32 bucket, and the full 64


@pytest.fixture(scope="module")
def compiled(make_app: Any, tmp_path_factory: pytest.TempPathFactory) -> InProcessServer:
    folder = tmp_path_factory.mktemp("compiled")
    (folder / "models").mkdir()
    (folder / "models" / "tiny-flux.yaml").write_text(yaml.safe_dump({**TINY, "engine": ENGINE}))
    registered = {}
    for seed, name in enumerate("abc", start=1):
        registered[name] = str(folder / f"{name}.safetensors")
        Path(registered[name]).write_bytes(lora_file_bytes(tiny_flux_lora(seed)))
    return make_app({
        "models_dir": str(folder / "models"),
        "server": {"default_response_format": "base64"},
        # Jobs sent together share a call: the batch sizes come from the requests, as in production.
        "scheduler": {"max_batch_images": MAX_BATCH, "batch_window_ms": 300},
        "loras": {"registered": registered, "hotswap_target_rank": 8, "cache_dir": str(folder / "cache")},
    })


def generate(app: InProcessServer, width: int, height: int, prompt: str, n: int = 1,
             loras: tuple[str, ...] = (), seed: int = 1) -> Any:
    response = app.generate(prompt=prompt, width=width, height=height, steps=1, n=n, seed=seed,
                            image_loras=[{"path": name, "scale": 0.8} for name in loras])
    assert response.status_code == 200, response.text
    return response.json()


def compile_state(app: InProcessServer) -> dict[str, Any]:
    ready = app.client.get("/ready")
    assert ready.status_code == 200, ready.text
    return ready.json()["compile"]


def test_warmup_plan_covers_the_batches_the_scheduler_forms() -> None:
    m = tiny_manifest(ENGINE)
    plan = optimize.warmup_plan(m, max_batch_images=MAX_BATCH)
    # Every size at every length (bucket 32, full 64), at batch 1, 2 and the largest (4: the scheduler's cap).
    assert plan == [(w, h, 1, length, b) for (w, h) in SIZES for length in (32, 64) for b in (1, 2, 4)]
    # scheduler.max_batch_pixels lowers the largest batch at a size; a lone request's n (max_n 4) still runs.
    assert {b for *_, b in optimize.warmup_plan(m, 8, max_batch_pixels=2 * 64 * 64)} == {1, 2, 4}
    assert {b for *_, b in optimize.warmup_plan(m, 8)} == {1, 2, 8}
    # Static shapes: every batch size; eager: batch 1 only.
    static = tiny_manifest({**ENGINE, "compile": {**ENGINE["compile"], "dynamic": False}})
    assert sorted({b for *_, b in optimize.warmup_plan(static, MAX_BATCH)}) == [1, 2, 3, 4]
    assert {b for *_, b in optimize.warmup_plan(tiny_manifest({}), MAX_BATCH)} == {1}


def test_after_ready_a_mixed_run_compiles_nothing(compiled: InProcessServer) -> None:
    state = compile_state(compiled)
    assert state["graphs"] > 0 and state["recompiles_after_ready"] == 0
    assert re.search(r"warm-up model=\S+ size=96x80 steps=1 max_sequence_length=64 batch=4 ", compiled.log())
    lora_sets = itertools.cycle([(), ("a",), ("b",), ("a", "b"), ("c",), (), ("b", "c")])
    sizes_seen = set()
    # Every warmed size at both lengths, every batch size the scheduler can form (one request of n images,
    # and 4 as two requests of 2 sent together), LoRAs switching on, off and between slots along the way.
    for (width, height), prompt, n in itertools.product(SIZES, (SHORT, LONG), range(1, MAX_BATCH + 1)):
        body = generate(compiled, width, height, prompt, n, next(lora_sets))
        assert body["batch"]["images"] == n
        sizes_seen.add(images_of_json(body)[0].size)
    for (width, height), prompt in itertools.product(SIZES, (SHORT, LONG)):
        loras = next(lora_sets)
        with ThreadPoolExecutor(2) as pool:
            pair = list(pool.map(lambda seed: generate(compiled, width, height, prompt, 2, loras, seed), (5, 6)))
        assert max(body["batch"]["images"] for body in pair) == 4  # one call of both requests
    assert sizes_seen == set(SIZES)
    assert compile_state(compiled)["recompiles_after_ready"] == 0
    metrics = compiled.client.get("/metrics").text
    assert re.search(r'^darkroom_recompiles_after_ready_total\{worker="worker-cpu"\} 0\.0$', metrics, re.M)
    graphs = re.search(r'^darkroom_compiled_graphs\{worker="worker-cpu"\} (\d+)\.0$', metrics, re.M)
    assert graphs and int(graphs.group(1)) == compile_state(compiled)["graphs"] > 0


def test_ten_lora_switches_compile_nothing(compiled: InProcessServer) -> None:
    before = compile_state(compiled)
    engine = compiled.runtime.workers[0].engine
    assert engine.loras.hotswap(MODEL)  # compiled transformer: slots, though loras.hotswap is off
    swaps = engine.loras.swaps
    images = {}
    for names in [("a",), ("b",), ("c",), ("a", "b"), (), ("c",), ("b", "a"), ("a",), (), ("c", "b")]:
        images[names] = images_of_json(generate(compiled, 64, 64, SHORT, 1, names))[0]
    assert compile_state(compiled) == before and engine.loras.swaps > swaps
    assert images[("a",)].tobytes() != images[()].tobytes() != images[("c",)].tobytes()
    # One LoRA per slot (2): a third is refused by the API, before any work.
    response = compiled.generate(prompt=SHORT, width=64, height=64, steps=1,
                                 image_loras=[{"path": name} for name in "abc"])
    assert response.status_code == 400 and "at most 2 LoRAs" in response.json()["error"]["message"]


def test_fail_on_recompile_refuses_a_new_shape_and_counts_otherwise(compiled: InProcessServer) -> None:
    import torch

    engine = compiled.runtime.workers[0].engine
    counter = engine.compile_counter
    # A text length of 1: torch specialises sizes of 1, so no symbolic graph covers it (no request can ask
    # for it; the engine is called directly, between requests).
    odd = GenerationParams(model=MODEL, prompt="x", width=64, height=64, steps=1, guidance_scale=3.5,
                           seeds=(1,), max_sequence_length=1)
    try:
        counter.mark_ready(fail_on_recompile=True, compiled=True)  # as engine.fail_on_recompile does
        assert compile_state(compiled)["stance"] == "fail_on_recompile"
        assert "compile stance after warm-up: fail_on_recompile" in compiled.log()
        with pytest.raises(InvalidRequest, match="would compile anew.*engine.fail_on_recompile"):
            engine.generate([odd])
        generate(compiled, 96, 80, LONG, 3)  # warmed shapes still run
    finally:
        torch.compiler.set_stance("default")
        counter.stance = "default"
    # Without the stance the same call compiles, and /ready counts it.
    engine.generate([odd])
    assert compile_state(compiled)["recompiles_after_ready"] > 0
    assert "compile after ready" in compiled.log()


def images_of_json(body: dict[str, Any]) -> list[Any]:
    return [decode_image(item["b64_json"]) for item in body["data"]]
