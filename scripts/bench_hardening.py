"""The attacks of issue 12 against a real ``darkroom serve`` (tiny model, CPU) and a ``darkroom api`` on a
Redis that never answers; prints, per attack: requests, correct answers, 5xx, and the server's peak RSS
(sampled from /proc while the attack runs, next to its RSS before it), then a plain request's latency while
40 downloads stall, side by side with the same request on the idle server. For the hung-Redis row the 503s
are the correct answers.

    .venv/bin/python scripts/bench_hardening.py             # ~2 min on 2 cores
    .venv/bin/python scripts/bench_hardening.py --json out.json

Nothing is asserted; "correct" is the answer each attack should get (named in the table). The origin of the
slow downloads and images is tests/image_origin.py on loopback (``fetch.allow_hosts: [localhost]``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.image_origin import ImageOrigin, palette_bomb  # noqa: E402
from tests.support.launch import SilentRedis, free_port, stop, wait_ready  # noqa: E402

PLAIN = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 1, "response_format": "base64"}
MAX_CONNECTIONS = 100


class Process:
    """A ``darkroom serve``/``api`` subprocess with its config, and its RSS sampled on demand."""

    def __init__(self, command: str, workdir: Path, config: dict[str, Any]) -> None:
        import subprocess

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        self.log_file = workdir / f"{command}.log"
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server", command, "--config", str(workdir / "config.yaml"),
                 "--port", str(self.port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


class PeakRss:
    """Samples a process's RSS every 20 ms while the block runs."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.before = self.peak = process.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.1)
        self._stop.set()
        self._thread.join()


