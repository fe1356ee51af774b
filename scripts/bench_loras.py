"""What per-request LoRAs cost on one engine: first use, switching, and a no-LoRA request after a LoRA one.

    .venv/bin/python scripts/bench_loras.py [--size 256] [--steps 4] [--repeat 7] [--hotswap]

Runs in-process on the embedded tiny FLUX (CPU unless --device says otherwise), the way a worker does:
``Engine.generate`` with the LoRA store fetching over HTTP from a loopback origin through the guarded
fetcher (127.0.0.1 allowed for this run only). Prints, for each case, the median and the fastest wall time of
the whole ``generate`` call and their overhead over a warm no-LoRA call (on a shared machine the fastest run
is the steadier figure):

- first use:     a LoRA never seen before (download into the disk cache + load as an adapter + the call)
- first use (cached file): on disk already, loaded as a new adapter
- same set:      the LoRA set of the previous call again (nothing to do but run: the LoRA's own compute)
- switch A<->B:  alternating between two resident LoRAs (set_adapters; hotswap: both stay in their slots)
- A -> A+B:      from one LoRA to two, both resident
- none after A:  a no-LoRA call right after a LoRA call (disable_lora; hotswap: scales set to 0)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.config import EngineSettings, FetchSettings, LoraSettings, SafetySettings  # noqa: E402
from server.engine.pipelines import Engine  # noqa: E402
from server.loras import LoraStore  # noqa: E402
from server.params import GenerationParams, LoraRef  # noqa: E402
from server.registry import Registry, load_manifests  # noqa: E402
from tests.support.tiny_loras import lora_file_bytes, tiny_flux_lora  # noqa: E402


def serve(files: dict[str, bytes]) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default; 1 keeps figures steadier "
                             "on a shared machine)")
    parser.add_argument("--hotswap", action="store_true", help="LoRA hotswap slots (as for torch.compile)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer (implies --hotswap) and fail on any "
                             "recompilation")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: a temp dir)")
    args = parser.parse_args()
    args.hotswap = args.hotswap or args.compile

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-loras-"))
    cache_dir = args.cache_dir or work / "models"
    n_first = args.repeat
    files = {f"/lora{i}.safetensors": lora_file_bytes(tiny_flux_lora(100 + i)) for i in range(n_first + 3)}
    httpd, base = serve(files)
    lora_settings = LoraSettings(cache_dir=work / "loras", hotswap=args.hotswap, max_resident=n_first + 4)
    store = LoraStore(lora_settings, FetchSettings(allow_hosts=["127.0.0.1"]), cache_dir)
    manifest = load_manifests(REPO / "models")["darkroom/tiny-flux"]
    engine = Engine(Registry([manifest]), EngineSettings(cache_dir=cache_dir), args.device,
                    SafetySettings(enabled=False), loras=store)
    engine.load()
    engine.warmup()
    if args.compile:
        # After the hotswap slots exist, as diffusers requires; only the text-to-image pipe is benchmarked.
        pipe = engine.pipeline(manifest.id)
        pipe.transformer = torch.compile(pipe.transformer)

    def params(*paths: str, seed: int = 0) -> GenerationParams:
        return GenerationParams(
            model=manifest.id, prompt="a lighthouse at dusk", width=args.size, height=args.size,
            steps=args.steps, guidance_scale=3.5, seeds=(seed,), max_sequence_length=64,
            loras=tuple(LoraRef(p, 0.8) for p in paths))

    def timed(p: GenerationParams) -> float:
        started = time.perf_counter()
        engine.generate([p])
        return time.perf_counter() - started

    url = lambda i: f"{base}/lora{i}.safetensors"  # noqa: E731
    a, b = url(n_first), url(n_first + 1)
    started = time.perf_counter()
    timed(params())
    if args.compile:
        timed(params(url(n_first + 2)))  # compiled with a LoRA in a slot; no case below may recompile
        print(f"compiling (first two calls): {time.perf_counter() - started:.1f} s")
        torch.compiler.set_stance("fail_on_recompile")
    results: dict[str, list[float]] = {"no LoRA (warm)": [timed(params()) for _ in range(args.repeat)]}
    # First use: every call names a LoRA never seen (download + load); then the same, file on disk.
    results["first use (download + load)"] = [timed(params(url(i))) for i in range(n_first)]
    download = []
    for i in range(n_first):  # the download alone, into a fresh cache folder
        store2 = LoraStore(lora_settings.model_copy(update={"cache_dir": work / f"dl{i}"}),
                           FetchSettings(allow_hosts=["127.0.0.1"]), cache_dir)
        started = time.perf_counter()
        store2.ensure(url(i))
        download.append(time.perf_counter() - started)
        store2.close()
    results["  of which download (fetch + check + write)"] = download
    for p in (a, b):  # on disk, not loaded yet
        store.ensure(p)
    results["first use (cached file: load)"] = [timed(params(a)), timed(params(b))]
    results["same set again (A, A, ...)"] = [timed(params(a)) for _ in range(args.repeat)]
    switch = []
    for i in range(args.repeat):
        switch.append(timed(params(b if i % 2 == 0 else a)))
    results["switch between resident A <-> B"] = switch
    both = []
    for _ in range(args.repeat):
        timed(params(a))
        both.append(timed(params(a, b)))
    results["switch A -> A+B (both resident)"] = both
    after = []
    for _ in range(args.repeat):
        timed(params(a))
        after.append(timed(params()))
    results["no LoRA right after a LoRA call"] = after

    base_s = statistics.median(results["no LoRA (warm)"])
    mode = ("hotswap slots, compiled, no recompilation" if args.compile else
            "hotswap slots" if args.hotswap else "named adapters")
    print(f"tiny FLUX on {args.device} ({torch.get_num_threads()} threads), {args.size}x{args.size}, "
          f"{args.steps} steps, LoRA rank 4 on {len(tiny_flux_lora(0)) // 2} layers "
          f"({len(files['/lora0.safetensors']) // 1024} KiB), {mode}")
    base_min = min(results["no LoRA (warm)"])
    print(f"{'case':40s} {'median ms':>10s} {'overhead':>9s} {'min ms':>8s} {'overhead':>9s} {'n':>3s}")
    for name, values in results.items():
        med, low = statistics.median(values), min(values)
        over, over_low = (med, low) if name.startswith("  ") else (med - base_s, low - base_min)
        print(f"{name:40s} {med * 1000:10.1f} {over * 1000:9.1f} {low * 1000:8.1f} {over_low * 1000:9.1f} "
              f"{len(values):3d}")
    print(f"engine: {engine.loras.loads} adapter loads, {engine.loras.swaps} hotswaps; "
          f"store: {store.downloads} downloads, {store.hits} cache hits")
    httpd.shutdown()
    store.close()


if __name__ == "__main__":
    main()
