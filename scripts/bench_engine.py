"""Engine benchmark: plain diffusers FluxPipeline against Darkroom with its engine optimizations, same weights.

One run, two configurations, one table:

1. ``baseline``: a plain diffusers ``FluxPipeline`` in this process (bf16 on CUDA, eager, PyTorch SDPA,
   max_sequence_length at the model's full length), timed call by call (prompt in, PIL image out);
2. ``darkroom``: a real ``darkroom serve`` subprocess loading the same folder through a manifest with
   ``source.path`` and an ``engine:`` block (the optimized set by default), timed end to end over HTTP
   (request sent -> base64 JPEG received and decoded) at concurrency 1, 4 and 16.

Columns: p50/p90 latency, images/s, peak memory (GPU: the process's memory as nvidia-smi reports it, or
torch's reserved memory; CPU: the process's peak RSS), ratio to the baseline's images/s, and the
transformer's achieved TFLOP/s (FLOPs counted analytically per step at the resolution and text length:
every linear layer and both attention matmuls of the 19 double and 38 single blocks) against the device's
bf16 dense peak. The weights are random (scripts/build_full_flux.py): random weights cost the same FLOPs as
real ones. Nothing is asserted: it is a measuring tool.

The device proof (docs/gpu.md, "The GPU run"): the full-size architecture with random weights built in
memory, no disk (scripts/bench_engine_random.py has the phases: baseline, ready, HTTP rows, LoRA switches):

    python scripts/bench_engine.py --random schnell --json out.json
    python scripts/bench_engine.py --device cpu --random schnell --scale-down --lora-switch 3 --iterations 1

On weights saved to disk (scripts/build_full_flux.py) or the tiny built-in model (tests run both):

    python scripts/bench_engine.py --weights /data/flux-schnell-random --variant schnell --json out.json
    python scripts/bench_engine.py --device cpu --tiny --iterations 2
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_serving import cpu_name, percentile  # noqa: E402

from server.registry import ModelManifest  # noqa: E402
from tests.support.launch import free_port, stop, wait_ready  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, film photograph"
MODEL_ID = "bench/flux"
# bf16 dense tensor-core peaks (TFLOP/s), by device name.
PEAKS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
         "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
VARIANTS = {"schnell": dict(steps=4, guidance=0.0, max_sequence_length=256),
            "dev": dict(steps=28, guidance=3.5, max_sequence_length=512)}
# Darkroom's optimized engine options on CUDA (override with --engine); on CPU only the cheap ones.
CUDA_ENGINE = {"attention_backend": "_native_cudnn", "fuse_qkv": True,
               "compile": {"transformer": "regional", "vae_decoder": True},
               "sequence_buckets": [128, 256]}
# On CPU: one bucket at half the full length (exercises the bucket path; nothing to compile for).


def transformer_flops(config: dict[str, Any], width: int, height: int, text_tokens: int) -> float:
    """FLOPs of one FLUX transformer call (one image, one step), multiply-add = 2 FLOPs.

    Per token, a double block's two streams each run QKV (3d^2), the output projection (d^2) and the 4x MLP
    (8d^2); a single block runs its fused QKV + MLP-in (7d^2) and its output projection (5d^2): 12d^2
    multiply-adds per token either way. Attention over all N tokens adds QK^T and AV: 2 * N^2 * d each.
    Embedders, modulation and the output layer are counted too (small).
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    image_tokens = (height // 16) * (width // 16)
    n = image_tokens + text_tokens
    blocks = config["num_layers"] + config["num_single_layers"]
    per_block = 2 * 12 * d * d * n + 2 * 2 * n * n * d
    modulation = 2 * d * d * (12 * config["num_layers"] + 3 * config["num_single_layers"] + 2)
    embed = (2 * image_tokens * config["in_channels"] * d + 2 * text_tokens * config["joint_attention_dim"] * d
             + 2 * image_tokens * d * config["in_channels"]
             + 2 * (256 * d + d * d) * (3 if config.get("guidance_embeds") else 2)
             + 2 * (config["pooled_projection_dim"] * d + d * d))
    return float(blocks * per_block + modulation + embed)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAKS.items():
        if key in name:
            return value
    return None


class PeakMemory:
    """The highest memory a process used while this is open: GPU (nvidia-smi, per pid) or CPU RSS."""

    def __init__(self, device: str, pid: int) -> None:
        self.device, self.pid, self.peak = device, pid, 0.0
        self._stop = threading.Event()
        self._smi = shutil.which("nvidia-smi") if device.startswith("cuda") else None
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def sample(self) -> float:
        if self._smi:
            out = subprocess.run([self._smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            return sum(float(mb) * 2**20 for pid, mb in (line.split(",") for line in out.splitlines() if line)
                       if int(pid) == self.pid)
        if self.device.startswith("cuda") and self.pid == os.getpid():
            return float(torch.cuda.max_memory_reserved())
        try:  # VmHWM: the peak resident set size
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
        except OSError:
            pass
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024 if self.pid == os.getpid() else 0.0

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self.sample())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def timed(call: Callable[[int], None], count: int, concurrency: int) -> tuple[list[float], float]:
    """Latencies of ``count`` calls with ``concurrency`` in flight, and the wall time of them all."""
    latencies: list[float] = []

    def one(i: int) -> None:
        started = time.perf_counter()
        call(i)
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    return latencies, time.perf_counter() - started


def bench_baseline(args: argparse.Namespace, load: Callable[[], Any], warmup: int) -> dict[str, Any]:
    """Plain diffusers: ``load()`` gives the pipeline on the device; ``warmup`` untimed calls, then
    ``args.iterations`` timed ones; then the pipeline is freed (the device's memory goes back)."""
    with PeakMemory(args.device, os.getpid()) as memory:
        started = time.perf_counter()
        pipe = load()
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - started

        def call(i: int) -> None:
            pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                 guidance_scale=args.guidance, max_sequence_length=args.max_sequence_length,
                 generator=torch.Generator("cpu").manual_seed(i), output_type="pil").images[0].load()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        for i in range(warmup):
            call(10_000 + i)
        latencies, wall = timed(call, args.iterations, 1)
    config = dict(pipe.transformer.config)
    pipe = None  # the closure above holds the name, not the pipeline: this frees it
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"name": "diffusers baseline (eager, SDPA)", "concurrency": 1, "latencies": latencies,
            "images_per_s": len(latencies) / wall, "peak_bytes": memory.peak, "load_s": load_s,
            "text_tokens": args.max_sequence_length, "config": config}


