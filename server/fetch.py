"""The one guarded way to fetch a URL that a request names (``image_url``, ``reference_images``, ...).

A URL from a client must not become a way into the operator's network (SSRF), nor a way to exhaust
the server. So, for every fetch:

- the scheme must be on the allow-list (``https``, ``http``, ``data`` by default);
- the host is resolved once and *every* address it resolves to is checked against loopback, private,
  link-local, multicast, reserved and unspecified ranges, IPv4 and IPv6 (IPv4-mapped, 6to4, NAT64 and
  Teredo addresses are checked by the IPv4 address they carry); the connection then goes to a checked
  address, never through a second lookup (the URL's host is replaced by the address; ``Host`` and, for
  https, the TLS server name and certificate check keep the real name);
- redirects are followed by hand, each hop checked the same way, at most ``max_redirects``;
- the body is streamed and cut at ``max_bytes``; the whole fetch has one deadline (``timeout_s``);
  compressed transfer encodings are refused (no decompression bombs on the wire); at most
  ``max_concurrent`` fetches run at once;
- images are recognised from their bytes (never from headers), their pixel count is checked from the
  header before any pixel is decoded, EXIF orientation is applied and the result is plain RGB
  (CMYK, palette, alpha and animated images included: the first frame).

Operators may exempt hosts (``allow_hosts``) and networks (``allow_cidrs``). Decoded images are kept
in a small LRU keyed by URL, so n images, a batch, or a retry do not fetch again. Every failure is an
``InvalidRequest`` (400) naming the request field.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import logging
import socket
import ssl
import struct
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Union

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from . import metrics
from .config import FetchSettings
from .errors import DarkroomError, InvalidRequest

log = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# Formats a client may send; decoders for anything else (TIFF, PSD, EPS, ...) are never reached.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # JPEG covers MPO (phone photos)
REDIRECTS = (301, 302, 303, 307, 308)
MAX_URL_CHARS = 8192
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_USER_AGENT = "Darkroom-fetch/1"


class FetchError(InvalidRequest):
    """A URL that cannot be used: refused, unreachable, too big, or not an image."""

    code = "invalid_image_url"


class FetchBusy(DarkroomError):
    status = 429
    type = "rate_limit_error"
    code = "fetch_busy"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64, Teredo client), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why an address must not be fetched from (``None``: a public address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # the socket talks IPv4 to the mapped address
            return blocked_reason(ip.ipv4_mapped)
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = blocked_reason(inner)
            if reason:
                return reason
    for attr, name in (
        ("is_loopback", "loopback"),
        ("is_unspecified", "unspecified"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(ip, attr):
            return name
    if not ip.is_global:  # shared address space (100.64/10), documentation ranges, ...
        return "non-public"
    return None


class _ImageCache:
    """A thread-safe LRU of decoded images, bounded by entries, bytes and age."""

    def __init__(self, entries: int, max_bytes: int, ttl_s: float) -> None:
        self.entries, self.max_bytes, self.ttl_s = entries, max_bytes, ttl_s
        self._items: OrderedDict[str, tuple[Image.Image, int, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Image.Image | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[2] < time.monotonic():
                if item is not None:
                    self._drop(key)
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, image: Image.Image) -> None:
        size = image.width * image.height * len(image.getbands())
        if self.entries <= 0 or size > self.max_bytes // 4:
            return
        with self._lock:
            if key in self._items:
                self._drop(key)
            self._items[key] = (image, size, time.monotonic() + self.ttl_s)
            self._bytes += size
            while len(self._items) > self.entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        _, size, _ = self._items.pop(key)
        self._bytes -= size

    def __len__(self) -> int:
        return len(self._items)


def decode_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Bytes → an RGB image, refusing non-images, unknown formats, bombs and corrupt files."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise FetchError(f"'{field}' is too large an image; at most {max_pixels} pixels are accepted",
                         param=field, code="invalid_image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise FetchError(
            f"'{field}' is not an image in a supported format ({', '.join(IMAGE_FORMATS)})",
            param=field, code="invalid_image",
        ) from None
    width, height = image.size
    # From the header alone: nothing has been decoded yet.
    if width < 1 or height < 1 or width * height > max_pixels:
        image.close()
        raise FetchError(
            f"'{field}' is {width}x{height} pixels; at most {max_pixels} pixels are accepted",
            param=field, code="invalid_image",
        )
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)  # animated GIF/WebP/PNG: the first frame
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return _to_rgb(image)
    except Image.DecompressionBombError:
        raise FetchError(f"'{field}' is too large an image; at most {max_pixels} pixels are accepted",
                         param=field, code="invalid_image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, ZeroDivisionError):
        raise FetchError(
            f"'{field}' could not be decoded: the image is truncated or corrupt",
            param=field, code="invalid_image",
        ) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode → RGB; transparency is composited over white."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        image.mode in ("RGB", "L") and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB") if image.mode != "RGB" else image


def _b64decode(data: bytes) -> bytes:
    """Strict base64 (no stray characters); fast on 3.11+, where binascii has a strict mode."""
    if sys.version_info >= (3, 11):
        return binascii.a2b_base64(data, strict_mode=True)
    return base64.b64decode(data, validate=True)


def parse_data_url(url: str, field: str, max_bytes: int) -> bytes:
    """``data:image/<type>;base64,<payload>`` → the bytes it carries."""
    head, comma, payload = url.partition(",")
    if not comma or not head[:5].lower() == "data:":
        raise FetchError(f"'{field}' is a malformed data URL (expected data:image/...;base64,...)",
                         param=field)
    parts = [p.strip().lower() for p in head[5:].split(";")]
    if not parts[0].startswith("image/") or "base64" not in parts[1:]:
        raise FetchError(
            f"'{field}' must be a base64 image data URL (data:image/png;base64,...)", param=field
        )
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise FetchError(f"'{field}' is larger than {max_bytes} bytes", param=field)
    for attempt in (payload, "".join(payload.split())):  # as sent, then without line breaks
        try:
            return _b64decode(attempt.encode("ascii"))
        except (binascii.Error, ValueError):
            continue
    raise FetchError(f"'{field}' is a malformed data URL: invalid base64", param=field)


class Fetcher:
    """Fetches URLs under the limits of one ``FetchSettings``; safe to share between threads."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self._allow_hosts = {h.lower().rstrip(".") for h in settings.allow_hosts}
        self._allow_nets = [ipaddress.ip_network(c, strict=False) for c in settings.allow_cidrs]
        self._slots = threading.BoundedSemaphore(max(1, settings.max_concurrent))
        self._dns = ThreadPoolExecutor(max_workers=max(1, settings.max_concurrent),
                                       thread_name_prefix="fetch-dns")
        self._cache = _ImageCache(settings.cache_entries, settings.cache_bytes, settings.cache_ttl_s)
        self._inflight: dict[str, Future[Image.Image]] = {}
        self._lock = threading.Lock()
        # No connection reuse: a pooled connection to one address must never serve another host name.
        self._client = httpx.Client(
            verify=ssl.create_default_context(),
            trust_env=False,  # a proxy would resolve the name again, unchecked
            follow_redirects=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    @property
    def cache(self) -> _ImageCache:
        return self._cache

    def close(self) -> None:
        self._client.close()
        self._dns.shutdown(wait=False, cancel_futures=True)

    # -- images ---------------------------------------------------------------------------------

    def fetch_image(self, url: str, field: str) -> Image.Image:
        """The RGB image at ``url`` (cached by URL). The result is shared: do not modify it."""
        scheme = self._scheme(url, field)
        if scheme == "data":
            data = parse_data_url(url, field, self.settings.max_bytes)
            return decode_image(data, field, self.settings.max_pixels)
        with self._lock:
            # Checked under the lock: a finished download is cached before it leaves ``_inflight``.
            cached = self._cache.get(url)
            if cached is not None:
                return cached
            waiting = self._inflight.get(url)
            if waiting is None:
                mine: Future[Image.Image] = Future()
                self._inflight[url] = mine
        if waiting is not None:  # the same URL is being fetched for another request: share it
            try:
                return waiting.result(timeout=self.settings.timeout_s + 5)
            except FetchError as exc:
                message = exc.message.replace(f"'{exc.param}'", f"'{field}'", 1)
                raise FetchError(message, param=field, code=exc.code) from None
            except FutureTimeout:
                raise FetchError(f"'{field}' timed out", param=field) from None
        try:
            image = decode_image(self.fetch_bytes(url, field), field, self.settings.max_pixels)
            self._cache.put(url, image)
            mine.set_result(image)
            return image
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(url, None)

    # -- bytes ----------------------------------------------------------------------------------

    def fetch_bytes(self, url: str, field: str, max_bytes: int | None = None) -> bytes:
        """The body at an http(s) or data URL, with every guard applied; no caching."""
        limit = max_bytes or self.settings.max_bytes
        if self._scheme(url, field) == "data":
            return parse_data_url(url, field, limit)
        deadline = time.monotonic() + self.settings.timeout_s
        if not self._slots.acquire(timeout=self.settings.timeout_s):
            metrics.FETCH_FAILURES.labels(field=field, code=FetchBusy.code).inc()
            raise FetchBusy("too many image downloads in progress; retry shortly", param=field,
                            headers={"Retry-After": "1"})
        try:
            return self._download(url, field, limit, deadline)
        except FetchError as exc:
            log.info("fetch refused field=%s code=%s reason=%s", field, exc.code, exc.message)
            metrics.FETCH_FAILURES.labels(field=field, code=str(exc.code)).inc()
            raise
        finally:
            self._slots.release()

    def _scheme(self, url: str, field: str) -> str:
        if not isinstance(url, str) or not url:
            raise FetchError(f"'{field}' must be a URL", param=field)
        scheme, sep, _ = url.partition(":")
        scheme = scheme.lower()
        if not sep or scheme not in self.settings.allowed_schemes:
            allowed = ", ".join(f"{s}:" for s in self.settings.allowed_schemes)
            raise FetchError(f"'{field}' must use one of the schemes {allowed}", param=field,
                             code="url_not_allowed")
        if scheme != "data" and len(url) > MAX_URL_CHARS:
            raise FetchError(f"'{field}' is longer than {MAX_URL_CHARS} characters", param=field)
        return scheme

    def _download(self, url: str, field: str, limit: int, deadline: float) -> bytes:
        current = url
        for _hop in range(self.settings.max_redirects + 1):
            try:
                target = httpx.URL(current)
            except (httpx.InvalidURL, ValueError):
                raise FetchError(f"'{field}' is not a valid URL", param=field) from None
            scheme = target.scheme
            if scheme not in ("http", "https") or scheme not in self.settings.allowed_schemes:
                raise FetchError(f"'{field}' redirected to a URL with a refused scheme", param=field,
                                 code="url_not_allowed")
            if current is not url and scheme == "http" and httpx.URL(url).scheme == "https":
                raise FetchError(f"'{field}' redirected from https to http; refused", param=field,
                                 code="url_not_allowed")
            host = target.raw_host.decode("ascii")  # IDNA-encoded, as DNS and Host want it
            if not host:
                raise FetchError(f"'{field}' has no host", param=field)
            port = target.port or (443 if scheme == "https" else 80)
            addresses = self._checked_addresses(host, port, field, deadline)
            response = self._open(target, host, addresses, field, deadline)
            try:
                if response.status_code in REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError(f"'{field}': the origin sent a redirect without a location",
                                         param=field)
                    try:
                        current = str(target.join(location))
                    except (httpx.InvalidURL, ValueError):
                        raise FetchError(f"'{field}' redirected to an invalid URL", param=field) from None
                    continue
                if response.status_code != 200:
                    raise FetchError(
                        f"'{field}' could not be fetched: the origin answered HTTP {response.status_code}",
                        param=field, code="fetch_failed",
                    )
                return self._read_body(response, field, limit, deadline)
            finally:
                response.close()
        raise FetchError(f"'{field}' redirected more than {self.settings.max_redirects} times",
                         param=field, code="fetch_failed")

    def _checked_addresses(self, host: str, port: int, field: str, deadline: float) -> list[IPAddress]:
        name = host.lower().rstrip(".")
        try:
            literal: IPAddress | None = ipaddress.ip_address(name.strip("[]").split("%")[0])
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            addresses = self._resolve(name, port, field, deadline)
        if name in self._allow_hosts:
            return addresses
        for ip in addresses:
            if any(ip in net for net in self._allow_nets):
                continue
            reason = blocked_reason(ip)
            if reason:
                shown = str(ip) if literal is not None else f"host '{host}'"
                what = "is" if literal is not None else "resolves to"
                raise FetchError(
                    f"'{field}' is refused: {shown} {what} a {reason} address; "
                    "only public addresses may be fetched",
                    param=field, code="url_not_allowed",
                )
        return addresses

    def _resolve(self, name: str, port: int, field: str, deadline: float) -> list[IPAddress]:
        pending = self._dns.submit(socket.getaddrinfo, name, port, 0, socket.SOCK_STREAM)
        try:
            infos = pending.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise FetchError(f"'{field}' timed out resolving host '{name}'", param=field,
                             code="fetch_failed") from None
        except (OSError, UnicodeError):
            raise FetchError(f"'{field}' could not be fetched: host '{name}' does not resolve",
                             param=field, code="fetch_failed") from None
        addresses: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise FetchError(f"'{field}' could not be fetched: host '{name}' does not resolve",
                             param=field, code="fetch_failed")
        return addresses

    def _open(self, target: httpx.URL, host: str, addresses: list[IPAddress], field: str,
              deadline: float) -> httpx.Response:
        host_header = host if target.port is None else f"{host}:{target.port}"
        if ":" in host and target.port is None:
            host_header = f"[{host}]"
        elif ":" in host:
            host_header = f"[{host}]:{target.port}"
        headers = {"Host": host_header, "Accept": "image/*", "Accept-Encoding": "identity",
                   "User-Agent": _USER_AGENT}
        extensions = {"sni_hostname": host} if target.scheme == "https" else {}
        last_error: Exception | None = None
        for ip in addresses:  # every one of them was checked; try them in order
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            request = self._client.build_request(
                "GET", target.copy_with(host=str(ip)), headers=headers, extensions=extensions,
                timeout=httpx.Timeout(remaining),
            )
            try:
                return self._client.send(request, stream=True)
            except httpx.ConnectError as exc:
                last_error = exc
                continue
            except httpx.TimeoutException:
                raise self._timed_out(field) from None
            except httpx.HTTPError as exc:
                raise FetchError(f"'{field}' could not be fetched: {type(exc).__name__}",
                                 param=field, code="fetch_failed") from None
        if last_error is None:
            raise self._timed_out(field)
        raise FetchError(f"'{field}' could not be fetched: cannot connect to host '{host}'",
                         param=field, code="fetch_failed")

    def _timed_out(self, field: str) -> FetchError:
        return FetchError(f"'{field}' timed out after {self.settings.timeout_s:g} s", param=field,
                          code="fetch_failed")

    def _read_body(self, response: httpx.Response, field: str, limit: int, deadline: float) -> bytes:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchError(f"'{field}': the origin sent a {encoding}-encoded body; refused",
                             param=field, code="fetch_failed")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise FetchError(f"'{field}' is larger than {limit} bytes", param=field,
                             code="fetch_failed")
        body = bytearray()
        try:
            for chunk in response.iter_raw():  # as it arrives, so the deadline is checked often
                body += chunk
                if len(body) > limit:
                    raise FetchError(f"'{field}' is larger than {limit} bytes", param=field,
                                     code="fetch_failed")
                if time.monotonic() > deadline:
                    raise self._timed_out(field)
        except httpx.TimeoutException:
            raise self._timed_out(field) from None
        except httpx.HTTPError as exc:
            raise FetchError(f"'{field}' could not be fetched: {type(exc).__name__} while reading",
                             param=field, code="fetch_failed") from None
        return bytes(body)
