"""``image_loras``: per-request LoRAs by URL or registered name, cached, resident, hot-swapped, never leaking.

End to end through the app served on a loopback port (in-process) whose LoRA downloads come from a loopback
origin (allowed in its fetch config), which also plays a Hugging Face mirror (``loras.hub_url``); plus in-process tests of
the disk cache (eviction, single flight) and of the hotswap slots on the tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from together import Together

from server.api.loras import resolve_loras
from server.config import EngineSettings, FetchSettings, LimitSettings, LoraSettings, SafetySettings
from server.errors import InvalidRequest, Unsupported
from server.lora_sources import parse_source, pick_lora_file
from server.loras import LoraError, LoraStore
from server.params import GenerationParams, LoraRef

from .conftest import MODEL, decode_image, images_of, mean_abs_diff
from .image_origin import ImageOrigin
from .support.inprocess import InProcessServer
from .support.tiny_loras import (
    TINY_FLUX_LORA_LAYERS,
    lora_file_bytes,
    lora_store,
    sd_unet_lora,
    tiny_clip_lora,
    tiny_flux_lora,
    tiny_flux_lora_kohya,
)

FILE_CAP = 1_000_000
B_LAYERS = tuple(n for n in TINY_FLUX_LORA_LAYERS if ".ff" in n or n.startswith("single_"))
# Float noise between a batched call and the same request alone, in mean grey levels (PNG output).
SAME = 0.5
# What a LoRA must change, at least, for the comparisons to mean anything.
VISIBLE = 4.0


def _files() -> dict[str, bytes]:
    a = lora_file_bytes(tiny_flux_lora(11))
    files = {
        "/loras/a.safetensors": a,
        "/loras/b.safetensors": lora_file_bytes(tiny_flux_lora(22, layers=B_LAYERS)),
        "/loras/kohya.safetensors": lora_file_bytes(tiny_flux_lora_kohya(33)),
        "/loras/te.safetensors": lora_file_bytes(tiny_clip_lora(44)),  # CLIP text encoder only
        # diffusers format with per-layer alphas (alpha 8 at rank 4: the LoRA acts at twice its weights)
        "/loras/alpha.safetensors": lora_file_bytes({
            **tiny_flux_lora(55, gain=0.5),
            **{f"transformer.{n}.alpha": torch.tensor(8.0) for n in TINY_FLUX_LORA_LAYERS}}),
        "/loras/sd-unet.safetensors": lora_file_bytes(sd_unet_lora()),
        "/loras/unet-diffusers.safetensors": lora_file_bytes({
            "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 320),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(320, 4),
        }),
        "/loras/no-lora-keys.safetensors": lora_file_bytes({"encoder.weight": torch.zeros(4, 4)}),
        "/loras/flux-dev-shaped.safetensors": lora_file_bytes({
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(3072, 4),
        }),
        "/loras/html.safetensors": b"<html><body>Not Found</body></html>",
        "/loras/big.safetensors": lora_file_bytes(tiny_flux_lora(5, rank=300)),
        # A Hugging Face mirror: the repo's file list, and the file (A's bytes) it picks.
        "/api/models/acme/tiny-lora/revision/main": json.dumps({"id": "acme/tiny-lora", "siblings": [
            {"rfilename": ".gitattributes"}, {"rfilename": "README.md"},
            {"rfilename": "pytorch_lora_weights.safetensors"}]}).encode(),
        "/acme/tiny-lora/resolve/main/pytorch_lora_weights.safetensors": a,
        "/api/models/acme/two-loras/revision/main": json.dumps({"siblings": [
            {"rfilename": "style-v1.safetensors"}, {"rfilename": "style-v2.safetensors"}]}).encode(),
        "/api/models/acme/full-model/revision/main": json.dumps({"siblings": [
            {"rfilename": "model_index.json"},
            {"rfilename": "transformer/diffusion_pytorch_model.safetensors"}]}).encode(),
    }
    assert len(files["/loras/big.safetensors"]) > FILE_CAP
    return files


class LoraOrigin(ImageOrigin):
    """The loopback image origin, also serving LoRA files; paths under /slow/ answer after ``delay_s``."""

    def __init__(self, delay_s: float = 0.3) -> None:
        super().__init__()
        self.delay_s = delay_s
        for path, body in _files().items():
            ctype = "application/json" if path.startswith("/api/") else "application/octet-stream"
            self.files[path] = (body, ctype)

    def _handle(self, h: Any, path: str, query: dict[str, list[str]]) -> None:
        if path.startswith("/slow/"):
            time.sleep(self.delay_s)
            path = path[len("/slow"):]
        super()._handle(h, path, query)


@pytest.fixture(scope="module")
def origin() -> Iterator[LoraOrigin]:
    with LoraOrigin() as o:
        yield o


@pytest.fixture(scope="module")
def registered_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("registered") / "house-style.safetensors"
    path.write_bytes(lora_file_bytes(tiny_flux_lora(11)))  # A's weights, from the operator's disk
    return path


@pytest.fixture(scope="module")
def lora_server(make_app: Any, origin: LoraOrigin, registered_file: Path) -> InProcessServer:
    return make_app({
        "server": {"default_response_format": "base64"},
        # The origin serves files as 127.0.0.1 and plays the Hub mirror as localhost.
        "fetch": {"allow_hosts": ["127.0.0.1", "localhost"]},
        "loras": {"max_count": 3, "min_scale": -2.0, "max_scale": 2.0, "max_file_bytes": FILE_CAP,
                  "cache_bytes": 50_000_000, "max_resident": 4,
                  "hub_url": f"http://localhost:{origin.port}",
                  "registered": {"house-style": str(registered_file)}},
        # A fixed window long enough that concurrent requests meet in the queue.
        "scheduler": {"batch_window_ms": 300, "max_batch_images": 8, "adaptive_window": False},
    }, listen=True)


def body(loras: list[tuple[str, float]] | None = None, seed: int = 3,
         prompt: str = "a red barn") -> dict[str, Any]:
    req: dict[str, Any] = {"prompt": prompt, "width": 64, "height": 64, "steps": 2, "seed": seed,
                           "output_format": "png"}
    if loras is not None:
        req["image_loras"] = [{"path": p, "scale": s} for p, s in loras]
    return req


def one(server: InProcessServer, **kwargs: Any) -> Any:
    return images_of(server.generate(**body(**kwargs)))[0]


def assert_lora_error(resp: httpx.Response, path: str, *fragments: str) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    payload = resp.json()
    assert set(payload) == {"error"}
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == "image_loras" and err["type"] == "invalid_request_error"
    assert isinstance(err["code"], str)
    assert path in err["message"], err["message"]
    for fragment in fragments:
        assert fragment in err["message"], err["message"]
    return err


# ------------------------------------------------------------------------------------ what works


def test_models_list_says_loras_are_supported(lora_server: InProcessServer) -> None:
    card = httpx.get(f"{lora_server.url}/v1/models/{MODEL}", timeout=30).json()
    assert card["capabilities"]["loras"] is True


def test_a_lora_changes_the_image_and_its_scale_matters(lora_server: InProcessServer, origin: LoraOrigin) -> None:
    a = origin.url("/loras/a.safetensors")
    plain = one(lora_server)
    full, half, again = one(lora_server, loras=[(a, 1.0)]), one(lora_server, loras=[(a, 0.5)]), \
        one(lora_server, loras=[(a, 1.0)])
    assert mean_abs_diff(plain, full) > VISIBLE
    assert mean_abs_diff(full, half) > VISIBLE / 2 and mean_abs_diff(plain, half) > VISIBLE / 2
    assert mean_abs_diff(full, again) == 0  # same request, same image
    assert mean_abs_diff(plain, one(lora_server)) == 0  # and nothing stayed active


def test_every_kind_of_path_names_the_same_lora(lora_server: InProcessServer, origin: LoraOrigin) -> None:
    hits = origin.hits.get("/api/models/acme/tiny-lora/revision/main", 0)
    direct = one(lora_server, loras=[(origin.url("/loras/a.safetensors"), 0.8)])
    forms = [
        "https://huggingface.co/acme/tiny-lora",                      # repo URL → the Hub mirror
        "https://huggingface.co/acme/tiny-lora/tree/main",
        "https://huggingface.co/acme/tiny-lora/resolve/main/pytorch_lora_weights.safetensors",
        "https://huggingface.co/acme/tiny-lora/blob/main/pytorch_lora_weights.safetensors",
        "house-style",                                                # registered by the operator
    ]
    for path in forms:
        assert mean_abs_diff(direct, one(lora_server, loras=[(path, 0.8)])) == 0, path
    assert origin.hits["/api/models/acme/tiny-lora/revision/main"] >= hits + 1  # the file list was read


def test_kohya_format_is_converted(lora_server: InProcessServer, origin: LoraOrigin) -> None:
    kohya = one(lora_server, loras=[(origin.url("/loras/kohya.safetensors"), 1.0)])
    assert mean_abs_diff(one(lora_server), kohya) > VISIBLE
    assert mean_abs_diff(one(lora_server, loras=[(origin.url("/loras/a.safetensors"), 1.0)]), kohya) > VISIBLE


def test_together_client_sends_image_loras(lora_server: InProcessServer, origin: LoraOrigin) -> None:
    a = origin.url("/loras/a.safetensors")
    client = Together(base_url=lora_server.url, api_key="any-key", max_retries=0)
    response = client.images.generate(
        model=MODEL, prompt="a red barn", width=64, height=64, steps=2, seed=3, output_format="png",
        response_format="base64", image_loras=[{"path": a, "scale": 1.0}],
    )
    assert mean_abs_diff(decode_image(response.data[0].b64_json), one(lora_server, loras=[(a, 1.0)])) == 0


def test_a_downloaded_lora_is_fetched_once(lora_server: InProcessServer, origin: LoraOrigin) -> None:
    path = "/slow/loras/b.safetensors"  # a slow origin: all requests arrive while it downloads
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(
            lambda seed: lora_server.generate(**body([(origin.url(path), 0.7)], seed=seed)), range(4)))
    for resp in responses:
        assert resp.status_code == 200, resp.text
    assert origin.hits[path] == 1


def _lora_counter(server: InProcessServer, family: str, cache: str) -> float:
    """A LoRA cache counter as /metrics exports it (0 before its first increment)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    prefix = f'darkroom_lora_cache_{family}_total{{cache="{cache}"}} '
    return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def test_lora_cache_counters_are_exported(lora_server: InProcessServer, origin: LoraOrigin) -> None:
    path = origin.url("/loras/a.safetensors") + "?for=metrics"  # a URL no other test has cached
    names = [("misses", "disk"), ("hits", "disk"), ("misses", "adapter"), ("hits", "adapter")]
    before = {n: _lora_counter(lora_server, *n) for n in names}
    one(lora_server, loras=[(path, 1.0)])
    one(lora_server, loras=[(path, 1.0)])
    after = {n: _lora_counter(lora_server, *n) for n in names}
    assert after[("misses", "disk")] == before[("misses", "disk")] + 1  # downloaded once
    assert after[("hits", "disk")] > before[("hits", "disk")]  # then served from the disk cache
    assert after[("misses", "adapter")] == before[("misses", "adapter")] + 1  # loaded once
    assert after[("hits", "adapter")] >= before[("hits", "adapter")] + 1  # then resident