def load_folder(args: argparse.Namespace, weights: Path, dtype: torch.dtype) -> Any:
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(weights), dtype=dtype).to(args.device)


def darkroom_manifest(args: argparse.Namespace, weights: Path, engine: dict[str, Any]) -> dict[str, Any]:
    engine = {**engine, "warmup": {"sizes": [[args.size, args.size]], "steps": args.steps}}
    return {
        "id": MODEL_ID, "family": "flux", "source": {"path": str(weights)}, "dtype": args.dtype,
        # fused QKV and LoRAs exclude each other; the benchmark measures plain text-to-image.
        "capabilities": {"loras": False, "image_to_image": False},
        "defaults": {"steps": args.steps, "guidance_scale": args.guidance, "width": args.size,
                     "height": args.size, "max_sequence_length": args.max_sequence_length},
        "limits": {"max_n": 1, "max_width": max(args.size, 64), "max_height": max(args.size, 64),
                   "max_pixels": max(args.size, 64) ** 2, "max_steps": max(args.steps, 1)},
        "engine": engine,
    }


def start_darkroom(args: argparse.Namespace, workdir: Path, manifest: dict[str, Any], log_file: Path,
                   **sections: dict[str, Any]) -> tuple[subprocess.Popen[bytes], str]:
    """``darkroom serve`` serving ``manifest`` alone on ``args.device`` (config sections: ``sections`` over the
    benchmark's defaults), its output in ``log_file``; returns the process and its base URL."""
    models = workdir / "models"
    models.mkdir()
    ModelManifest.model_validate(manifest)  # refuse a bad --engine here, not in the server's log
    (models / "bench.yaml").write_text(yaml.safe_dump(manifest))
    config: dict[str, Any] = {
        "models_dir": str(models), "models": [manifest["id"]],
        "engine": {"devices": [args.device], "cache_dir": str(args.cache_dir),
                   **({"cpu_threads": args.cpu_threads} if args.cpu_threads else {})},
        "storage": {"directory": str(workdir / "images")},
        "server": {"default_response_format": "base64"},
        "limits": {"max_n": 1},
        "queue": {"max_jobs": 1000},
        **sections,
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    with log_file.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--config", str(workdir / "config.yaml"),
                                 "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def bench_darkroom(args: argparse.Namespace, weights: Path, engine: dict[str, Any],
                   workdir: Path) -> list[dict[str, Any]]:
    manifest = darkroom_manifest(args, weights, engine)
    log_file = workdir / "server.log"
    proc, url = start_darkroom(args, workdir, manifest, log_file)
    rows: list[dict[str, Any]] = []
    try:
        with PeakMemory(args.device, proc.pid) as memory:
            started = time.perf_counter()
            wait_ready(f"{url}/ready", [proc], args.ready_timeout, lambda: log_file.read_text(errors="replace"))
            ready_s = time.perf_counter() - started
            client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))

            def call(i: int) -> None:
                response = client.post(f"{url}/v1/images/generations", json={
                    "model": MODEL_ID, "prompt": PROMPT, "width": args.size, "height": args.size,
                    "steps": args.steps, "seed": i, "n": 1, "response_format": "base64", "output_format": "jpeg",
                })
                response.raise_for_status()
                Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).load()

            for i in range(args.warmup):
                call(10_000 + i)
            for concurrency in args.concurrency:
                count = max(args.iterations, concurrency) if concurrency > 1 else args.iterations
                latencies, wall = timed(call, count, concurrency)
                rows.append({"name": "darkroom (HTTP, optimized)", "concurrency": concurrency,
                             "latencies": latencies, "images_per_s": count / wall})
            client.close()
        text_tokens = ModelManifest.model_validate(manifest).sequence_length(PROMPT)
        for row in rows:
            row.update(peak_bytes=memory.peak, text_tokens=text_tokens, ready_s=ready_s)
    finally:
        stop(proc, 60)
    return rows


