"""The guarded fetcher's overhead: fetch + decode of an image from a loopback HTTP server, against
decoding the same bytes already in memory (and a data: URL, and a cache hit).

    .venv/bin/python scripts/bench_fetch.py [--size 512] [--repeat 200] [--format jpeg]

Each figure is the median (and p90) over ``--repeat`` runs, in milliseconds. The fetch path does
everything a request does: scheme check, address check (the server is reached as ``localhost``, allowed
by ``allow_hosts``), one connection per fetch, streaming with the byte cap and deadline, sniffing,
pixel check, decode, EXIF transpose, RGB. The cache is off for the fetch figure and on for the last.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import FetchSettings  # noqa: E402
from server.fetch import Fetcher  # noqa: E402
from server.images import decode_image  # noqa: E402


def make_image(size: int, fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    # Smooth content with some noise, so the JPEG is a realistic size rather than trivially small.
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([xx * 255, yy * 255, (1 - xx) * 255], axis=2)
    arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return buf.getvalue()


def serve(body: bytes, ctype: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    fn()  # warm
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.9) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--format", choices=["jpeg", "png"], default="jpeg")
    args = parser.parse_args()

    body = make_image(args.size, args.format)
    httpd = serve(body, f"image/{args.format}")
    url = f"http://localhost:{httpd.server_address[1]}/image.{args.format}"
    data_url = f"data:image/{args.format};base64," + base64.b64encode(body).decode()
    settings = dict(allow_hosts=["localhost"], max_pixels=40_000_000)
    uncached = Fetcher(FetchSettings(**settings, cache_entries=0))
    cached = Fetcher(FetchSettings(**settings))
    cached.fetch_image(url, "image_url")

    rows = [
        ("decode in memory", timed(lambda: decode_image(body, "image_url", 40_000_000), args.repeat)),
        ("fetch + decode (loopback http)", timed(lambda: uncached.fetch_image(url, "image_url"), args.repeat)),
        ("data: URL parse + decode", timed(lambda: uncached.fetch_image(data_url, "image_url"), args.repeat)),
        ("cache hit", timed(lambda: cached.fetch_image(url, "image_url"), args.repeat)),
    ]
    print(f"{args.size}x{args.size} {args.format}, {len(body)} bytes, {args.repeat} runs each")
    print(f"{'path':34s} {'median ms':>10s} {'p90 ms':>8s}")
    for name, (median, p90) in rows:
        print(f"{name:34s} {median:10.3f} {p90:8.3f}")
    overhead = rows[1][1][0] - rows[0][1][0]
    print(f"fetcher overhead (fetch+decode - decode, median): {overhead:.3f} ms")
    httpd.shutdown()
    uncached.close()
    cached.close()


if __name__ == "__main__":
    main()
