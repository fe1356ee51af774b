"""What accounting for every tensor of a LoRA file costs: the raw-key inspection of a ~300 MB file.

    .venv/bin/python scripts/bench_lora_inspect.py [--rank 32] [--repeat 20]

Writes a FLUX.1-dev-shaped LoRA in kohya/sd-scripts naming (every double and single block layer the
converter knows, down/up/alpha, bf16; rank 32 gives ~306 MB) into a temporary folder, then times, median and
fastest of ``--repeat`` runs:

- raw-key inspection: ``read_header`` (the 8-byte length, the JSON header parsed and checked strictly) and
  ``classify`` of every tensor name (server/lora_format.py): what the store runs on every download and the
  engine before every load;
- the NaN/Inf check of every tensor's values (``check_finite``: bit patterns, numpy, a chunk at a time), which
  the store runs once per download and the engine before every load;
- for scale, the baseline a load pays anyway: ``safetensors.torch.load_file`` of the whole file; both of
  these from a warm page cache.

The tensor data is zeros written sparsely (the inspection never reads it; the load does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.lora_format import read_header  # noqa: E402
from server.safetensors_header import Limits, check_finite  # noqa: E402

DOUBLE = {  # sd-scripts layer -> (in, out) on FLUX.1-dev (hidden 3072)
    "img_attn_qkv": (3072, 9216), "img_attn_proj": (3072, 3072), "img_mlp_0": (3072, 12288),
    "img_mlp_2": (12288, 3072), "img_mod_lin": (3072, 18432),
    "txt_attn_qkv": (3072, 9216), "txt_attn_proj": (3072, 3072), "txt_mlp_0": (3072, 12288),
    "txt_mlp_2": (12288, 3072), "txt_mod_lin": (3072, 18432),
}
SINGLE = {"linear1": (3072, 21504), "linear2": (15360, 3072), "modulation_lin": (3072, 9216)}


def write_lora(path: Path, rank: int) -> tuple[int, int]:
    """A kohya FLUX LoRA header over sparse zeros; returns (tensors, bytes)."""
    layers = {f"double_blocks_{i}_{n}": s for i in range(19) for n, s in DOUBLE.items()}
    layers |= {f"single_blocks_{i}_{n}": s for i in range(38) for n, s in SINGLE.items()}
    header: dict[str, object] = {"__metadata__": {"ss_network_dim": str(rank),
                                                  "ss_network_module": "networks.lora_flux"}}
    at = 0
    for name, (fan_in, fan_out) in layers.items():
        for suffix, shape, dtype, size in ((".lora_down.weight", [rank, fan_in], "BF16", 2 * rank * fan_in),
                                          (".lora_up.weight", [fan_out, rank], "BF16", 2 * rank * fan_out),
                                          (".alpha", [], "F32", 4)):
            header[f"lora_unet_{name}{suffix}"] = {"dtype": dtype, "shape": shape,
                                                   "data_offsets": [at, at + size]}
            at += size
    raw = json.dumps(header).encode()
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(8 + len(raw) + at)
    return len(header) - 1, 8 + len(raw) + at


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - started) * 1000)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flux-dev-kohya.safetensors"
        tensors, size = write_lora(path, args.rank)

        def inspect() -> None:
            header = read_header(path, Limits())  # parses, then classifies every name
            assert header.inventory is not None and sum(header.inventory.applied.values()) == tensors

        def finite() -> None:
            check_finite(path, read_header(path, Limits()))

        def load() -> None:
            from safetensors.torch import load_file

            load_file(str(path))

        inspection = timed(inspect, args.repeat)
        load()  # warm the page cache and torch
        values = timed(finite, max(3, args.repeat // 4))
        baseline = timed(load, max(3, args.repeat // 4))
    print(f"file: {size / 1e6:.0f} MB, {tensors} tensors, kohya FLUX.1-dev rank {args.rank}, header "
          f"{path.name}")
    print(f"{'':36}{'median ms':>12}{'fastest ms':>12}")
    for label, runs in (("raw-key inspection (header+classify)", inspection),
                        ("NaN/Inf check of the values", values),
                        ("baseline: safetensors load_file", baseline)):
        print(f"{label:36}{statistics.median(runs):12.1f}{min(runs):12.1f}")
    ratio = statistics.median(inspection) / statistics.median(baseline)
    print(f"inspection / baseline (medians): {ratio:.4f}")


if __name__ == "__main__":
    main()