def print_table(rows: list[dict[str, Any]], config: dict[str, Any], args: argparse.Namespace,
                peak: float | None) -> None:
    """The table: one row per configuration, ratios to the first (baseline) row when there is one."""
    base = rows[0]["images_per_s"] if rows and rows[0]["name"].startswith("diffusers") else None
    print()
    header = (f"{'configuration':34s} {'conc':>4s} {'n':>4s} {'p50 s':>8s} {'p90 s':>8s} {'img/s':>8s} "
              f"{'peak GiB':>9s} {'vs base':>8s} {'TFLOP/s':>8s} {'% peak':>7s}")
    print(header)
    print("-" * len(header))
    for row in rows:
        flops = transformer_flops(config, args.size, args.size, row["text_tokens"]) * args.steps
        row["transformer_tflop_per_image"] = flops / 1e12
        row["tflops"] = flops * row["images_per_s"] / 1e12
        row["percent_of_peak"] = 100 * row["tflops"] / peak if peak else None
        row["p50_s"] = percentile(row["latencies"], 0.5)
        row["p90_s"] = percentile(row["latencies"], 0.9)
        row["vs_baseline"] = row["images_per_s"] / base if base else None
        ratio = f"{row['vs_baseline']:.2f}x" if base else "n/a"
        pct = f"{row['percent_of_peak']:.1f}" if peak else "n/a"
        print(f"{row['name']:34s} {row['concurrency']:4d} {len(row['latencies']):4d} {row['p50_s']:8.3f} "
              f"{row['p90_s']:8.3f} {row['images_per_s']:8.2f} {row.get('peak_bytes', 0) / 2**30:9.2f} "
              f"{ratio:>8s} {row['tflops']:8.3g} {pct:>7s}")
    print()
    print(f"transformer FLOPs per image: {rows[0]['transformer_tflop_per_image']:.4g} TFLOP at "
          f"{rows[0]['text_tokens']} text tokens (first row); T5, CLIP and the VAE are not counted")
    darkroom = [r for r in rows if r["name"].startswith("darkroom")]
    if darkroom:
        print(f"darkroom ready after {darkroom[0]['ready_s']:.1f}s (load, compile, warm-up); "
              f"text tokens {darkroom[0]['text_tokens']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="a diffusers FLUX folder (scripts/build_full_flux.py)")
    parser.add_argument("--tiny", action="store_true", help="the tiny built-in model (any device)")
    parser.add_argument("--random", choices=sorted(VARIANTS),
                        help="the full-size architecture with random weights built in memory (the device proof)")
    parser.add_argument("--scale-down", action="store_true", help="--random: one block of each kind, narrow")
    parser.add_argument("--lora-switch", type=int, default=3, help="--random: random LoRAs to register (0-3)")
    parser.add_argument("--lora-rank", type=int, default=16, help="--random: their rank")
    parser.add_argument("--compile-backend", help="--random: torch.compile backend (inductor; eager on CPU)")
    parser.add_argument("--fp8", action="store_true", help="--random: add engine.quantize: fp8")
    parser.add_argument("--server-log", type=Path, help="--random: where the server's log goes")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="schnell")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, help="width = height (default 1024; --tiny 64; --scale-down 128)")
    parser.add_argument("--steps", type=int, help="default: 4 for schnell, 28 for dev; --tiny: 1")
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--max-sequence-length", type=int, help="default 256 schnell, 512 dev; --tiny 64")
    parser.add_argument("--iterations", type=int, help="timed calls per configuration (default 10; --random 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--concurrency", default="1,4,16", help="darkroom levels, comma-separated")
    parser.add_argument("--engine", help="the manifest's engine: block as JSON (default: the optimized set)")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/darkroom").expanduser())
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads on CPU, for the baseline and the server alike (0: torch's default)")
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak of the device, if not known here")
    parser.add_argument("--ready-timeout", type=float, default=330.0)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    if args.random:
        args.variant = args.random
        if not 0 <= args.lora_switch <= 3:
            parser.error("--lora-switch takes 0 to 3 LoRAs")
    variant = VARIANTS[args.variant]
    args.size = args.size or (64 if args.tiny else 128 if args.scale_down else 1024)
    args.steps = args.steps or (1 if args.tiny else variant["steps"])
    args.iterations = args.iterations or (8 if args.random else 10)
    args.guidance = variant["guidance"] if args.guidance is None else args.guidance
    args.max_sequence_length = args.max_sequence_length or (64 if args.tiny else variant["max_sequence_length"])
    cuda = args.device.startswith("cuda")
    args.dtype = "bfloat16" if cuda else "float32"
    if not cuda and args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)  # the baseline's threads; the server gets engine.cpu_threads
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "eager")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    name = device_name(args.device)
    peak = peak_tflops(name, args.peak_tflops)
    if args.random:
        import bench_engine_random

        return bench_engine_random.main(args, name, peak)
    if args.tiny:
        from server.engine.tiny import ensure_tiny_flux

        weights = ensure_tiny_flux(args.cache_dir)
    elif args.weights is None:
        parser.error("give --weights FOLDER, --tiny or --random VARIANT")
    else:
        weights = args.weights.expanduser().resolve()
    if args.engine:
        engine = json.loads(args.engine)
    elif cuda:
        engine = {**CUDA_ENGINE, "sequence_buckets": [b for b in CUDA_ENGINE["sequence_buckets"]
                                                      if b < args.max_sequence_length]}
    else:
        engine = {"sequence_buckets": [args.max_sequence_length // 2]}

    print("random weights: same FLOPs as real ones" + (" (tiny model)" if args.tiny else ""))
    print(f"device      {args.device} ({name}); bf16 dense peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown'}")
    print(f"weights     {weights}")
    print(f"request     {args.size}x{args.size}, {args.steps} steps, guidance {args.guidance}, dtype {args.dtype}")
    print(f"darkroom    engine: {json.dumps(engine, sort_keys=True)}")
    sys.stdout.flush()

    rows: list[dict[str, Any]] = []
    if not args.skip_baseline:
        dtype = getattr(torch, args.dtype)
        rows.append(bench_baseline(args, lambda: load_folder(args, weights, dtype), args.warmup))
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        rows += bench_darkroom(args, weights, engine, Path(tmp))

    config = rows[0].get("config") or json.loads((weights / "transformer" / "config.json").read_text())
    print_table(rows, config, args, peak)
    if args.json:
        report = {"device": args.device, "device_name": name, "peak_tflops": peak, "size": args.size,
                  "steps": args.steps, "engine": engine, "random_weights": True,
                  "rows": [{k: v for k, v in r.items() if k != "config"} for r in rows]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
