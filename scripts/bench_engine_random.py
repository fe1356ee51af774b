"""``scripts/bench_engine.py --random schnell|dev``: the whole engine proof in one process, no weights on disk.

Phases, each appended to the JSON file as soon as it ends (a run killed at its time limit keeps what
finished), with the server's log written beside it from the start:

1. ``baseline``: plain diffusers ``FluxPipeline`` (eager, PyTorch SDPA, bf16 on CUDA) on the random
   full-size FLUX.1 built in memory on the device; 1 warm-up and ``--iterations`` timed calls at the
   size and steps of the variant (1024x1024, 4 steps for schnell); then freed.
2. ``ready``: ``darkroom serve`` with a manifest ``source: {builtin: flux-<variant>-random}`` and the best
   option set that ships with LoRAs on (hotswap slots, regional transformer + VAE decoder compile,
   attention backend, sequence buckets), ``--lora-switch`` random full-size LoRAs registered; the time
   until ``/ready`` (build, compile, warm-up), at most ``--ready-timeout`` (default 330 s).
3. HTTP rows: concurrency 1 (``--iterations`` timed after one untimed), a long prompt (past the first
   sequence bucket), one ``url`` response fetched back, concurrency 4.
4. LoRA switches: A, B, C, A+B, none, A (from the registered LoRAs), each timed, with the graphs compiled
   during each counted (``/ready``'s ``compile``).

Then the table, and ``recompiles after ready: N`` (graphs compiled after ``/ready``, over all phases).
On CPU (``--device cpu --scale-down``) the same phases run on a scaled-down random architecture as a
rehearsal; torch.compile there uses dynamo's ``eager`` backend unless ``--compile-backend inductor``:
the same graphs, guards and recompiles, without generating kernels.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_engine import PeakMemory, bench_baseline, print_table, start_darkroom, timed  # noqa: E402

from server.registry import ModelManifest  # noqa: E402
from tests.support.launch import stop, wait_ready  # noqa: E402

MODEL_ID = "bench/flux-random"
PROMPT = "a lighthouse on a cliff at dusk, film photograph"
# Past the 128-token bucket (T5 counts at most characters + 2): runs at the full max_sequence_length.
LONG_PROMPT = ("a lighthouse on a cliff at dusk, film photograph, waves breaking on black rocks below, "
               "gulls in the wind, a fishing boat with a red hull coming home, warm light in the keeper's "
               "window, storm clouds over the sea, grain and halation of expired film")
SWITCHES = ("A", "B", "C", "A+B", "none", "A")


class Report:
    """The JSON report, rewritten whole after every phase."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**header, "phases": {}}
        self.write()

    def phase(self, name: str, result: dict[str, Any]) -> None:
        self.data["phases"][name] = result
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def summary(latencies: list[float], wall: float) -> dict[str, Any]:
    from bench_serving import percentile

    return {"n": len(latencies), "latencies": latencies, "p50_s": percentile(latencies, 0.5),
            "p90_s": percentile(latencies, 0.9), "images_per_s": len(latencies) / wall}


