"""A small threaded HTTP server on a loopback address that serves good and hostile images.

Tests point ``image_url`` / ``reference_images`` (and the fetcher itself) at it. Paths:

  /red.png /blue.png /gradient.png /checker.jpg     good images (fixed, distinct content)
  /cmyk.jpg /anim.gif /rotated.jpg /palette.png /rgba.png /gray16.png
  /404                                              HTTP 404
  /slow                                             waits ``slow_s`` before answering
  /pause                                            waits 0.1 s, then serves a good PNG (``peak`` counts overlap)
  /drip                                             sends a valid header, then one byte every 0.2 s
  /stall?s=S                                        headers and the first 40 bytes of a good PNG, then
                                                    silence for S seconds (none: until ``release()``),
                                                    then the rest; ``stalled`` counts those in silence;
                                                    with ``lora=1``: a small valid LoRA file's header and
                                                    first bytes, then the silence (a LoRA download checks
                                                    the header before it waits for the body)
  /huge /huge-declared                              more bytes than the test cap (chunked / Content-Length)
  /bomb.png                                         a tiny PNG whose header declares 50000x50000
  /truncated.jpg /not-image.png                     half a JPEG / HTML served as image/png
  /gzip.png                                         a PNG sent with Content-Encoding: gzip
  /redirect?to=URL                                  302 to URL;  /loop: redirects to itself
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image

HUGE_BYTES = 3_000_000


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient(width: int = 96, height: int = 64) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 80, np.float32)], axis=2)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def checker(width: int = 64, height: int = 64, cell: int = 8) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    on = ((yy // cell + xx // cell) % 2).astype(bool)
    arr = np.where(on[..., None], np.array([250, 240, 30], np.uint8), np.array([20, 30, 200], np.uint8))
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose IHDR claims ``width`` x ``height``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def palette_bomb(side: int) -> bytes:
    """A palette PNG with transparency of a few KB that decodes to ``side`` x ``side`` pixels (on its way to
    RGB, the old decoder made several full-size RGBA copies of it)."""
    image = Image.new("P", (side, side), 0)
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * (254 * 3))
    image.paste(1, (side // 4, side // 4, side // 2, side // 2))
    return _encode(image, "PNG", transparency=0)


def rotated_jpeg() -> bytes:
    """A 64x32 JPEG (left half red, right half blue) with EXIF orientation 6 (display rotated 90° CW)."""
    image = Image.new("RGB", (64, 32), (220, 20, 20))
    image.paste((20, 20, 220), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(image, "JPEG", quality=95, exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (48, 48), (230, 30, 30)), Image.new("RGB", (48, 48), (30, 30, 230))]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_png() -> bytes:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * (254 * 3))
    image.paste(1, (10, 10, 30, 30))
    return _encode(image, "PNG", transparency=0)


def rgba_png() -> bytes:
    image = Image.new("RGBA", (40, 40), (0, 0, 255, 0))  # fully transparent blue → white
    image.paste((255, 0, 0, 255), (0, 0, 20, 40))
    return _encode(image, "PNG")


def lora_file() -> bytes:
    """A valid safetensors LoRA file of zeros (one rank-4 layer of the tiny FLUX), written without torch."""
    header = json.dumps({
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight":
            {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]},
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight":
            {"dtype": "F32", "shape": [32, 4], "data_offsets": [512, 1024]},
    }).encode()
    return len(header).to_bytes(8, "little") + header + bytes(1024)


def build_files() -> dict[str, tuple[bytes, str]]:
    files = {
        "/red.png": (_encode(Image.new("RGB", (64, 64), (230, 20, 20)), "PNG"), "image/png"),
        "/blue.png": (_encode(Image.new("RGB", (64, 64), (20, 20, 230)), "PNG"), "image/png"),
        "/gradient.png": (_encode(gradient(), "PNG"), "image/png"),
        "/checker.jpg": (_encode(checker(), "JPEG", quality=95), "image/jpeg"),
        "/cmyk.jpg": (_encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), "image/jpeg"),
        "/anim.gif": (animated_gif(), "image/gif"),
        "/rotated.jpg": (rotated_jpeg(), "image/jpeg"),
        "/palette.png": (palette_png(), "image/png"),
        "/rgba.png": (rgba_png(), "image/png"),
        "/gray16.png": (_encode(Image.new("I;16", (16, 16), 40000), "PNG"), "image/png"),
        "/bomb.png": (png_bomb(), "image/png"),
        "/not-image.png": (b"<html><body>not an image</body></html>", "image/png"),
        # Served with a misleading type: content is sniffed, so this still decodes.
        "/mislabelled": (_encode(Image.new("RGB", (16, 16), (0, 200, 0)), "PNG"), "text/plain"),
    }
    whole = _encode(checker(128, 128), "JPEG", quality=95)
    files["/truncated.jpg"] = (whole[: len(whole) // 2], "image/jpeg")
    return files


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class ImageOrigin:
    """``with ImageOrigin() as origin: origin.url("/red.png")``; counts requests per path."""

    def __init__(self, host: str = "127.0.0.1", slow_s: float = 5.0, name: str | None = None) -> None:
        self.files = build_files()
        self.slow_s = slow_s
        self.hits: dict[str, int] = {}
        self.active = 0
        self.peak = 0  # most /pause requests inside their pause at once
        self.stalled = 0  # /stall requests in their silence now
        self._released = threading.Event()
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                parsed = urlparse(self.path)
                with origin._lock:
                    origin.hits[parsed.path] = origin.hits.get(parsed.path, 0) + 1
                origin._handle(self, parsed.path, parse_qs(parsed.query))

        self._httpd = _QuietServer((host, 0), Handler)
        self.host = host
        self.port = self._httpd.server_address[1]
        self.name = name or host
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://{self.name}:{self.port}{path}"

    def start(self) -> ImageOrigin:
        self._thread.start()
        return self

    def release(self) -> None:
        """End the silence of every /stall request (now and later)."""
        self._released.set()

    def stop(self) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ImageOrigin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str = "image/png",
              extra: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(body)

    def _handle(self, h: BaseHTTPRequestHandler, path: str, query: dict[str, list[str]]) -> None:
        try:
            if path in self.files:
                body, ctype = self.files[path]
                self._send(h, 200, body, ctype)
            elif path == "/redirect":
                h.send_response(302)
                h.send_header("Location", query["to"][0])
                h.send_header("Content-Length", "0")
                h.end_headers()
            elif path == "/loop":
                h.send_response(302)
                h.send_header("Location", "/loop")
                h.send_header("Content-Length", "0")
                h.end_headers()
            elif path == "/slow":
                time.sleep(self.slow_s)
                self._send(h, 200, self.files["/red.png"][0])
            elif path == "/pause":
                # Counted only while paused, before any byte is sent: a client cannot have finished
                # this download yet, so two requests paused at once are two downloads at once.
                with self._lock:
                    self.active += 1
                    self.peak = max(self.peak, self.active)
                time.sleep(0.1)
                with self._lock:
                    self.active -= 1
                self._send(h, 200, self.files["/red.png"][0])
            elif path == "/drip":
                body = self.files["/red.png"][0]
                h.send_response(200)
                h.send_header("Content-Type", "image/png")
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                for i in range(len(body)):
                    h.wfile.write(body[i : i + 1])
                    h.wfile.flush()
                    time.sleep(0.2)
            elif path == "/stall":
                body = lora_file() if "lora" in query else self.files["/red.png"][0]
                h.send_response(200)
                h.send_header("Content-Type", "image/png")
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body[: len(body) - 200 if "lora" in query else 40])
                h.wfile.flush()
                with self._lock:
                    self.stalled += 1
                try:
                    self._released.wait(float(query["s"][0]) if "s" in query else 120.0)
                finally:
                    with self._lock:
                        self.stalled -= 1
                h.wfile.write(body[40:])
            elif path == "/huge-declared":
                h.send_response(200)
                h.send_header("Content-Type", "image/png")
                h.send_header("Content-Length", str(HUGE_BYTES))
                h.end_headers()
                for _ in range(HUGE_BYTES // 65536 + 1):
                    h.wfile.write(b"\0" * 65536)
            elif path == "/huge":
                h.send_response(200)
                h.send_header("Content-Type", "image/png")
                h.send_header("Transfer-Encoding", "chunked")
                h.end_headers()
                block = b"\0" * 65536
                for _ in range(HUGE_BYTES // 65536 + 1):
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                h.wfile.write(b"0\r\n\r\n")
            elif path == "/gzip.png":
                self._send(h, 200, gzip.compress(self.files["/red.png"][0]), "image/png",
                           {"Content-Encoding": "gzip"})
            else:
                self._send(h, 404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the fetcher hung up on purpose (size cap, deadline)
