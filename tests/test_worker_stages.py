"""The stages beside the device loop (issue 17, issue 13): post-processing (order, bounded hand-off), the LoRA
prefetch stage, the prompt-embedding cache, and the response path (one JSON encoding, Server-Timing).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from server.api.images import render_body
from server.config import EngineSettings, FetchSettings, LoraSettings, SchedulerSettings
from server.engine.pipelines import Engine
from server.engine.prompt_cache import PromptCache
from server.images import encode_image
from server.jobs import Job
from server.loras import LoraStore
from server.params import GenerationParams, LoraRef
from server.queue.memory import MemoryQueue
from server.registry import Registry
from server.worker.loop import LoopOptions, Worker
from server.worker.post import Finished, PostProcessor

from .conftest import MODEL, images_of
from .image_origin import ImageOrigin
from .support.inprocess import InProcessServer
from .support.launch import wait_until
from .support.standin import StandInEngine
from .support.tiny_loras import lora_file_bytes, tiny_clip_lora, tiny_flux_lora

WAIT_S = 60.0


def params(seed: int, size: int = 64, prompt: str | None = None) -> GenerationParams:
    return GenerationParams(model="stand-in", prompt=prompt or f"prompt {seed}", width=size, height=size,
                            steps=1, guidance_scale=3.5, seeds=(seed,), output_format="png")


def started_job(p: GenerationParams) -> Job:
    job = Job.create(p, 60.0)
    assert job.try_start()
    return job


wait_for = functools.partial(wait_until, timeout_s=WAIT_S, interval_s=0.01)


# --- post-processing ---------------------------------------------------------------------------------


def test_jobs_are_answered_in_order_even_when_their_encodes_finish_out_of_order() -> None:
    later_done = threading.Semaphore(0)

    def encode(image: Image.Image, p: GenerationParams) -> bytes:
        seed = image.getpixel((0, 0))[0]
        if seed == 1:  # the first job's image is encoded after its batch mate's
            assert later_done.acquire(timeout=WAIT_S)
        data = encode_image(image, p.output_format)
        if seed != 1:
            later_done.release()
        return data

    engine = StandInEngine()
    post = PostProcessor(engine, "order", threads=4, max_batches=2, encode=encode)
    answered: list[int] = []
    lock = threading.Lock()
    batches = [[started_job(params(1)), started_job(params(2))],
               [started_job(params(3)), started_job(params(4))]]
    for batch in batches:
        for job in batch:
            job.future.add_done_callback(
                lambda f, s=job.params.seeds[0]: (lock.acquire(), answered.append(s), lock.release()))
        images = [engine.generate([job.params]).images[0] for job in batch]
        post.submit(Finished("batch", batch, images, time.monotonic(), 0.0))
    for batch in batches:
        for job in batch:
            assert job.future.result(timeout=WAIT_S).images[0].seed == job.params.seeds[0]
    post.close(WAIT_S)
    assert answered == [1, 2, 3, 4]


def test_a_slow_consumer_never_grows_the_handoff_beyond_its_bound() -> None:
    """The safety screen (post-processing) is held: the device runs 1 call being screened + 2 waiting in the
    hand-off + 1 in hand, then waits, instead of piling decoded images up."""
    queue = MemoryQueue(max_jobs=16)
    engine = StandInEngine()
    engine.screen_gate = threading.Event()
    worker = Worker(engine, queue, SchedulerSettings(batch_window_ms=0, max_batch_images=1),
                    options=LoopOptions(handoff_batches=2))
    jobs = [Job.create(params(seed), 60.0) for seed in range(10)]
    for job in jobs:
        queue.put(job)
    worker.start()
    try:
        wait_for(lambda: len(engine.calls) == 4, "four calls")
        wait_for(lambda: worker.post.waiting == 2, "a full hand-off")
        time.sleep(0.3)  # room to overrun the bound, if it could be overrun
        assert len(engine.calls) == 4 and queue.depth() == 6
        assert worker.post.high_water == 2 and not any(job.future.done() for job in jobs)
        engine.screen_gate.set()
        seeds = [job.future.result(timeout=WAIT_S).images[0].seed for job in jobs]
        assert seeds == list(range(10))
        assert worker.post.high_water <= 2
    finally:
        engine.screen_gate.set()
        queue.close()
        worker.stop()


# --- the LoRA prefetch stage ---------------------------------------------------------------------------


class GatedLoraOrigin(ImageOrigin):
    """Serves a tiny LoRA at /gated/lora.safetensors only once ``gate`` is set; ``asked`` when requested."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = threading.Event()
        self.gate = threading.Event()
        self.lora = lora_file_bytes(tiny_flux_lora(7))

    def _handle(self, h: Any, path: str, query: dict[str, list[str]]) -> None:
        if path == "/gated/lora.safetensors":
            self.asked.set()
            self.gate.wait(WAIT_S)
            self._send(h, 200, self.lora, "application/octet-stream")
            return
        super()._handle(h, path, query)


