"""Does ``engine.quantize: fp8`` work on this machine's torch + torchao, and what does compiling it cost?

One FLUX-sized MLP (3072 -> 12288 -> 3072, bf16, 4096 tokens: one 1024x1024 image's tokens) quantized with
the server's own quantizer (server/engine/placement.fp8_quantizer: torchao's dynamic float8, per row),
timed eager and under ``torch.compile`` (inductor) against the same MLP in bf16, in one run:

    python scripts/fp8_probe.py            # on a CUDA device of compute capability >= 8.9

Prints the versions, each variant's compile time (first call) and median call time in ms, and the fp8/bf16
ratios. A machine that cannot run fp8 prints why (the server's own refusal) and exits 1.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.optimize import EngineOptionError  # noqa: E402
from server.engine.placement import fp8_quantizer  # noqa: E402


def mlp(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3072, 12288), torch.nn.GELU(approximate="tanh"),
                               torch.nn.Linear(12288, 3072)).to(device, torch.bfloat16)


def timed(module: torch.nn.Module, x: torch.Tensor, calls: int = 20) -> tuple[float, float]:
    """Seconds of the first call (a compile, if any), and the median of ``calls`` more, in ms."""
    def call() -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        module(x)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    first = call()
    return first, 1000 * statistics.median(call() for _ in range(calls))


def main() -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        torchao = version("torchao")
    except PackageNotFoundError:
        torchao = "not installed"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, torchao {torchao}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    try:
        quantize = fp8_quantizer("probe", device)
    except EngineOptionError as exc:
        print(f"fp8 refused: {exc}")
        return 1
    x = torch.randn(4096, 3072, device=device, dtype=torch.bfloat16)
    rows = {}
    with torch.no_grad():
        for name, fp8, compiled in (("bf16 eager", False, False), ("fp8 eager", True, False),
                                    ("bf16 compiled", False, True), ("fp8 compiled", True, True)):
            module = mlp(device)
            if fp8:
                quantize(module)
            if compiled:
                module = torch.compile(module)
            first, median_ms = timed(module, x)
            rows[name] = median_ms
            print(f"{name:14s} first call {first:7.2f} s   median {median_ms:7.3f} ms", flush=True)
    print(f"fp8/bf16: eager {rows['fp8 eager'] / rows['bf16 eager']:.2f}x the time, "
          f"compiled {rows['fp8 compiled'] / rows['bf16 compiled']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