# ------------------------------------------------------------------ no leaking between requests


def _variants(origin: LoraOrigin) -> dict[str, list[tuple[str, float]] | None]:
    a, b = origin.url("/loras/a.safetensors"), origin.url("/loras/b.safetensors")
    te = origin.url("/loras/te.safetensors")
    return {
        "none": None,
        "A@1": [(a, 1.0)],
        "A@0.4": [(a, 0.4)],
        "B@0.8": [(b, 0.8)],
        "A+B": [(a, 1.0), (b, 0.6)],
        "B+A": [(b, -0.7), (a, 0.3)],
        "kohya": [(origin.url("/loras/kohya.safetensors"), 1.2)],
        "te": [(te, 1.0)],
        "A+te": [(a, 0.8), (te, 1.0)],
    }


def test_concurrent_mixed_lora_sets_each_match_their_request_alone(
    lora_server: InProcessServer, origin: LoraOrigin
) -> None:
    variants = _variants(origin)
    cases = [(name, seed) for seed in (5, 6) for name in variants]
    alone = {(name, seed): one(lora_server, loras=variants[name], seed=seed) for name, seed in cases}
    for seed in (5, 6):  # the comparisons below can only tell sets apart if their images differ
        names = list(variants)
        for i, x in enumerate(names):
            for y in names[i + 1:]:
                assert mean_abs_diff(alone[(x, seed)], alone[(y, seed)]) > VISIBLE / 2, (x, y)

    bad = [(origin.url("/loras/sd-unet.safetensors"), 1.0)]  # fails on the worker only, alone
    requests = [(name, seed, body(variants[name], seed=seed)) for name, seed in cases] * 2
    requests.append(("bad", 0, body(bad)))
    barrier = threading.Barrier(len(requests))

    def fire(item: tuple[str, int, dict[str, Any]]) -> tuple[str, int, httpx.Response]:
        name, seed, req = item
        barrier.wait()
        return name, seed, lora_server.generate(**req)

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(fire, requests))

    batches: dict[str, set[str]] = {}
    for name, seed, resp in results:
        if name == "bad":
            assert_lora_error(resp, "sd-unet.safetensors")
            continue
        image = images_of(resp)[0]
        assert mean_abs_diff(image, alone[(name, seed)]) <= SAME, (name, seed)
        batches.setdefault(resp.json()["batch"]["id"], set()).add(name)
    # Only identical LoRA sets (and scales) ever share a pipeline call...
    assert all(len(names) == 1 for names in batches.values()), batches
    # ... and they did share calls here: batching was exercised, not avoided.
    assert len(batches) < len(results) - 1


