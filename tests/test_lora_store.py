"""The LoRA store's files: streamed and checked header first, never held in memory; pinned across processes;
refused with 400 only when the file is at fault.

Header parsing is fuzzed (seeded, bounded); memory is measured in a child process (its peak RSS, VmHWM) while
it downloads a few-hundred-MB file from a loopback origin; pins are held by a child process sharing the
cache folder. Everything else runs in-process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import torch

from server.config import FetchSettings, LoraSettings
from server.lora_format import StreamCheck
from server.loras import LoraError, LoraStore, LoraStoreFailure, LoraUnavailable
from server.safetensors_header import FormatError, Limits, parse_header

from .conftest import REPO
from .image_origin import ImageOrigin
from .support.inprocess import InProcessServer
from .support.launch import wait_until
from .support.tiny_loras import lora_file_bytes, lora_store, tiny_flux_lora

BIG = 256 * 2**20  # bytes of tensor data in the big files
RSS_GROWTH_CAP = 64 * 2**20


class DiskOrigin(ImageOrigin):
    """The loopback origin, also serving files from disk in 1 MiB writes, counting what each sent."""

    def __init__(self) -> None:
        super().__init__()
        self.disk: dict[str, Path] = {}
        self.sent: dict[str, int] = {}

    def _handle(self, h: BaseHTTPRequestHandler, path: str, query: dict[str, list[str]]) -> None:
        file = self.disk.get(path)
        if file is None:
            super()._handle(h, path, query)
            return
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(file.stat().st_size))
        h.end_headers()
        sent = 0
        try:
            with file.open("rb") as fh:
                while chunk := fh.read(2**20):
                    h.wfile.write(chunk)
                    sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.sent[path] = sent


@pytest.fixture(scope="module")
def origin() -> Iterator[DiskOrigin]:
    with DiskOrigin() as o:
        yield o


def serve(origin: DiskOrigin, path: str, body: bytes) -> str:
    origin.files[path] = (body, "application/octet-stream")
    return origin.url(path)


def safetensors_bytes(header: bytes, data: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + data


def big_file(path: Path, names: tuple[str, str]) -> Path:
    """A LoRA of two F32 tensors of BIG/2 bytes each (rank 2**20 on a 32-wide layer): zeros, sparse."""
    rank, half = 2**20, BIG // 2
    header = {names[0]: {"dtype": "F32", "shape": [rank, 32], "data_offsets": [0, half]},
              names[1]: {"dtype": "F32", "shape": [32, rank], "data_offsets": [half, BIG]}}
    raw = json.dumps(header).encode()
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(8 + len(raw) + BIG)
    return path


# ------------------------------------------------------------------------------- headers, one by one

BASE = {"transformer.a.lora_A.weight": {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]},
        "transformer.a.lora_B.weight": {"dtype": "F32", "shape": [32, 4], "data_offsets": [512, 1024]}}


def _with_offsets(value: str) -> str:
    """BASE's JSON with the second tensor's data_offsets replaced by raw JSON text."""
    return json.dumps(BASE).replace("[512, 1024]", value)


HOSTILE_HEADERS = {
    "offsets-strings": _with_offsets('["512", "1024"]'),
    "offsets-null": _with_offsets("null"),
    "offsets-1e400": _with_offsets("[512, 1e400]"),
    "offsets-5000-digits": _with_offsets("[512, " + "9" * 5000 + "]"),
    "offsets-float": _with_offsets("[512.0, 1024]"),
    "offsets-bool": _with_offsets("[true, 1024]"),
    "offsets-negative": _with_offsets("[-512, 1024]"),
    "offsets-reversed": _with_offsets("[1024, 512]"),
    "offsets-three": _with_offsets("[512, 1024, 2048]"),
    "offsets-overlap": _with_offsets("[256, 768]"),
    "offsets-gap": _with_offsets("[768, 1280]"),
    "metadata-nested-100k": json.dumps(BASE)[:-1] + ', "__metadata__": ' + "[" * 100_000 + "]" * 100_000
                            + "}",
    "metadata-not-strings": json.dumps({**BASE, "__metadata__": {"a": 1}}),
    "shape-huge": json.dumps(BASE).replace("[32, 4]", "[" + "9" * 30 + ", 4]"),
    "shape-5000-digits": json.dumps(BASE).replace("[32, 4]", "[" + "9" * 5000 + ", 4]"),
    "shape-mismatch": json.dumps(BASE).replace("[32, 4]", "[32, 5]"),
    "dtype-unknown": json.dumps(BASE).replace('"F32", "shape": [32', '"F33", "shape": [32'),
    "entry-not-object": json.dumps({**BASE, "transformer.a.lora_B.weight": [1, 2]}),
    "top-level-list": "[1, 2, 3]",
    "duplicate-name": json.dumps(BASE)[:-1] + ', "transformer.a.lora_A.weight": ' +
                      json.dumps(BASE["transformer.a.lora_A.weight"]) + "}",
    "not-utf8": '{"\udcff": 1}',
    "nan-literal": _with_offsets("[NaN, 1024]"),
    "no-tensors": "{}",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_headers_are_format_errors(case: str) -> None:
    raw = HOSTILE_HEADERS[case].encode("utf-8", "surrogateescape")
    with pytest.raises(FormatError):
        parse_header(raw)


def test_hostile_headers_are_400_through_the_api(make_app: Callable[..., InProcessServer], tmp_path: Path,
                                                 origin: DiskOrigin) -> None:
    app = make_app({"fetch": {"allow_hosts": ["127.0.0.1"]}, "loras": {"cache_dir": str(tmp_path)}},
                   engine="stand-in")
    for case, header in HOSTILE_HEADERS.items():
        url = serve(origin, f"/hostile/{case}.safetensors",
                    safetensors_bytes(header.encode("utf-8", "surrogateescape"), bytes(1024)))
        resp = app.generate(prompt="x", width=64, height=64, image_loras=[{"path": url}])
        assert resp.status_code == 400, (case, resp.text)
        assert resp.json()["error"]["param"] == "image_loras" and url in resp.json()["error"]["message"]
    assert app.engines[0].calls == []
    assert not list((tmp_path).glob(".*.tmp")) and not list(tmp_path.glob("*.safetensors"))


# --------------------------------------------------------------------------------------- the fuzz

HOSTILE_VALUES = ['"x"', "null", "1e400", "9" * 5000, "-1", "true", "0.5", "[]", "{}", "[1]", '[0, 0, 0]',
                  str(2**70), '"\\ud800"', "[" * 2000 + "]" * 2000]


def _mutate(rng: random.Random, base: str, body_len: int) -> bytes:
    """One mutated safetensors file: a hostile value, a byte flip, a cut, a wrong length prefix, deep nesting
    or a renamed key, on the JSON header of a valid LoRA."""
    text = base
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        if op == 0:  # a number, list or string replaced by a hostile value
            spots = [i for i, c in enumerate(text) if c in '0123456789["']
            at = rng.choice(spots)
            end = at + 1
            while end < len(text) and text[end] not in ",}]":
                end += 1
            text = text[:at] + rng.choice(HOSTILE_VALUES) + text[end:]
        elif op == 1:  # flipped characters
            chars = list(text)
            for _ in range(rng.randint(1, 4)):
                chars[rng.randrange(len(chars))] = chr(rng.randrange(32, 127))
            text = "".join(chars)
        elif op == 2:  # cut
            text = text[: rng.randrange(len(text))]
        elif op == 3:  # nested metadata
            depth = rng.choice([10, 1000, 100_000])
            text = text.rstrip("}") + ', "__metadata__": {"k": ' + "[" * depth + "]" * depth + "}}"
        elif op == 4:  # a name made a T5, DoRA or unknown weight
            text = text.replace("transformer.", rng.choice(["text_encoder_2.", "lora_te2_", "zzz."]), 1) \
                .replace("lora_B.weight", rng.choice(["dora_scale", "hada_w1_a", "lora_B.weight"]), 1)
        elif op == 5:  # dtype
            text = text.replace('"F32"', rng.choice(['"F16"', '"F4"', '"I64"', "7", "null"]), 1)
        else:
            text = text.replace("data_offsets", rng.choice(["data_offset", "shape", "dtype"]), 1)
    raw = text.encode("utf-8", "surrogatepass")
    prefix = len(raw) + rng.choice([0, 0, 0, -1, 1, 2**40])
    return max(prefix, 0).to_bytes(8, "little") + raw + bytes(body_len)


def test_fuzzed_headers_raise_only_the_format_error(origin: DiskOrigin,
                                                    make_app: Callable[..., InProcessServer],
                                                    tmp_path: Path) -> None:
    """Seeded and time-bounded: a few hundred mutated files through the streaming check (any chunking),
    and a hundred of them through the API: only FormatError, and only 400 (or 200 for a file the mutation
    left valid), never a 5xx."""
    state = tiny_flux_lora(3, layers=("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"))
    valid = lora_file_bytes(state)
    length = int.from_bytes(valid[:8], "little")
    base, body_len = valid[8 : 8 + length].decode(), len(valid) - 8 - length
    rng = random.Random(20240611)
    deadline = time.monotonic() + 60
    outcomes: dict[str, int] = {}
    files = []
    for _ in range(400):
        if time.monotonic() > deadline:
            break
        data = _mutate(rng, base, body_len)
        files.append(data)
        check = StreamCheck(lambda _chunk: None, Limits(file_bytes=10_000_000))
        try:
            at = 0
            while at < len(data):
                step = rng.choice([1, 7, 64, 4096, len(data)])
                check(data[at : at + step])
                at += step
            check.finish()
            outcomes["valid"] = outcomes.get("valid", 0) + 1
        except FormatError as exc:
            outcomes[exc.code] = outcomes.get(exc.code, 0) + 1
    assert outcomes.get("invalid_lora_file", 0) > 100 and outcomes.get("unsupported_lora", 0) > 10, outcomes

    app = make_app({"fetch": {"allow_hosts": ["127.0.0.1"]}, "loras": {"cache_dir": str(tmp_path)}},
                   engine="stand-in")
    statuses: dict[int, int] = {}
    for i, data in enumerate(files[:100]):
        if time.monotonic() > deadline + 60:
            break
        url = serve(origin, f"/fuzz/{i}.safetensors", data)
        resp = app.generate(prompt="x", width=64, height=64, image_loras=[{"path": url}])
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        assert resp.status_code in (200, 400), (i, resp.text)
    assert statuses.get(400, 0) > 50, statuses


# ------------------------------------------------------------------ streaming, in a measured process

RSS_SCRIPT = r"""
import json, sys
from pathlib import Path
from server.config import FetchSettings, LoraSettings
from server.loras import LoraError, LoraStore

