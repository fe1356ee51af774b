"""The one guarded way to fetch a URL that a request names (``image_url``, ``reference_images``, ...).

A URL from a client must not become a way into the operator's network (SSRF), nor a way to exhaust
the server. So, for every fetch:

- the scheme must be on the allow-list (``https``, ``http``, ``data`` by default);
- the host is resolved once and *every* address it resolves to must be public (server/addresses.py); the
  connection then goes to a checked address, never through a second lookup (the URL's host is replaced
  by the address; ``Host`` and, for https, the TLS server name and certificate check keep the real name);
- redirects are followed by hand, each hop checked the same way, at most ``max_redirects``;
- the body is streamed and cut at ``max_bytes``; the whole fetch has one deadline (``timeout_s``), the
  origin may fall silent for at most ``read_timeout_s`` at a time and must keep ``min_bytes_per_s`` on
  average after ``rate_grace_s``; compressed transfer encodings are refused (no decompression bombs on the
  wire); at most ``max_concurrent`` fetches run at once, and a fetch waits at most ``slot_wait_s`` for a
  slot (then 429 ``fetch_busy``);
- images are recognised from their bytes (never from headers), their pixel count and the memory their
  decoding takes are checked from the header before any pixel is decoded, at most
  ``max_concurrent_decodes`` decode at once (``data:`` URLs too), EXIF orientation is applied and the
  result is plain RGB (server/images.py ``decode_image``).

Operators may exempt hosts (``allow_hosts``) and networks (``allow_cidrs``). Decoded images are kept
in a small LRU keyed by URL, so n images, a batch, or a retry do not fetch again, and concurrent requests
for one URL share one download. Every failure is an ``InvalidRequest`` (400) naming the request field.

Both processes use it: the API for request images, the LoRA store (server/loras.py) for LoRA files.
"""

from __future__ import annotations

import base64
import binascii
import logging
import ssl
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout

import httpx
from PIL import Image

from . import metrics
from .addresses import AddressGuard, IPAddress
from .config import FetchSettings
from .errors import DarkroomError, FetchError
from .images import decode_image, stored_bytes
from .single_flight import SingleFlight

log = logging.getLogger(__name__)

REDIRECTS = (301, 302, 303, 307, 308)
MAX_URL_CHARS = 8192
_USER_AGENT = "Darkroom-fetch/1"


def declared_length(headers: Mapping[str, str]) -> int | None:
    """An HTTP message's ``Content-Length`` in bytes (a request's to the API, a response's to the fetcher);
    None when it has none (chunked) or it is not plain decimal digits. More than 18 digits reads as 10**18,
    above any limit here (and ``int`` of a huge string is not free)."""
    declared = headers.get("content-length", "")
    if not (declared.isascii() and declared.isdigit()):
        return None
    return int(declared) if len(declared) <= 18 else 10**18