@pytest.fixture(scope="module")
def gated() -> Iterator[GatedLoraOrigin]:
    with GatedLoraOrigin() as origin:
        yield origin


def test_a_plain_job_is_not_held_behind_a_lora_download(make_app: Any, gated: GatedLoraOrigin) -> None:
    """Issue 13: with ``loras.prefetch: false`` (or a worker pod lacking the file) the LoRA was downloaded
    inside the pipeline call, holding every job behind it."""
    app: InProcessServer = make_app({
        "server": {"default_response_format": "base64"},
        "fetch": {"allow_hosts": ["127.0.0.1"]},
        "loras": {"prefetch": False},
    })
    small = {"prompt": "a red barn", "width": 64, "height": 64, "steps": 1, "output_format": "png"}
    lora_response: list[Any] = []
    with_lora = threading.Thread(target=lambda: lora_response.append(app.generate(
        **small, seed=1, image_loras=[{"path": gated.url("/gated/lora.safetensors"), "scale": 1.0}])))
    with_lora.start()
    try:
        assert gated.asked.wait(WAIT_S), "the worker never asked for the LoRA"
        plain = app.generate(**small, seed=2)
        assert plain.status_code == 200, plain.text
        assert with_lora.is_alive() and not gated.gate.is_set()  # the download is still in progress
    finally:
        gated.gate.set()
        with_lora.join(WAIT_S)
    [image] = images_of(lora_response[0])
    [alone] = images_of(app.generate(**small, seed=1))
    assert np.abs(np.asarray(image, np.int16) - np.asarray(alone, np.int16)).mean() > 1  # the LoRA acted


# --- the prompt-embedding cache ------------------------------------------------------------------------