def peak():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

spec = json.loads(sys.argv[1])
cache = Path(spec["cache"])
store = LoraStore(LoraSettings(cache_dir=cache, max_file_bytes=spec["cap"], cache_bytes=spec["cap"] * 4),
                  FetchSettings(allow_hosts=["127.0.0.1"]), cache)
store.ensure(spec["warm"])  # imports, connections, first allocations
out = {"base": peak()}
for name, url in spec["urls"].items():
    try:
        out[name] = store.file_for(url).stat().st_size if store.ensure(url) else None
    except LoraError as exc:
        out[name] = exc.message
out["peak"] = peak()
out["left"] = sorted(p.name for p in cache.iterdir() if p.name.startswith("."))
print("RESULT " + json.dumps(out))
"""


def test_big_downloads_stream_to_disk(origin: DiskOrigin, tmp_path: Path) -> None:
    """Issue 12 item 7: a few-hundred-MB LoRA raises the downloading process's peak RSS by far less than its
    size (before: twice its size), and files refused by their header are cut off after it."""
    good = big_file(tmp_path / "good.safetensors",
                    ("transformer.x.lora_A.weight", "transformer.x.lora_B.weight"))
    t5 = big_file(tmp_path / "t5.safetensors",
                  ("text_encoder_2.x.lora_A.weight", "text_encoder_2.x.lora_B.weight"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"<html>" + bytes(100))
    with junk.open("r+b") as fh:
        fh.truncate(BIG)
    origin.disk.update({"/big/good.safetensors": good, "/big/t5.safetensors": t5,
                        "/big/junk.safetensors": junk})
    warm = serve(origin, "/big/warm.safetensors", lora_file_bytes(tiny_flux_lora(1)))
    spec = {"cache": str(tmp_path / "cache"), "cap": 2 * BIG, "warm": warm,
            "urls": {name: origin.url(f"/big/{name}.safetensors") for name in ("t5", "junk", "good")}}
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, json.dumps(spec)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert out["good"] == good.stat().st_size
    assert "2 T5 weights (text_encoder_2.x.lora_A.weight" in out["t5"]
    assert "is not a safetensors file" in out["junk"]
    growth = out["peak"] - out["base"]
    print(f"peak RSS growth downloading a {BIG >> 20} MiB LoRA: {growth / 2**20:.1f} MiB")
    assert growth < RSS_GROWTH_CAP, growth
    for path in ("/big/t5.safetensors", "/big/junk.safetensors"):  # the origin notices the hang-up
        wait_until(lambda: path in origin.sent, f"the origin to see {path} closed", timeout_s=10,
                   interval_s=0.02)
        assert origin.sent[path] < BIG // 4, (path, origin.sent.get(path))
    assert out["left"] == []  # no temporary, pin or lock file stays behind
    stored = Path(spec["cache"]) / f"{LoraStore.key(spec['urls']['good'])}.safetensors"
    with stored.open("rb") as a, good.open("rb") as b:
        assert a.read(1 << 16) == b.read(1 << 16)


def test_header_declaring_more_than_the_cap_is_refused_before_the_body(origin: DiskOrigin,
                                                                       tmp_path: Path) -> None:
    store = lora_store(tmp_path, max_file_bytes=BIG // 2, cache_bytes=BIG)
    origin.disk["/big/over-cap.safetensors"] = big_file(tmp_path / "over.safetensors", (
        "transformer.y.lora_A.weight", "transformer.y.lora_B.weight"))
    # Content-Length says it too, so the fetcher refuses first; without it the header would: both name
    # the cap.
    with pytest.raises(LoraError, match=f"larger than {BIG // 2} bytes"):
        store.ensure(origin.url("/big/over-cap.safetensors"))
    check = StreamCheck(lambda _c: None, Limits(header_bytes=1000, file_bytes=100))
    header = json.dumps({"a.lora_A.weight": {"dtype": "F32", "shape": [100],
                                             "data_offsets": [0, 400]}}).encode()
    with pytest.raises(FormatError, match="larger than 100 bytes"):
        check(len(header).to_bytes(8, "little") + header)


# ------------------------------------------------------------------------------ pins across processes

PIN_SCRIPT = r"""
import sys
from pathlib import Path
from server.config import FetchSettings, LoraSettings
from server.loras import LoraStore