def raw_exchange(port: int, data: bytes, pause_s: float = 0.0) -> int:
    """Send raw bytes, return the status of the answer (0: none, the connection closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        time.sleep(pause_s)
        head = b""
        try:
            while b"\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        except OSError:
            return 0
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def run_attack(process: Process, count: int, send: Callable[[int], int], correct: set[int],
               workers: int | None = None) -> dict[str, Any]:
    with PeakRss(process) as rss, ThreadPoolExecutor(workers or count) as pool:
        started = time.monotonic()
        statuses = list(pool.map(send, range(count)))
        elapsed = time.monotonic() - started
    return {"requests": count, "correct": sum(s in correct for s in statuses),
            "5xx": sum(s >= 500 for s in statuses), "statuses": sorted(set(statuses)),
            "rss_before_mb": rss.before / 1e6, "rss_peak_mb": rss.peak / 1e6, "seconds": elapsed}


def held_heads(process: Process, count: int) -> dict[str, Any]:
    """``count`` connections each sending half a request head, then ``GET /health`` on a new one."""
    with PeakRss(process) as rss:
        held = []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", process.port), timeout=15)
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                held.append(sock)
            time.sleep(0.2)
            started = time.monotonic()
            status = httpx.get(f"{process.url}/health", timeout=10).status_code
            elapsed = time.monotonic() - started
        finally:
            for sock in held:
                sock.close()
    return {"requests": 1, "correct": int(status == 200), "5xx": int(status >= 500), "statuses": [status],
            "rss_before_mb": rss.before / 1e6, "rss_peak_mb": rss.peak / 1e6, "seconds": elapsed}


def plain_latencies(url: str, count: int) -> list[float]:
    times = []
    with httpx.Client(timeout=600) as client:
        for _ in range(count):
            started = time.monotonic()
            response = client.post(f"{url}/v1/images/generations", json=PLAIN)
            times.append(time.monotonic() - started)
            if response.status_code != 200:
                raise RuntimeError(f"plain request failed: {response.status_code} {response.text}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plain", type=int, default=15, help="plain requests per latency measurement")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-hardening-"))
    origin = ImageOrigin(name="localhost").start()
    serve = Process("serve", work, {
        # 100 connections (default 1024): the idle-sockets row opens more than that from this process.
        "server": {"default_response_format": "url", "max_connections": MAX_CONNECTIONS},
        "fetch": {"allow_hosts": ["localhost"]},
        "storage": {"directory": str(work / "images")},
        "engine": {"cpu_threads": 1},
    })
    rows: dict[str, dict[str, Any]] = {}
    try:
        wait_ready(f"{serve.url}/ready", [serve.proc], 180, serve.log)
        client = httpx.Client(base_url=serve.url, timeout=600)
        plain_latencies(serve.url, 3)  # warm
        idle = plain_latencies(serve.url, args.plain)

        # 1. 40 LoRA downloads that stall after 40 bytes (each its own query string); plain ones meanwhile.
        def lora(i: int) -> int:
            body = {**PLAIN, "image_loras": [{"path": origin.url(f"/stall?lora={i}"), "scale": 0.5}]}
            return client.post("/v1/images/generations", json=body, headers={"authorization": f"Bearer k{i}"}
                               ).status_code

        with ThreadPoolExecutor(1) as side:
            starved = side.submit(lambda: (time.sleep(2.0), plain_latencies(serve.url, args.plain))[1])
            rows["40 stalled LoRA downloads"] = run_attack(serve, 40, lora, {429, 400})
            under_attack = starved.result()
        origin.release()  # (later /stall requests do not stall)
        origin = ImageOrigin(name="localhost").start()

        def image(i: int) -> int:
            body = {**PLAIN, "steps": 2, "image_url": origin.url(f"/stall?img={i}")}  # img2img: 2 steps
            return client.post("/v1/images/generations", json=body, headers={"authorization": f"Bearer i{i}"}
                               ).status_code

        rows["40 stalled image_url downloads"] = run_attack(serve, 40, image, {429, 400})
        origin.release()

        # 2. Palette PNGs with transparency: 6300x6300 (over fetch.max_pixels: refused from the header) and
        # 4096x4096 (decoded, under the memory budget and the decode slots).
        for side, correct in ((6300, {400}), (4096, {200, 429})):
            data = palette_bomb(side)
            url = "data:image/png;base64," + base64.b64encode(data).decode()

            def decode(i: int, url: str = url) -> int:
                body = {**PLAIN, "steps": 2, "image_url": url, "seed": i}  # img2img needs 2 steps
                return client.post("/v1/images/generations", json=body).status_code

            rows[f"12 palette PNGs {side}x{side} ({len(data) / 1000:.1f} KB)"] = run_attack(
                serve, 12, decode, correct)

        # 4. Parsers of client bytes.
        big_int = b'{"prompt": "a fox", "seed": ' + b"9" * 5000 + b"}"
        json_headers = {"content-type": "application/json"}
        rows["JSON integer of 5000 digits"] = run_attack(serve, 50, lambda i: client.post(
            "/v1/images/generations", content=big_int, headers=json_headers).status_code, {400}, 8)
        rows["GET /v1/files ?expires=%C2%B2"] = run_attack(serve, 50, lambda i: client.get(
            f"/v1/files/{'a' * 32}.png?expires=%C2%B2&signature=00").status_code, {400}, 8)

        # 5. The HTTP layer.
        header = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 20) + b"\r\n\r\n"
        rows["64 MB header"] = run_attack(serve, 2, lambda i: raw_exchange(serve.port, header), {431})
        slow = (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{")
        rows["slow body (1 of 1000 bytes)"] = run_attack(serve, 20, lambda i: raw_exchange(serve.port, slow),
                                                         {408})
        clte = (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        rows["Content-Length + Transfer-Encoding"] = run_attack(
            serve, 20, lambda i: raw_exchange(serve.port, clte), {400})
        tls = bytes.fromhex("160301012c010001280303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
        rows["TLS ClientHello on the plain port"] = run_attack(
            serve, 20, lambda i: raw_exchange(serve.port, tls), {400})

        # 6. Request bodies held at once (server.max_inflight_body_bytes): 80 edit uploads of a 64x64 PNG
        # padded to 19 MB, all at once (served: 200; past the budget: 503 server_busy with retry-after).
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 140, 200)).save(buffer, format="PNG")
        padded = buffer.getvalue() + b"\0" * 19_000_000

        def upload(i: int) -> int:
            return client.post("/v1/images/edits", files={"image": ("a.png", padded, "image/png")},
                               data={"prompt": "x", "steps": "2", "size": "64x64",
                                     "response_format": "b64_json"}).status_code

        rows["80 edit uploads of 19 MB at once"] = run_attack(serve, 80, upload, {200, 503})
        # 7. Idle sockets past server.max_connections (slowloris): each holds half a request head; then a
        # probe on a new connection must still be answered (an idle one makes room).
        rows[f"{MAX_CONNECTIONS + 20} sockets holding half a head, then /health"] = held_heads(
            serve, MAX_CONNECTIONS + 20)

        # 10. Host header: a URL answer must not name the client's Host.
        def evil_host(i: int) -> int:
            response = client.post("/v1/images/generations", json={**PLAIN, "response_format": "url"},
                                   headers={"host": "evil.example"})
            clean = response.status_code == 200 and "evil" not in response.json()["data"][0]["url"]
            return 200 if clean else 999

        rows["Host: evil.example (URL answers)"] = run_attack(serve, 10, evil_host, {200}, 4)
        client.close()
    finally:
        stop(serve.proc)
        origin.stop()

    # 11.1 A Redis that accepts and never answers, under `darkroom api`.
    hung = hung_redis(work)
    rows["POST while Redis hangs (darkroom api)"] = hung["row"]

    print(f"{'attack':44} {'requests':>8} {'correct':>8} {'5xx':>4} {'RSS before':>11} {'peak RSS':>9}"
          f"  statuses")
    for name, row in rows.items():
        print(f"{name:44} {row['requests']:8d} {row['correct']:8d} {row['5xx']:4d} "
              f"{row['rss_before_mb']:9.0f}MB {row['rss_peak_mb']:7.0f}MB  {row['statuses']}")
    ratio = statistics.median(under_attack) / statistics.median(idle)
    print(f"\nplain 64x64 request, median of {args.plain}: idle {statistics.median(idle) * 1000:.0f} ms, "
          f"while 40 LoRA downloads stall {statistics.median(under_attack) * 1000:.0f} ms (x{ratio:.2f}); "
          f"max {max(idle) * 1000:.0f} / {max(under_attack) * 1000:.0f} ms")
    print(f"hung Redis: /health median {hung['health_ms']:.1f} ms (max {hung['health_max_ms']:.1f}) while "
          f"POSTs wait; POST answered 503 in {hung['post_s_median']:.2f} s median, "
          f"max {hung['post_s_max']:.2f} s (queue.redis_timeout_s 2)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "idle_s": idle, "under_attack_s": under_attack,
                                         "hung_redis": hung}, indent=2))
    return 0


def hung_redis(work: Path) -> dict[str, Any]:
    silent = SilentRedis()
    api_dir = work / "api"
    api_dir.mkdir()
    api = Process("api", api_dir, {"queue": {"backend": "redis", "redis_url": silent.url},
                                   "storage": {"directory": str(api_dir / "images")}})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{api.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(api.log())
            time.sleep(0.1)
        health: list[float] = []
        durations: list[float] = []
        stop_probe = threading.Event()

        def probe() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop_probe.is_set():
                    started = time.monotonic()
                    c.get(f"{api.url}/health")
                    health.append(time.monotonic() - started)
                    time.sleep(0.05)

        def post(i: int) -> int:
            started = time.monotonic()
            status = httpx.post(f"{api.url}/v1/images/generations", json=PLAIN, timeout=120).status_code
            durations.append(time.monotonic() - started)
            return status

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        row = run_attack(api, 20, post, {503}, 10)
        stop_probe.set()
        prober.join()
    finally:
        stop(api.proc)
        silent.close()
    return {"row": row, "health_ms": statistics.median(health) * 1000, "health_max_ms": max(health) * 1000,
            "post_s_median": statistics.median(durations), "post_s_max": max(durations)}


if __name__ == "__main__":
    sys.exit(main())