# -------------------------------------------------------------------------------- bad input: 400


BAD_FILES = [
    ("/loras/html.safetensors", "not a safetensors file"),
    ("/loras/no-lora-keys.safetensors", "no LoRA weights"),
    ("/loras/sd-unet.safetensors", "LoRA"),                  # kohya keys of an SD UNet
    ("/loras/unet-diffusers.safetensors", "another architecture"),
    ("/loras/flux-dev-shaped.safetensors", "does not fit"),  # FLUX.1-dev sizes on the tiny FLUX
    ("/loras/big.safetensors", f"larger than {FILE_CAP} bytes"),
    ("/loras/missing.safetensors", "HTTP 404"),
]


@pytest.mark.parametrize(("path", "fragment"), BAD_FILES, ids=[p.rsplit("/", 1)[1] for p, _ in BAD_FILES])
def test_bad_lora_file_is_400_naming_it(lora_server: InProcessServer, origin: LoraOrigin, path: str,
                                        fragment: str) -> None:
    url = origin.url(path)
    assert_lora_error(lora_server.generate(**body([(url, 1.0)])), url, fragment)


def test_unreachable_and_refused_urls_are_400(lora_server: InProcessServer, origin: LoraOrigin) -> None:
    from .conftest import free_port

    closed = f"http://127.0.0.1:{free_port()}/x.safetensors"
    assert_lora_error(lora_server.generate(**body([(closed, 1.0)])), closed, "could not be fetched")
    private = "http://10.1.2.3/lora.safetensors"  # not allowed by the fetch config
    err = assert_lora_error(lora_server.generate(**body([(private, 1.0)])), private, "private")
    assert err["code"] == "url_not_allowed"