cache = Path(sys.argv[1])
store = LoraStore(LoraSettings(cache_dir=cache), FetchSettings(allow_hosts=["127.0.0.1"]), cache)
with store.use(sys.argv[2]) as file:
    print("pinned", file.name, flush=True)
    sys.stdin.readline()
"""


def test_a_file_in_use_in_another_process_is_not_evicted(origin: DiskOrigin, tmp_path: Path) -> None:
    files = {n: lora_file_bytes(tiny_flux_lora(seed)) for n, seed in (("p", 1), ("q", 2), ("r", 3))}
    urls = {n: serve(origin, f"/pin/{n}.safetensors", body) for n, body in files.items()}
    size = len(files["p"])
    cache = tmp_path / "shared"
    child = subprocess.Popen([sys.executable, "-c", PIN_SCRIPT, str(cache), urls["p"]], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout is not None and child.stdout.readline().startswith("pinned")
        store = LoraStore(LoraSettings(cache_dir=cache, cache_bytes=2 * size, max_file_bytes=size),
                          FetchSettings(allow_hosts=["127.0.0.1"]), tmp_path)
        store.ensure(urls["q"])
        store.ensure(urls["r"])  # three files, room for two: P is the least recently used, but in use
        assert store.file_for(urls["p"]).is_file()
        assert not store.file_for(urls["q"]).exists()
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
        os.utime(store.file_for(urls["p"]), (1, 1))  # the oldest again
        store.ensure(urls["q"])
        assert not store.file_for(urls["p"]).exists()  # released: evicted like any other
        assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# --------------------------------------------------------------------- not the user's fault: not 400


@contextlib.contextmanager
def held(path: Path) -> Iterator[None]:
    """``path`` locked exclusively through an open file of its own, as another process would hold it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def test_a_download_stuck_elsewhere_is_503_not_500(origin: DiskOrigin, tmp_path: Path,
                                                   make_app: Callable[..., InProcessServer]) -> None:
    """Another process holding a LoRA's download lock past the longest a fetch may take: the fetch and
    the requests waiting on it (single flight) answer 503 with Retry-After."""
    url = serve(origin, "/stuck/a.safetensors", lora_file_bytes(tiny_flux_lora(4)))
    store = lora_store(tmp_path, download_timeout_s=0.3)
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            store.ensure(url)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with held(store.directory / f".{store.key(url)}.lock"):
        threads = [threading.Thread(target=fetch) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(errors) == 3 and all(isinstance(e, LoraUnavailable) for e in errors), errors
    assert all(e.status == 503 and e.headers.get("Retry-After") for e in errors)  # type: ignore[attr-defined]
    store.ensure(url)  # released: fetched now
    app = make_app({"fetch": {"allow_hosts": ["127.0.0.1"]},
                    "loras": {"cache_dir": str(tmp_path / "app"), "download_timeout_s": 0.3}},
                   engine="stand-in")
    other = serve(origin, "/stuck/b.safetensors", lora_file_bytes(tiny_flux_lora(5)))
    with held(tmp_path / "app" / f".{LoraStore.key(other)}.lock"):
        resp = app.generate(prompt="x", width=64, height=64, image_loras=[{"path": other}])
    assert resp.status_code == 503 and resp.headers.get("retry-after"), resp.text
    assert resp.json()["error"]["code"] == "lora_unavailable"


def test_server_side_storage_failures_are_500(origin: DiskOrigin, tmp_path: Path,
                                              make_app: Callable[..., InProcessServer]) -> None:
    (tmp_path / "not-a-folder").write_text("x")
    blocked = LoraStore(LoraSettings(cache_dir=tmp_path / "not-a-folder" / "loras"),
                        FetchSettings(allow_hosts=["127.0.0.1"]), tmp_path)
    url = serve(origin, "/server/a.safetensors", lora_file_bytes(tiny_flux_lora(6)))
    with pytest.raises(LoraStoreFailure):
        blocked.ensure(url)
    app = make_app({"fetch": {"allow_hosts": ["127.0.0.1"]},
                    "loras": {"cache_dir": str(tmp_path / "not-a-folder" / "x"),
                              "registered": {"gone": str(tmp_path / "gone.safetensors")}}}, engine="stand-in")
    for path in (url, "gone"):
        resp = app.generate(prompt="x", width=64, height=64, image_loras=[{"path": path}])
        assert resp.status_code == 500, resp.text
        assert resp.json()["error"]["code"] == "lora_store_failed"


def test_out_of_memory_while_loading_is_not_the_files_fault(make_app: Callable[..., InProcessServer],
                                                            tmp_path: Path, origin: DiskOrigin,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA that passed its checks but could not be loaded (here: the device out of memory) is the server's
    failure: 500, the adapter state as it was, and the same LoRA loads once memory is there."""
    from diffusers import FluxPipeline

    app = make_app({"server": {"default_response_format": "base64"}, "fetch": {"allow_hosts": ["127.0.0.1"]},
                    "loras": {"cache_dir": str(tmp_path)}})
    url = serve(origin, "/oom/a.safetensors", lora_file_bytes(tiny_flux_lora(7)))
    load = FluxPipeline.load_lora_weights
    failures = []

    def out_of_memory(self: Any, *args: Any, **kwargs: Any) -> None:
        failures.append(args)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FluxPipeline, "load_lora_weights", out_of_memory)
    request = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "image_loras": [{"path": url}]}
    resp = app.generate(**request)
    assert failures and resp.status_code == 500, resp.text
    assert resp.json()["error"]["type"] == "server_error"
    engine = app.runtime.workers[0].engine  # type: ignore[attr-defined]
    assert engine.loras.resident("darkroom/tiny-flux") == []
    monkeypatch.setattr(FluxPipeline, "load_lora_weights", load)
    assert app.generate(**request).status_code == 200
    assert engine.loras.resident("darkroom/tiny-flux") == [url]


def test_a_header_of_too_many_objects_stops_its_parse() -> None:
    """A 16 MB header of tiny entries would cost hundreds of MB as Python objects: the parse stops at the
    cap (loras.max_tensors)."""
    entry = '"t{i}.lora_A.weight": {{"dtype": "F32", "shape": [1], "data_offsets": [{a}, {b}]}}'
    raw = ("{" + ", ".join(entry.format(i=i, a=4 * i, b=4 * i + 4) for i in range(50)) + "}").encode()
    assert len(parse_header(raw, max_tensors=50).tensors) == 50
    for cap in (49, 10):  # refused after the parse, or during it
        with pytest.raises(FormatError, match=f"more tensors than the {cap} this server reads"):
            parse_header(raw, max_tensors=cap)
