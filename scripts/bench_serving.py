"""Serving overhead benchmark: a direct diffusers call versus the same request over HTTP.

Measures, for one model (the tiny built-in FLUX by default) at one size and step count:

1. ``direct``: p50/p90 latency of ``Engine.generate`` (the pipeline the server loads) plus JPEG encoding;
2. ``http``: p50/p90 latency of the same request, one at a time, end to end through a real
   ``darkroom serve`` subprocess (base64 response, decoded with Pillow), and its ratio to ``direct``;
3. ``concurrency 1/4/16``: images/s over HTTP with that many requests in flight, and the mean size of
   the batches the server formed (distinct ``batch.id`` of the responses, averaged over ``batch.images``).

Both paths are warmed up before timing. Figures are printed as a plain table; ``--json FILE`` writes them too.
Nothing is asserted: it is a measuring tool. Run it from the repository root:

    .venv/bin/python scripts/bench_serving.py                 # ~1-2 min on 2 CPU cores
    .venv/bin/python scripts/bench_serving.py --quick         # smoke run, ~20 s
    .venv/bin/python scripts/bench_serving.py --size 512 --steps 2 --requests 10 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.api.schemas import parse_request, resolve_params  # noqa: E402
from server.config import Settings, load_settings  # noqa: E402
from server.engine.pipelines import Engine  # noqa: E402
from server.images import encode_image  # noqa: E402
from server.registry import Registry  # noqa: E402
from tests.support.launch import free_port, stop, wait_ready  # noqa: E402

LEVELS = (1, 4, 16)
PROMPT = "a lighthouse on a cliff at dusk, film photograph"


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * p
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def body(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {"model": args.model, "prompt": PROMPT, "width": args.size, "height": args.size,
            "steps": args.steps, "seed": seed, "n": 1, "response_format": "base64"}


def bench_direct(args: argparse.Namespace, settings: Settings, count: int) -> list[float]:
    """Latency of Engine.generate + JPEG encoding, one request at a time, in this process."""
    if settings.engine.cpu_threads:
        torch.set_num_threads(settings.engine.cpu_threads)
    registry = Registry.from_settings(settings.models_dir, [args.model])
    engine = Engine(registry, settings.engine, "cpu")
    engine.load()
    engine.warmup()
    manifest = registry.default
    latencies: list[float] = []
    for i in range(args.warmup + count):
        # Resolved exactly as the server resolves the HTTP body, so both paths run the same call.
        params = resolve_params(parse_request(body(args, i)), manifest, settings.limits)
        started = time.perf_counter()
        images = engine.generate([params]).images[0]
        data = [encode_image(image, params.output_format) for image in images]
        elapsed = time.perf_counter() - started
        if not all(data):
            raise RuntimeError("the pipeline returned no image bytes")
        if i >= args.warmup:
            latencies.append(elapsed)
    return latencies


class ServerProcess:
    """A ``darkroom serve`` subprocess on a free loopback port with a temporary config."""

    def __init__(self, workdir: Path, args: argparse.Namespace, settings: Settings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "models_dir": str(settings.models_dir),
            "models": [args.model],
            "server": {"default_response_format": "base64", "log_level": "WARNING"},
            "storage": {"directory": str(workdir / "images")},
            "engine": {"devices": ["cpu"], "cache_dir": str(settings.engine.cache_dir),
                       "cpu_threads": settings.engine.cpu_threads},
            "scheduler": settings.scheduler.model_dump(),
            "limits": settings.limits.model_dump(),
        }
        self.config_file = workdir / "config.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.log_file = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server", "serve", "--config", str(self.config_file),
                 "--port", str(self.port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(f"{self.url}/ready", [self.proc], 120, lambda: self.log_file.read_text(errors="replace"))
        except RuntimeError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            stop(self.proc)


def check(response: httpx.Response, size: int) -> dict[str, Any]:
    """The response must be a 200 holding a real image of the requested size."""
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text}")
    payload = response.json()
    for item in payload["data"]:
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        image.load()
        if image.size != (size, size):
            raise RuntimeError(f"expected a {size}x{size} image, got {image.size}")
    return payload["batch"]


async def bench_level(url: str, args: argparse.Namespace, concurrency: int,
                      count: int) -> tuple[float, list[float], list[dict[str, Any]]]:
    """Wall time, latencies and batch info of ``count`` requests with ``concurrency`` in flight."""
    latencies: list[float] = []
    batches: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        queue = iter(range(count))

        async def sender() -> None:
            for i in queue:
                started = time.perf_counter()
                response = await client.post("/v1/images/generations", json=body(args, i))
                batches.append(check(response, args.size))
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, batches


def mean_batch(batches: list[dict[str, Any]]) -> float:
    distinct = {b["id"]: b["images"] for b in batches}
    return sum(distinct.values()) / len(distinct)


def row(name: str, latencies: list[float], base_p50: float, images_per_s: float,
        batch: float) -> dict[str, Any]:
    p50 = percentile(latencies, 0.5)
    return {"name": name, "requests": len(latencies), "p50_s": p50, "p90_s": percentile(latencies, 0.9),
            "vs_direct": p50 / base_p50, "images_per_s": images_per_s, "mean_batch": batch}


def add_common_args(parser: argparse.ArgumentParser, size: int) -> None:
    """The options every serving benchmark takes."""
    parser.add_argument("--config", help="darkroom YAML settings to start from (default: built-in)")
    parser.add_argument("--model", default="darkroom/tiny-flux")
    parser.add_argument("--size", type=int, default=size, help="width and height in pixels")
    parser.add_argument("--steps", type=int, help="inference steps (default: the model's)")
    parser.add_argument("--cache-dir", type=Path, help="tiny model cache (default: engine.cache_dir)")
    parser.add_argument("--quick", action="store_true", help="tiny iteration counts, for smoke tests")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")


def resolve_common_args(args: argparse.Namespace) -> Settings:
    """Settings for the run; ``args.model`` and ``args.steps`` filled in from the model's manifest."""
    settings = load_settings(args.config)
    if args.cache_dir:
        settings.engine.cache_dir = args.cache_dir.resolve()
    manifest = Registry.from_settings(settings.models_dir, [args.model]).default
    args.model = manifest.id
    args.steps = args.steps or manifest.defaults.steps
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add_common_args(parser, size=256)
    parser.add_argument("--requests", type=int, default=30, help="timed requests per latency path")
    args = parser.parse_args(argv)
    settings = resolve_common_args(args)
    count = 3 if args.quick else args.requests
    args.warmup = 1 if args.quick else 2

    load_before = os.getloadavg()[0]  # other work on the machine skews every figure below
    direct = bench_direct(args, settings, count)
    base = percentile(direct, 0.5)
    rows = [row("direct", direct, base, len(direct) / sum(direct), 1.0)]
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-") as tmp, \
            ServerProcess(Path(tmp), args, settings) as server:
        asyncio.run(bench_level(server.url, args, 1, args.warmup))
        wall, latencies, batches = asyncio.run(bench_level(server.url, args, 1, count))
        rows.append(row("http", latencies, base, len(latencies) / wall, mean_batch(batches)))
        for level in LEVELS:
            if not args.quick:  # let the server meet this level's batch shapes once, untimed
                asyncio.run(bench_level(server.url, args, level, level))
            per_level = level if args.quick else max(16, 4 * level)
            wall, latencies, batches = asyncio.run(bench_level(server.url, args, level, per_level))
            rows.append(row(f"concurrency {level}", latencies, base, len(latencies) / wall,
                            mean_batch(batches)))

    meta = {"device": f"cpu ({cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads)",
            "model": args.model, "size": f"{args.size}x{args.size}", "steps": args.steps,
            "load": f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1-min load average)"}
    for key, value in meta.items():
        print(f"{key:<8} {value}")
    print()
    print(f"{'path':<16}{'requests':>9}{'p50_s':>9}{'p90_s':>9}{'vs_direct':>11}{'images/s':>10}"
          f"{'mean_batch':>12}")
    for r in rows:
        print(f"{r['name']:<16}{r['requests']:>9}{r['p50_s']:>9.3f}{r['p90_s']:>9.3f}"
              f"{r['vs_direct']:>10.2f}x{r['images_per_s']:>10.2f}{r['mean_batch']:>12.2f}")
    if args.json:
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