@pytest.mark.parametrize(("repo", "fragment"), [
    ("acme/two-loras", "several .safetensors files"),
    ("acme/full-model", "no .safetensors file"),
    ("acme/no-such-repo", "HTTP 404"),
])
def test_bad_hub_repo_is_400(lora_server: InProcessServer, repo: str, fragment: str) -> None:
    path = f"https://huggingface.co/{repo}"
    assert_lora_error(lora_server.generate(**body([(path, 1.0)])), path, fragment)


def test_request_level_limits(lora_server: InProcessServer, origin: LoraOrigin) -> None:
    a, b, k = (origin.url(f"/loras/{n}.safetensors") for n in ("a", "b", "kohya"))
    assert_lora_error(lora_server.generate(**body([(a, 1), (b, 1), (k, 1), ("house-style", 1)])), "",
                      "at most 3 LoRAs")
    assert_lora_error(lora_server.generate(**body([(a, 2.5)])), a, "between -2 and 2")
    assert_lora_error(lora_server.generate(**body([(a, 1), (a, 0.5)])), a, "twice")
    assert_lora_error(lora_server.generate(**body([("no-such-name", 1)])), "no-such-name",
                      "registered: house-style")
    assert_lora_error(lora_server.generate(**body([("ftp://example.com/x.safetensors", 1)])),
                      "ftp://example.com/x.safetensors", "http(s) URL")
    resp = lora_server.generate(**{**body(), "image_loras": [{"scale": 1.0}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "image_loras"


def test_failed_loras_leave_the_adapter_state_unchanged(lora_server: InProcessServer, origin: LoraOrigin) -> None:
    a = origin.url("/loras/a.safetensors")
    plain, with_a = one(lora_server), one(lora_server, loras=[(a, 1.0)])
    for bad in ("sd-unet", "flux-dev-shaped", "unet-diffusers"):
        url = origin.url(f"/loras/{bad}.safetensors")
        # A good LoRA with a bad one: the request fails as a whole, the good one is not left active.
        assert_lora_error(lora_server.generate(**body([(a, 1.0), (url, 1.0)])), url)
        assert mean_abs_diff(one(lora_server), plain) == 0
        assert mean_abs_diff(one(lora_server, loras=[(a, 1.0)]), with_a) == 0
    assert httpx.get(f"{lora_server.url}/ready", timeout=10).status_code == 200


# ------------------------------------------------------------------------------- in-process units


def test_capability_gate_names_field_and_model() -> None:
    from server.api.schemas import ImageRequest, resolve_params
    from server.registry import load_manifests

    from .conftest import REPO

    manifest = load_manifests(REPO / "models")[MODEL]
    no_loras = manifest.model_copy(update={"capabilities": manifest.capabilities.model_copy(
        update={"loras": False})})
    req = ImageRequest.model_validate({"prompt": "x", "image_loras": [{"path": "https://a/b.safetensors"}]})
    with pytest.raises(Unsupported) as info:
        resolve_params(req, no_loras, LimitSettings())
    assert info.value.param == "image_loras" and MODEL in info.value.message
    params = resolve_params(req, manifest, LimitSettings(), LoraSettings())
    assert params.loras == (LoraRef("https://a/b.safetensors", 1.0),)
    with pytest.raises(InvalidRequest):
        resolve_loras([type("S", (), {"path": "https://a/b", "scale": float("nan")})()], MODEL, True,
                      LoraSettings())


def test_batch_key_separates_lora_sets() -> None:
    base = GenerationParams(model=MODEL, prompt="x", width=64, height=64, steps=2, guidance_scale=3.5,
                            seeds=(1,))
    a = dataclasses.replace(base, loras=(LoraRef("u", 1.0),))
    assert base.batch_key() != a.batch_key()
    assert a.batch_key() != dataclasses.replace(base, loras=(LoraRef("u", 0.5),)).batch_key()
    other = dataclasses.replace(base, prompt="y", seeds=(9,), loras=(LoraRef("u", 1.0),))
    assert a.batch_key() == other.batch_key()


def test_paths_and_repo_file_picking() -> None:
    settings = LoraSettings(hub_url="http://mirror:8080", registered={"mine": Path("/x.safetensors")})
    assert parse_source("mine", settings).local == Path("/x.safetensors")
    repo = parse_source("https://huggingface.co/o/r/tree/v2/sub", settings)
    assert (repo.repo, repo.revision, repo.subfolder) == ("o/r", "v2", "sub")
    assert parse_source("https://hf.co/o/r/blob/main/a/b.safetensors", settings).url == \
        "http://mirror:8080/o/r/resolve/main/a/b.safetensors"
    assert parse_source("https://cdn.example/x.safetensors?sig=1", settings).url == \
        "https://cdn.example/x.safetensors?sig=1"
    assert pick_lora_file(["README.md", "pytorch_lora_weights.safetensors", "x.safetensors"]) == \
        "pytorch_lora_weights.safetensors"
    assert pick_lora_file(["style.safetensors", "README.md"]) == "style.safetensors"
    assert pick_lora_file(["style_lora.safetensors", "preview.safetensors"]) == "style_lora.safetensors"
    assert pick_lora_file(["a.safetensors", "b.safetensors"]) == ["a.safetensors", "b.safetensors"]
    assert pick_lora_file(["transformer/diffusion_pytorch_model.safetensors"]) is None
    assert pick_lora_file(["sub/l.safetensors", "other.safetensors"], "sub") == "sub/l.safetensors"


def test_disk_cache_evicts_least_recently_used_and_keeps_pinned(origin: LoraOrigin, tmp_path: Path) -> None:
    size = {n: len(origin.files[f"/loras/{n}.safetensors"][0]) for n in ("a", "b", "kohya")}
    # Room for any two of the three files, never for all three.
    cap = size["a"] + size["kohya"] + size["b"] // 2
    assert cap >= size["a"] + size["b"]
    store = lora_store(tmp_path, cache_bytes=cap, max_file_bytes=max(size.values()))
    a, b, k = (origin.url(f"/loras/{n}.safetensors") for n in ("a", "b", "kohya"))
    try:
        store.ensure(a)
        time.sleep(0.01)
        store.ensure(b)
        time.sleep(0.01)
        store.ensure(a)  # a hit: A is now the most recently used
        time.sleep(0.01)
        store.ensure(k)  # over the cap: B, the least recently used, goes
        assert store.file_for(a).is_file() and store.file_for(k).is_file()
        assert not store.file_for(b).exists()
        assert store.cached_bytes() <= store.settings.cache_bytes
        assert (store.downloads, store.hits) == (3, 1)
        with store.use(a):  # a pinned file survives even as the least recently used
            time.sleep(0.01)
            store.ensure(b)
            time.sleep(0.01)
            store.ensure(k)
            store.ensure(b)
            assert store.file_for(a).is_file() and store.file_for(b).is_file()
            assert not store.file_for(k).exists()
        assert store.downloads == 6 and store.cached_bytes() <= cap
    finally:
        store.close()


def test_disk_cache_downloads_once_for_concurrent_callers(origin: LoraOrigin, tmp_path: Path) -> None:
    store = lora_store(tmp_path)
    url = origin.url("/slow/loras/kohya.safetensors")
    before = origin.hits.get("/slow/loras/kohya.safetensors", 0)
    try:
        with ThreadPoolExecutor(8) as pool:
            paths = list(pool.map(lambda _: store.ensure(url), range(8)))
        assert len(set(paths)) == 1 and paths[0].is_file()
        assert origin.hits["/slow/loras/kohya.safetensors"] == before + 1
        assert store.downloads == 1
        # A failure is shared too, and nothing is cached for it.
        bad = origin.url("/slow/loras/html.safetensors")
        with ThreadPoolExecutor(4) as pool:
            errors = list(pool.map(lambda _: _raises(store, bad), range(4)))
        assert all(isinstance(e, LoraError) and "not a safetensors file" in e.message for e in errors)
        assert origin.hits["/slow/loras/html.safetensors"] == 1
        assert not store.file_for(bad).exists()
    finally:
        store.close()


def _raises(store: LoraStore, url: str) -> BaseException | None:
    try:
        store.ensure(url)
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


def test_hotswap_slots_give_the_same_images_as_named_adapters(
    origin: LoraOrigin, tmp_path: Path, tiny_cache: Path
) -> None:
    """The torch.compile path (hotswap into fixed slots), exercised without compiling on CPU."""
    from server.engine.pipelines import Engine
    from server.registry import Registry, load_manifests

    from .conftest import REPO

    manifest = load_manifests(REPO / "models")[MODEL]
    a, b = origin.url("/loras/a.safetensors"), origin.url("/loras/b.safetensors")
    kohya, alpha = origin.url("/loras/kohya.safetensors"), origin.url("/loras/alpha.safetensors")
    sets = [(), ((a, 1.0),), ((b, 0.8),), ((a, 1.0), (b, 0.6)), ((kohya, 1.2), (a, 0.5)), (),
            ((alpha, 0.5),), ((alpha, 1.0), (a, 0.5)), ((b, 0.8),)]

    def images(hotswap: bool) -> tuple[list[Any], Engine]:
        store = lora_store(tmp_path / str(hotswap), hotswap=hotswap, hotswap_target_rank=8, max_count=2)
        engine = Engine(Registry([manifest]), EngineSettings(cache_dir=tiny_cache), "cpu",
                        SafetySettings(enabled=False), loras=store)
        engine.load()
        out = []
        for loras in sets:
            params = GenerationParams(model=MODEL, prompt="a red barn", width=64, height=64, steps=2,
                                      guidance_scale=3.5, seeds=(3,), max_sequence_length=64,
                                      loras=tuple(LoraRef(p, s) for p, s in loras))
            out.append(engine.generate([params]).images[0][0])
        return out, engine

    named, _ = images(False)
    swapped, engine = images(True)
    for loras, x, y in zip(sets, named, swapped):
        assert mean_abs_diff(x, y) <= SAME, loras
    assert mean_abs_diff(named[0], named[1]) > VISIBLE
    assert engine.loras.swaps >= 3 and engine.loras.loads == 0
    # A LoRA that does not fit is refused before it touches a slot.
    too_big = origin.url("/loras/flux-dev-shaped.safetensors")
    with pytest.raises(LoraError):
        engine.generate([GenerationParams(model=MODEL, prompt="a red barn", width=64, height=64, steps=2,
                                          guidance_scale=3.5, seeds=(3,), max_sequence_length=64,
                                          loras=(LoraRef(too_big, 1.0),))])
    again = engine.generate([GenerationParams(model=MODEL, prompt="a red barn", width=64, height=64, steps=2,
                                              guidance_scale=3.5, seeds=(3,), max_sequence_length=64,
                                              loras=((LoraRef(b, 0.8),)))]).images[0][0]
    assert mean_abs_diff(again, named[2]) <= SAME
    # The alphas count: the alpha LoRA at 0.5 is not the same LoRA without its alphas at 0.5.
    assert mean_abs_diff(named[6], named[0]) > VISIBLE


def test_hotswap_slots_cover_the_layers_loras_train(tmp_path: Path, tiny_cache: Path) -> None:
    """Slots sit on the attention, feed-forward and single-block projections only (2 slots by default);
    a LoRA reaching past them, or more LoRAs than slots, is refused before anything is swapped."""
    MODULATION = "transformer.transformer_blocks.0.norm1.linear"  # noqa: N806
    from peft.tuners.lora import LoraLayer

    from server.engine.lora_slots import DEFAULT_TARGETS
    from server.engine.pipelines import Engine
    from server.registry import Registry, load_manifests

    from .conftest import REPO
    from .support.tiny_loras import lora_file_bytes, tiny_flux_lora

    files = {}
    for name, state in (("a", tiny_flux_lora(1)), ("b", tiny_flux_lora(2)), ("c", tiny_flux_lora(3)),
                        ("mod", {**tiny_flux_lora(4),  # and the modulation layer of the double block
                                 f"{MODULATION}.lora_A.weight": torch.randn(4, 32),
                                 f"{MODULATION}.lora_B.weight": torch.randn(192, 4)})):
        files[name] = tmp_path / f"{name}.safetensors"
        files[name].write_bytes(lora_file_bytes(state))
    settings = LoraSettings(cache_dir=tmp_path / "loras", registered=files, hotswap=True,
                            hotswap_target_rank=8)
    assert (settings.hotswap_slots, settings.max_per_request()) == (2, 2)
    assert LoraSettings().hotswap_target_rank == 32
    store = LoraStore(settings, FetchSettings(), tmp_path)
    manifest = load_manifests(REPO / "models")[MODEL]
    engine = Engine(Registry([manifest]), EngineSettings(cache_dir=tiny_cache), "cpu",
                    SafetySettings(enabled=False), loras=store)
    engine.load()
    transformer = engine.pipeline(MODEL).transformer
    slotted = {n for n, m in transformer.named_modules() if isinstance(m, LoraLayer)}
    # The tiny FLUX's double block: 8 attention projections + 4 feed-forward layers; its single block:
    # to_q/to_k/to_v, proj_mlp, proj_out. Not the modulation (norm*.linear), embedders or final projection.
    assert len(slotted) == 17 and all(name.split(".", 2)[2].endswith(DEFAULT_TARGETS) for name in slotted)
    assert not any("norm" in n or n.startswith(("x_embedder", "context_embedder", "time_text", "proj_out"))
                   for n in slotted)
    assert all(set(transformer.get_submodule(n).lora_A) == {"slot0", "slot1"} for n in slotted)

    def run(*names: str) -> Any:
        params = GenerationParams(model=MODEL, prompt="a red barn", width=64, height=64, steps=1,
                                  guidance_scale=3.5, seeds=(3,), max_sequence_length=32,
                                  loras=tuple(LoraRef(n) for n in names))
        return engine.generate([params]).images[0][0]

    before = run("a", "b")
    with pytest.raises(LoraError, match=r"outside this server's LoRA slots \(e.g. transformer_blocks.0.norm1"
                                        r".linear\).*loras.hotswap_target_modules"):
        run("mod")
    with pytest.raises(LoraError, match="at most 2 LoRAs per request"):
        run("a", "b", "c")
    with pytest.raises(InvalidRequest, match="at most 2 LoRAs"):
        resolve_loras([LoraRef(n) for n in "abc"], MODEL, True, settings)
    assert mean_abs_diff(run("a", "b"), before) == 0  # the refusals left the slots as they were