class FakeTextPipe:
    """``encode_prompt`` as diffusers' FLUX has it: [B, seq, 8] embeddings and [B, 4] pooled, per prompt."""

    def __init__(self) -> None:
        self.encoded: list[list[str]] = []

    def encode_prompt(self, prompt: list[str], prompt_2: Any, device: Any, num_images_per_prompt: int,
                      max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.encoded.append(list(prompt))
        codes = torch.tensor([float(sum(map(ord, p))) for p in prompt])
        embeds = codes[:, None, None].expand(-1, max_sequence_length, 8).clone()
        return embeds, codes[:, None].expand(-1, 4).clone(), torch.zeros(max_sequence_length, 3)


def test_prompt_cache_hits_keys_and_byte_cap() -> None:
    pipe = FakeTextPipe()
    row = 16 * 8 * 4 + 4 * 4  # bytes of one prompt at max_sequence_length 16 (float32)
    cache = PromptCache(max_bytes=3 * row)
    embeds, pooled = cache.embeddings(pipe, "m", ["a", "b", "a"], 16, (), "cpu")
    assert pipe.encoded == [["a", "b"]]  # each distinct prompt once, in one call
    assert embeds.shape == (3, 16, 8) and pooled.shape == (3, 4)
    assert torch.equal(embeds[0], embeds[2]) and not torch.equal(embeds[0], embeds[1])
    again, _ = cache.embeddings(pipe, "m", ["b", "a"], 16, (), "cpu")
    assert pipe.encoded == [["a", "b"]] and torch.equal(again, embeds[[1, 0]])  # both hits: no encoder call
    # Another sequence bucket, another LoRA set (a LoRA may carry text-encoder weights), another model:
    # misses.
    cache.embeddings(pipe, "m", ["a"], 32, (), "cpu")
    cache.embeddings(pipe, "m", ["a"], 16, (LoraRef("te.safetensors", 0.8),), "cpu")
    cache.embeddings(pipe, "other", ["a"], 16, (), "cpu")
    assert pipe.encoded[1:] == [["a"], ["a"], ["a"]]
    stats = cache.stats()
    assert stats["prompt_cache_hits"] == 2 and stats["prompt_cache_misses"] == 5
    # Bytes-capped, least recently used out: the 32-token entry is twice a row, so at most 3 rows' worth stay.
    assert stats["prompt_cache_bytes"] <= 3 * row and stats["prompt_cache_evictions"] >= 2
    cache.embeddings(pipe, "other", ["a"], 16, (), "cpu")
    assert cache.stats()["prompt_cache_hits"] == 3  # the most recent entry stayed
    assert PromptCache(max_bytes=row - 1).embeddings(pipe, "m", ["x"], 16, (), "cpu")[0].shape == (1, 16, 8)


@pytest.fixture(scope="module")
def tiny_engine(tiny_cache: Path) -> Engine:
    registry = Registry.from_settings(Path(__file__).resolve().parents[1] / "models", [MODEL])
    engine = Engine(registry, EngineSettings(cache_dir=tiny_cache), "cpu")
    engine.load()
    return engine


def test_a_repeated_prompt_skips_the_text_encoders_and_gives_the_same_image(tiny_engine: Engine) -> None:
    engine = tiny_engine
    t5 = engine.pipeline(MODEL).text_encoder_2
    forward = t5.forward
    calls: list[int] = []
    t5.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]  # type: ignore[method-assign]
    try:
        p = GenerationParams(model=MODEL, prompt="a lighthouse at dusk", width=64, height=64, steps=2,
                             guidance_scale=3.5, seeds=(5,), max_sequence_length=128)
        engine.prompts.clear()
        first = engine.generate([p]).images[0][0]
        assert len(calls) == 1
        second = engine.generate([p]).images[0][0]
        assert len(calls) == 1  # the cached embeddings: no T5 call
        assert np.array_equal(np.asarray(first), np.asarray(second))
        cached = engine.prompts
        engine.prompts = PromptCache(0)  # off: the pipeline encodes the prompt itself, as before
        try:
            plain = engine.generate([p]).images[0][0]
        finally:
            engine.prompts = cached
        assert len(calls) == 2
        assert np.abs(np.asarray(first, np.int16) - np.asarray(plain, np.int16)).max() <= 2
        assert engine.stats()["prompt_cache_hits"] >= 1
    finally:
        t5.forward = forward  # type: ignore[method-assign]


