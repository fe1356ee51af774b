"""How fast a ``darkroom api`` pod starts and how much memory it holds: process start → ``/health`` 200, the
resident set size (RSS) then, and whether torch was loaded into it.

Starts a redis-server on a free loopback port (``darkroom api`` needs ``queue.backend: redis``), then, per
run, a fresh ``python -m server api`` from ``--repo`` (default: this checkout), polls ``/health`` every 10 ms,
reads ``VmRSS`` from ``/proc/<pid>/status`` and looks for ``libtorch`` in ``/proc/<pid>/maps``, and stops it
with SIGTERM. Prints each run and the medians. Nothing is asserted (Linux only: it reads ``/proc``).

    .venv/bin/python scripts/measure_api_start.py                       # this checkout, 5 runs
    .venv/bin/python scripts/measure_api_start.py --repo /work/main     # another checkout, same method
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.launch import RedisProcess, free_port, stop  # noqa: E402


def one_run(repo: Path, config: Path, timeout_s: float) -> tuple[float, float, bool]:
    """(seconds to /health 200, RSS in MB at that moment, whether libtorch is mapped)."""
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "server", "api", "--config", str(config),
                             "--port", str(port)],
                            cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"darkroom api exited with {proc.returncode} (run it by hand to see why)")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - started > timeout_s:
                raise SystemExit(f"no /health 200 within {timeout_s}s")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        torch_loaded = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        return elapsed, rss_kb / 1024, torch_loaded
    finally:
        stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose `python -m server api` runs")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis_proc = RedisProcess(workdir).start()
        try:
            config = workdir / "api.yaml"
            config.write_text(yaml.safe_dump({
                "queue": {"backend": "redis", "redis_url": redis_proc.url},
                "storage": {"directory": str(workdir / "images")},
                "engine": {"cache_dir": str(workdir / "cache")},
            }))
            rows = [one_run(args.repo.resolve(), config, args.timeout) for _ in range(args.runs)]
        finally:
            redis_proc.stop()
    print(f"darkroom api in {args.repo.resolve()} ({args.runs} runs, python {sys.version.split()[0]})")
    for i, (seconds, rss, torch_loaded) in enumerate(rows, 1):
        print(f"  run {i}: start to /health 200 {seconds:6.2f} s   RSS {rss:6.0f} MB   "
              f"torch loaded: {torch_loaded}")
    print(f"  median: {statistics.median(r[0] for r in rows):.2f} s, "
          f"{statistics.median(r[1] for r in rows):.0f} MB RSS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
