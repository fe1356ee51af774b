"""Overhead of the Redis path: `darkroom serve` (in-process queue) versus `darkroom api` + `darkroom worker`
over a real redis-server, side by side, same model, size, steps and thread count, one run each.

For each path: p50/p90 latency one request at a time (concurrency 1), and at concurrency 16 the p50
latency, images/s and mean batch size; then the ratios redis / memory. Both paths run at once and are
measured in alternation over a few rounds (medians reported), so load from elsewhere falls on both alike.
Needs ``redis-server`` on PATH (started here on a free loopback port, no persistence). Nothing is asserted.

    .venv/bin/python scripts/bench_scaleout.py                    # tiny model, 128 px, ~1 min on 2 cores
    .venv/bin/python scripts/bench_scaleout.py --quick            # smoke run
    .venv/bin/python scripts/bench_scaleout.py --size 256 --requests 40 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_serving import (  # noqa: E402
    add_common_args,
    bench_level,
    cpu_name,
    mean_batch,
    percentile,
    resolve_common_args,
    server_config,
)

from server.config import Settings  # noqa: E402
from tests.support.launch import free_port, stop, wait_ready  # noqa: E402

CONCURRENCY = 16


class Processes:
    """The processes of one path: ``serve`` alone, or redis-server + ``api`` + ``worker``."""

    def __init__(self, backend: str, workdir: Path, args: argparse.Namespace, settings: Settings) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        config: dict[str, Any] = {**server_config(args, settings, workdir), "queue": {"max_jobs": 1024}}
        if backend == "redis":
            self.redis_port = free_port()
            config["queue"].update(backend="redis", redis_url=f"redis://127.0.0.1:{self.redis_port}/0")
        self.config_file = workdir / "config.yaml"
        self.config_file.write_text(yaml.safe_dump(config))

    def _spawn(self, argv: list[str], name: str) -> None:
        with (self.workdir / f"{name}.log").open("wb") as log:
            self.procs.append(subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))

    def __enter__(self) -> Processes:
        server = [sys.executable, "-m", "server"]
        config = ["--config", str(self.config_file)]
        if self.backend == "redis":
            redis_server = shutil.which("redis-server")
            if redis_server is None:
                raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
            self._spawn([redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", str(self.workdir)], "redis")
            health = free_port()
            self._spawn([*server, "worker", *config, "--health-port", str(health)], "worker")
            self._spawn([*server, "api", *config, "--port", str(self.port)], "api")
            self._wait(f"http://127.0.0.1:{health}/ready")
        else:
            self._spawn([*server, "serve", *config, "--port", str(self.port)], "serve")
        self._wait(f"{self.url}/ready")
        return self

    def _wait(self, url: str) -> None:
        try:
            wait_ready(url, self.procs, 120, lambda: "\n".join(
                p.read_text(errors="replace") for p in self.workdir.glob("*.log")))
        except RuntimeError:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):  # api, then worker, then redis
            stop(proc, 30)


def measure(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    """Both paths up at once (an idle path costs nothing), measured in alternation, round after round, so
    that load from elsewhere on the machine falls on both alike; each figure is the median over rounds."""
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-") as tmp, \
            Processes("memory", Path(tmp) / "memory", args, settings) as memory, \
            Processes("redis", Path(tmp) / "redis", args, settings) as redis_path:
        paths = {"memory": memory, "redis": redis_path}
        for procs in paths.values():
            asyncio.run(bench_level(procs.url, args, 1, args.warmup))
            asyncio.run(bench_level(procs.url, args, CONCURRENCY, CONCURRENCY))  # meet the batch shapes
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, procs in paths.items():
                _wall, serial, _ = asyncio.run(bench_level(procs.url, args, 1, args.requests))
                wall, loaded, batches = asyncio.run(bench_level(procs.url, args, CONCURRENCY, args.loaded))
                rounds[name].append({
                    "p50_c1_s": percentile(serial, 0.5), "p90_c1_s": percentile(serial, 0.9),
                    "p50_c16_s": percentile(loaded, 0.5), "images_per_s_c16": len(loaded) / wall,
                    "mean_batch_c16": mean_batch(batches)})
    rows = []
    for name, figures in rounds.items():
        row: dict[str, Any] = {"path": name, "rounds": len(figures), "requests_c1": args.requests,
                               "requests_c16": args.loaded}
        for key in figures[0]:
            row[key] = percentile([f[key] for f in figures], 0.5)
        row["per_round"] = figures
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add_common_args(parser, size=128)
    parser.add_argument("--requests", type=int, default=30, help="timed requests at concurrency 1")
    parser.add_argument("--loaded", type=int, default=96, help=f"timed requests at concurrency {CONCURRENCY}")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (figures: their median)")
    args = parser.parse_args(argv)
    settings = resolve_common_args(args)
    if args.model == "darkroom/tiny-flux":
        from server.engine.tiny import ensure_tiny_flux

        ensure_tiny_flux(settings.engine.cache_dir)  # built once here, not by two processes at once
    if args.quick:
        args.requests, args.loaded, args.rounds = 4, CONCURRENCY, 1
    args.warmup = 1 if args.quick else 3

    load_before = os.getloadavg()[0]
    rows = measure(args, settings)
    memory, redis_row = rows
    meta = {"device": f"cpu ({cpu_name()}, torch {torch.__version__}, "
                      f"cpu_threads={settings.engine.cpu_threads or torch.get_num_threads()})",
            "model": args.model, "size": f"{args.size}x{args.size}", "steps": args.steps,
            "load": f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1-min load average)"}
    for key, value in meta.items():
        print(f"{key:<8} {value}")
    print()
    print(f"median of {args.rounds} alternating round(s); c1: {args.requests} requests one at a time, "
          f"c16: {args.loaded} requests, {CONCURRENCY} in flight")
    print(f"{'path':<10}{'p50_c1_s':>10}{'p90_c1_s':>10}{'p50_c16_s':>11}{'images/s_c16':>14}"
          f"{'mean_batch':>12}")
    for r in rows:
        print(f"{r['path']:<10}{r['p50_c1_s']:>10.4f}{r['p90_c1_s']:>10.4f}{r['p50_c16_s']:>11.4f}"
              f"{r['images_per_s_c16']:>14.2f}{r['mean_batch_c16']:>12.2f}")
    ratios = {"p50_c1": redis_row["p50_c1_s"] / memory["p50_c1_s"],
              "p50_c16": redis_row["p50_c16_s"] / memory["p50_c16_s"],
              "images_per_s_c16": redis_row["images_per_s_c16"] / memory["images_per_s_c16"]}
    print(f"{'redis/mem':<10}{ratios['p50_c1']:>9.2f}x{'':>10}{ratios['p50_c16']:>10.2f}x"
          f"{ratios['images_per_s_c16']:>13.2f}x")
    if args.json:
        args.json.write_text(json.dumps({**meta, "rows": rows, "ratios": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