def test_a_lora_switch_reuses_the_prompt_embeddings_unless_the_lora_has_text_encoder_weights(
        tiny_cache: Path, tmp_path: Path) -> None:
    """The prompt cache keys on the LoRAs that change the text encoder's output, not on the whole LoRA set:
    switching between transformer-only LoRAs (most FLUX LoRAs) re-encodes nothing; a LoRA with text-encoder
    weights gets embeddings of its own, the ones the pipeline computes with the cache off."""
    files = {"a": tiny_flux_lora(1), "b": tiny_flux_lora(2), "te": tiny_clip_lora(44)}
    for name, state in files.items():
        (tmp_path / f"{name}.safetensors").write_bytes(lora_file_bytes(state))
    store = LoraStore(LoraSettings(registered={n: tmp_path / f"{n}.safetensors" for n in files},
                                   cache_dir=tmp_path / "cache"), FetchSettings(), tiny_cache)
    registry = Registry.from_settings(Path(__file__).resolve().parents[1] / "models", [MODEL])
    engine = Engine(registry, EngineSettings(cache_dir=tiny_cache), "cpu", loras=store)
    engine.load()
    t5 = engine.pipeline(MODEL).text_encoder_2
    forward = t5.forward
    calls: list[int] = []
    t5.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]  # type: ignore[method-assign]

    def generate(*loras: str) -> np.ndarray:
        p = GenerationParams(model=MODEL, prompt="a lighthouse at dusk", width=64, height=64, steps=1,
                             guidance_scale=3.5, seeds=(5,), max_sequence_length=64,
                             loras=tuple(LoraRef(name, 0.8) for name in loras))
        return np.asarray(engine.generate([p]).images[0][0], np.int16)

    generate()
    assert len(calls) == 1
    generate("a"), generate("b"), generate("a", "b")
    assert len(calls) == 1  # transformer-only LoRAs: the embeddings of the plain prompt, reused
    with_te = generate("te")
    assert len(calls) == 2  # the CLIP LoRA changes the pooled embedding: encoded again, with it active
    generate("a", "te")
    assert len(calls) == 2
    cached = engine.prompts
    engine.prompts = PromptCache(0)  # the pipeline encodes the prompt itself, the LoRA active
    try:
        plain_te = generate("te")
    finally:
        engine.prompts = cached
    assert np.abs(with_te - plain_te).max() <= 2


# --- the response path -----------------------------------------------------------------------------------


def test_the_prebuilt_body_is_the_json_of_the_answer() -> None:
    head = {"id": "img-1", "model": "m/ü", "object": "list", "created": 1, "stages": {"a_s": 0.5}}
    images = [b"\x89PNG one", b"\xff\xd8 two"]
    b64 = [base64.b64encode(data) for data in images]
    items = [{"index": i, "type": "b64_json", "seed": 7 + i} for i in range(2)]
    body = json.loads(render_body(head, items, b64))
    assert body == {**head, "data": [{**item, "b64_json": code.decode()} for item, code in zip(items, b64)]}
    assert json.loads(render_body(head, [{"index": 0, "type": "url", "url": "http://x/y"}], [])) == {
        **head, "data": [{"index": 0, "type": "url", "url": "http://x/y"}]}


def test_the_answer_carries_server_timing_and_the_cache_hit_rate_is_on_metrics(make_app: Any) -> None:
    app: InProcessServer = make_app({"server": {"default_response_format": "base64"}})
    body = {"prompt": "the same prompt twice", "width": 64, "height": 64, "steps": 1, "output_format": "png"}
    for seed in (1, 2):
        response = app.generate(**body, seed=seed)
        [image] = images_of(response)
        assert image.size == (64, 64)
    timing = {part.split(";")[0].strip(): float(part.split("dur=")[1])
              for part in response.headers["server-timing"].split(",")}
    assert {"parse", "queue", "encode", "b64", "json", "total"} <= set(timing)
    assert all(value >= 0 for value in timing.values()) and timing["total"] >= timing["parse"]
    assert response.json()["data"][0]["type"] == "b64_json"
    Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).load()
    scrape = app.client.get("/metrics").text
    hits = [line for line in scrape.splitlines()
            if line.startswith("darkroom_prompt_cache_lookups_total{") and 'result="hit"' in line]
    assert hits and float(hits[0].split()[-1]) >= 1, scrape
    assert "darkroom_prompt_cache_hit_ratio" in scrape