def random_loras(count: int, variant: str, small: bool, rank: int, folder: Path) -> dict[str, Path]:
    """``count`` random LoRAs for the full (or scaled-down) transformer, in diffusers/peft format, on the
    layers the hotswap slots cover; named A, B, C, ..."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from server.engine.lora_slots import DEFAULT_TARGETS, slot_layers
    from server.engine.random_flux import transformer_config

    with torch.device("meta"):
        shapes = FluxTransformer2DModel(**transformer_config(variant, small))
    layers = slot_layers(shapes, DEFAULT_TARGETS)
    files = {}
    for i in range(count):
        name = chr(ord("A") + i)
        gen = torch.Generator().manual_seed(100 + i)
        state = {}
        for layer, module in layers.items():
            a = torch.randn(rank, module.in_features, generator=gen) / module.in_features ** 0.5
            b = torch.randn(module.out_features, rank, generator=gen) * 0.01
            state[f"transformer.{layer}.lora_A.weight"] = a.to(torch.bfloat16)
            state[f"transformer.{layer}.lora_B.weight"] = b.to(torch.bfloat16)
        files[name] = folder / f"lora-{name}.safetensors"
        save_file(state, str(files[name]))
    return files


def build_on_device(args: argparse.Namespace, dtype: torch.dtype) -> Any:
    """Plain diffusers' pipeline of the random architecture, every weight on the device (the baseline)."""
    from server.engine.random_flux import build_random_flux, materialize

    pipe = build_random_flux(args.variant, args.device, dtype, scale_down=args.scale_down)
    materialize(pipe.transformer, args.device)
    return pipe


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The best option set that ships with LoRAs on (fused QKV excludes LoRAs; fp8 is opt-in)."""
    if args.engine:
        return dict(json.loads(args.engine))
    cuda = args.device.startswith("cuda")
    buckets = [b for b in (128, 256, 512) if b < args.max_sequence_length][:1]
    options: dict[str, Any] = {
        "compile": {"transformer": "regional", "vae_decoder": True, "backend": args.compile_backend},
        "sequence_buckets": buckets,
        "warmup": {"sizes": [[args.size, args.size]], "steps": 1},
    }
    if cuda:
        options["attention_backend"] = "_native_cudnn"
    if args.fp8:
        options["quantize"] = "fp8"
    return options


def manifest_for(args: argparse.Namespace, engine: dict[str, Any]) -> dict[str, Any]:
    builtin = f"flux-{args.variant}-random" + ("-small" if args.scale_down else "")
    data = {
        "id": MODEL_ID, "family": "flux", "source": {"builtin": builtin}, "dtype": args.dtype,
        "capabilities": {"loras": True, "image_to_image": False, "guidance": args.variant == "dev"},
        "defaults": {"steps": args.steps, "guidance_scale": args.guidance, "width": args.size,
                     "height": args.size, "max_sequence_length": args.max_sequence_length},
        "limits": {"max_n": 1, "max_width": args.size, "max_height": args.size, "max_steps": args.steps,
                   "max_pixels": args.size * args.size},
        "engine": engine,
    }
    return data


class Server:
    def __init__(self, args: argparse.Namespace, workdir: Path, loras: dict[str, Path],
                 engine: dict[str, Any], log_file: Path) -> None:
        self.manifest = manifest_for(args, engine)
        self.log_file = log_file
        self.proc, self.url = start_darkroom(
            args, workdir, self.manifest, log_file,
            scheduler={"max_batch_images": 4},
            loras={"hotswap": True, "registered": {k: str(v) for k, v in loras.items()},
                   "cache_dir": str(workdir / "lora-cache")},
            safety={"enabled": False})
        self.client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))

    def wait_ready(self, timeout_s: float) -> float:
        started = time.perf_counter()
        wait_ready(f"{self.url}/ready", [self.proc], timeout_s,
                   lambda: self.log_file.read_text(errors="replace")[-4000:])
        return time.perf_counter() - started

    def compile_state(self) -> dict[str, Any]:
        """``/ready``'s compile counters (graphs compiled, and those compiled after ready)."""
        return dict(self.client.get(f"{self.url}/ready").json().get("compile") or {})

    def generate(self, seed: int, prompt: str = PROMPT, loras: tuple[str, ...] = (),
                 response_format: str = "base64") -> dict[str, Any]:
        body: dict[str, Any] = {"model": MODEL_ID, "prompt": prompt, "seed": seed, "n": 1,
                                "response_format": response_format, "output_format": "jpeg"}
        if loras:
            body["image_loras"] = [{"path": name, "scale": 0.8} for name in loras]
        response = self.client.post(f"{self.url}/v1/images/generations", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        item = response.json()["data"][0]
        data = base64.b64decode(item["b64_json"]) if "b64_json" in item else None
        if data is not None:
            Image.open(io.BytesIO(data)).load()
        return item

    def close(self) -> None:
        self.client.close()
        stop(self.proc, 60)


def http_rows(args: argparse.Namespace, server: Server, report: Report) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(name: str, concurrency: int, prompt: str, count: int) -> dict[str, Any]:
        latencies, wall = timed(lambda i: server.generate(20_000 + i, prompt), count, concurrency)
        tokens = ModelManifest.model_validate(server.manifest).sequence_length(prompt)
        result = {"name": name, "concurrency": concurrency, "text_tokens": tokens, **summary(latencies, wall)}
        rows.append(result)
        report.phase(name if concurrency == 1 else f"{name} c={concurrency}", result)
        return result

    server.generate(10_000)  # one untimed request through every layer
    row("darkroom HTTP", 1, PROMPT, args.iterations)
    row("darkroom HTTP, long prompt", 1, LONG_PROMPT, max(1, args.iterations // 2))
    # One url response: the request, then the image fetched back from the URL.
    started = time.perf_counter()
    item = server.generate(30_000, response_format="url")
    request_s = time.perf_counter() - started
    fetched = httpx.get(item["url"], timeout=60)
    fetched.raise_for_status()
    Image.open(io.BytesIO(fetched.content)).load()
    url_s = time.perf_counter() - started
    tokens = ModelManifest.model_validate(server.manifest).sequence_length(PROMPT)
    result = {"name": "darkroom HTTP, url + fetch", "concurrency": 1, "text_tokens": tokens,
              "request_s": request_s, "bytes": len(fetched.content), **summary([url_s], url_s)}
    rows.append(result)
    report.phase("url", result)
    row("darkroom HTTP", 4, PROMPT, max(args.iterations, 4))
    return rows


def lora_switches(args: argparse.Namespace, server: Server, report: Report) -> list[dict[str, Any]]:
    names = [chr(ord("A") + i) for i in range(args.lora_switch)]
    sequence = [s for s in SWITCHES if s == "none" or all(n in names for n in s.split("+"))]
    rows = []
    for i, switch in enumerate(sequence):
        before = server.compile_state().get("graphs")
        loras = () if switch == "none" else tuple(switch.split("+"))
        latencies, wall = timed(lambda _: server.generate(40_000 + i, loras=loras), 1, 1)
        after = server.compile_state().get("graphs")
        compiled = after - before if isinstance(before, int) and isinstance(after, int) else None
        tokens = ModelManifest.model_validate(server.manifest).sequence_length(PROMPT)
        result = {"name": f"darkroom LoRA {switch}", "concurrency": 1, "text_tokens": tokens,
                  "graphs_compiled": compiled, **summary(latencies, wall)}
        rows.append(result)
        report.phase(f"lora {i + 1}: {switch}", result)
    return rows


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], Report]:
    """Every phase; returns the rows, the final compile counters and the report."""
    dtype = getattr(torch, args.dtype)
    engine = engine_options(args)
    report = Report(args.json, {"device": args.device, "variant": args.variant, "scale_down": args.scale_down,
                                "size": args.size, "steps": args.steps, "engine": engine,
                                "random_weights": True, "server_log": str(args.server_log)})
    rows: list[dict[str, Any]] = []
    if not args.skip_baseline:
        baseline = bench_baseline(args, lambda: build_on_device(args, dtype), warmup=1)
        rows.append(baseline)
        report.phase("baseline", baseline)
    with tempfile.TemporaryDirectory(prefix="bench-random-") as tmp:
        loras = random_loras(args.lora_switch, args.variant, args.scale_down, args.lora_rank, Path(tmp))
        server = Server(args, Path(tmp), loras, engine, args.server_log)
        try:
            with PeakMemory(args.device, server.proc.pid) as memory:
                ready_s = server.wait_ready(args.ready_timeout)
                at_ready = server.compile_state()
                report.phase("ready", {"ready_s": ready_s, "compile": at_ready})
                darkroom = http_rows(args, server, report)
                if args.lora_switch:
                    darkroom += lora_switches(args, server, report)
                final = server.compile_state()
            for row in darkroom:
                row.update(peak_bytes=memory.peak, ready_s=ready_s)
            rows += darkroom
            report.phase("end", {"compile": final, "peak_bytes": memory.peak})
        finally:
            server.close()
    return rows, final, report


def main(args: argparse.Namespace, name: str, peak: float | None) -> int:
    """Every phase, then the table and the recompile count (bench_engine.py parses the arguments)."""
    from server.engine.random_flux import transformer_config

    args.json = args.json or Path(tempfile.gettempdir()) / f"bench-engine-random-{args.variant}.json"
    args.server_log = args.server_log or args.json.with_suffix(".server.log")
    print(f"random weights, built in memory on {args.device}: same FLOPs as real ones (images are noise)")
    print(f"device      {args.device} ({name}); bf16 dense peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown'}")
    print(f"model       FLUX.1-{args.variant}{' (scaled down)' if args.scale_down else ''}, "
          f"{args.lora_switch} random LoRAs of rank {args.lora_rank}")
    print(f"request     {args.size}x{args.size}, {args.steps} steps, guidance {args.guidance}, dtype {args.dtype}")
    print(f"darkroom    engine: {json.dumps(engine_options(args), sort_keys=True)}")
    print(f"report      {args.json} (after every phase); server log {args.server_log}")
    sys.stdout.flush()
    rows, final, report = run(args)
    config = rows[0].get("config") or transformer_config(args.variant, args.scale_down)
    print_table(rows, config, args, peak)
    switches = [r for r in rows if r["name"].startswith("darkroom LoRA")]
    if switches:
        print("LoRA switches: " + ", ".join(
            f"{r['name'].removeprefix('darkroom LoRA ')} {r['p50_s']:.3f}s/{r['graphs_compiled']} graphs"
            for r in switches))
    graphs, after = final.get("graphs"), final.get("recompiles_after_ready")
    print(f"compiled graphs: {graphs if graphs is not None else 'n/a'}")
    print(f"recompiles after ready: {after if after is not None else 'n/a'}")
    report.data["rows"] = [{k: v for k, v in r.items() if k != "config"} for r in rows]
    report.data["recompiles_after_ready"] = after
    report.write()
    return 0
