"""``scripts/bench_serving.py --quick`` runs end to end and prints every row with numbers.

Only the shape of the report is checked, never the timings themselves.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import MODEL, REPO

SCRIPT = REPO / "scripts" / "bench_serving.py"
NUMBER = r"\d+(?:\.\d+)?"


@pytest.mark.heavy
def test_quick_benchmark_prints_every_row(tiny_cache: Path, tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--cache-dir", str(tiny_cache),
         "--size", "64", "--steps", "1", "--json", str(out_json),
         "--busy-size", "128", "--busy-batch", "2", "--hold-s", "0.2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout

    assert re.search(r"^device\s+cpu \(.+\)$", out, re.M), out
    assert re.search(rf"^model\s+{re.escape(MODEL)}$", out, re.M), out
    assert re.search(r"^size\s+64x64$", out, re.M), out
    assert re.search(r"^steps\s+1$", out, re.M), out
    assert re.search(rf"^ceiling\s+direct batched call.* -> {NUMBER} images/s$", out, re.M), out
    for name in ("direct", "http", "concurrency 1", "concurrency 4", "concurrency 16"):
        # name, requests, p50, p90, ratio to direct, images/s, ratio to the ceiling, mean batch
        pattern = (rf"^{name}\s+\d+\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x\s+{NUMBER}\s+{NUMBER}x"
                   rf"\s+{NUMBER}(\s+{NUMBER})?$")  # and the device's busy share at the concurrency levels
        assert re.search(pattern, out, re.M), f"no {name!r} row in:\n{out}"
    stages = " ".join(rf"{stage} {NUMBER}" for stage in ("parse", "queue", "safety", "encode", "b64", "json",
                                                          "hand-back", "send"))
    assert re.search(rf"^overhead at concurrency 1, p50 ms: {stages}", out.replace("  ", " "), re.M), out
    assert re.search(rf"^prompt cache: .* text_encode {NUMBER} -> {NUMBER} ms$", out, re.M), out
    assert re.search(rf"^device busy: .* busy {NUMBER} over {NUMBER} s", out, re.M), out
    for target in ("c=1 overhead", "c=16 throughput", "device busy"):
        assert re.search(rf"^  {target} .*(PASS|FAIL)$", out, re.M), f"no {target!r} target in:\n{out}"

    report = json.loads(out_json.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["direct", "http", "concurrency 1", "concurrency 4", "concurrency 16"]
    assert rows["concurrency 16"]["requests"] == 16
    assert rows["direct"]["vs_direct"] == 1.0
    for row in rows.values():
        # Every response came from a real batch of 1..max_batch_images (8 by default) images.
        assert 1.0 <= row["mean_batch"] <= 8.0
        assert row["p50_s"] > 0 and row["images_per_s"] > 0 and row["vs_ceiling"] > 0
    assert set(report["targets"]) == {"c1_overhead", "c16_vs_ceiling", "device_busy"}
    assert 0 < report["device_busy"]["busy"] <= 1.05 and report["device_busy"]["images"] > 0
    assert report["prompt_cache"]["prompt_cache_hits"] >= 1