class FetchBusy(DarkroomError):
    status = 429
    type = "rate_limit_error"
    code = "fetch_busy"


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
        size = stored_bytes(image.mode, image.width, image.height)
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
        self._addresses = AddressGuard(settings)
        self._slots = threading.BoundedSemaphore(max(1, settings.max_concurrent))
        self._decodes = threading.BoundedSemaphore(max(1, settings.max_concurrent_decodes))
        self._cache = _ImageCache(settings.cache_entries, settings.cache_bytes, settings.cache_ttl_s)
        self._flights: SingleFlight[str, Image.Image] = SingleFlight()
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
        self._addresses.close()

    # -- images ---------------------------------------------------------------------------------

    def fetch_image(self, url: str, field: str) -> Image.Image:
        """The RGB image at ``url`` (cached by URL). The result is shared: do not modify it."""
        scheme = self._scheme(url, field)
        if scheme == "data":
            return self.decode(parse_data_url(url, field, self.settings.max_bytes), field)

        def download() -> Image.Image:
            image = self.decode(self.fetch_bytes(url, field), field)
            self._cache.put(url, image)  # before it leaves the in-flight table: no second download
            return image

        try:
            # The same URL being fetched for another request at this moment: share that download.
            return self._flights.run(url, download, self.settings.timeout_s + 5,
                                     cached=lambda: self._cache.get(url))
        except FetchError as exc:
            if exc.param == field:
                raise
            message = exc.message.replace(f"'{exc.param}'", f"'{field}'", 1)  # another request's field
            raise FetchError(message, param=field, code=exc.code) from None
        except FutureTimeout:
            raise FetchError(f"'{field}' timed out", param=field) from None

    def decode(self, data: bytes, field: str) -> Image.Image:
        """Image bytes from a client → RGB, under the decode limits (``max_pixels``, ``max_decode_bytes``)
        and in one of ``max_concurrent_decodes`` slots (429 ``fetch_busy`` when none frees within
        ``timeout_s``)."""
        if not self._decodes.acquire(timeout=self.settings.timeout_s):
            metrics.FETCH_FAILURES.labels(field=field, code=FetchBusy.code).inc()
            raise FetchBusy("too many images being decoded; retry shortly", param=field,
                            headers={"Retry-After": "1"})
        try:
            return decode_image(data, field, self.settings.max_pixels, self.settings.max_decode_bytes)
        finally:
            self._decodes.release()

    # -- bytes ----------------------------------------------------------------------------------

    def fetch_bytes(self, url: str, field: str, max_bytes: int | None = None) -> bytes:
        """The body at an http(s) or data URL, with every guard applied; no caching."""
        limit = max_bytes or self.settings.max_bytes
        if self._scheme(url, field) == "data":
            return parse_data_url(url, field, limit)
        body = bytearray()
        self._fetch(url, field, limit, body.extend)
        return bytes(body)

    def fetch_to(self, url: str, field: str, max_bytes: int, sink: Callable[[bytes], None]) -> int:
        """Stream the body at an http(s) or data URL into ``sink``, chunk by chunk as it arrives, with every
        guard applied; returns its length in bytes. Whatever ``sink`` raises ends the download and is raised
        as it is (a sink may check what it has been given so far and refuse the rest)."""
        if self._scheme(url, field) == "data":
            data = parse_data_url(url, field, max_bytes)
            sink(data)
            return len(data)
        return self._fetch(url, field, max_bytes, sink)

    def _fetch(self, url: str, field: str, limit: int, sink: Callable[[bytes], None]) -> int:
        deadline = time.monotonic() + self.settings.timeout_s
        if not self._slots.acquire(timeout=min(self.settings.slot_wait_s, self.settings.timeout_s)):
            metrics.FETCH_FAILURES.labels(field=field, code=FetchBusy.code).inc()
            raise FetchBusy("too many image downloads in progress; retry shortly", param=field,
                            headers={"Retry-After": "1"})
        try:
            return self._download(url, field, limit, deadline, sink)
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

    def _download(self, url: str, field: str, limit: int, deadline: float,
                  sink: Callable[[bytes], None]) -> int:
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
            addresses = self._addresses.checked_addresses(host, port, field, deadline)
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
                return self._read_body(response, field, limit, deadline, sink)
            finally:
                response.close()
        raise FetchError(f"'{field}' redirected more than {self.settings.max_redirects} times",
                         param=field, code="fetch_failed")

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
            idle = min(remaining, self.settings.read_timeout_s)  # silence allowed while connecting/reading
            request = self._client.build_request(
                "GET", target.copy_with(host=str(ip)), headers=headers, extensions=extensions,
                timeout=httpx.Timeout(idle, pool=remaining),
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
        limits = f"{self.settings.timeout_s:g} s in all, {self.settings.read_timeout_s:g} s of silence"
        return FetchError(f"'{field}' timed out (at most {limits})", param=field, code="fetch_failed")

    def _too_slow(self, field: str, received: int, elapsed: float) -> FetchError:
        return FetchError(
            f"'{field}' arrived too slowly ({received} bytes in {elapsed:.1f} s; at least "
            f"{self.settings.min_bytes_per_s} bytes/s are required)", param=field, code="fetch_failed")

    def _read_body(self, response: httpx.Response, field: str, limit: int, deadline: float,
                   sink: Callable[[bytes], None]) -> int:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchError(f"'{field}': the origin sent a {encoding}-encoded body; refused",
                             param=field, code="fetch_failed")
        declared = declared_length(response.headers)
        if declared is not None and declared > limit:
            raise FetchError(f"'{field}' is larger than {limit} bytes", param=field,
                             code="fetch_failed")
        received = 0
        started = time.monotonic()
        min_rate, grace = self.settings.min_bytes_per_s, self.settings.rate_grace_s
        try:
            # As it arrives, so the deadline and the rate are checked often; a silent origin is cut by the
            # read timeout (read_timeout_s).
            for chunk in response.iter_raw():
                received += len(chunk)
                if received > limit:
                    raise FetchError(f"'{field}' is larger than {limit} bytes", param=field,
                                     code="fetch_failed")
                now = time.monotonic()
                if now > deadline:
                    raise self._timed_out(field)
                if min_rate and now - started > grace and received < min_rate * (now - started):
                    raise self._too_slow(field, received, now - started)
                sink(chunk)
        except httpx.TimeoutException:
            raise self._timed_out(field) from None
        except httpx.HTTPError as exc:
            raise FetchError(f"'{field}' could not be fetched: {type(exc).__name__} while reading",
                             param=field, code="fetch_failed") from None
        return received
