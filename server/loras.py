"""``image_loras`` files: where a LoRA path points, and the disk cache LoRA files are fetched into.

Both processes use the store, and nothing here needs torch: with ``loras.prefetch`` the API downloads and
checks a request's LoRAs before the job is queued (after validating their form cheaply, server/api/loras.py);
the worker's engine uses the same store to fetch what it does not have on its disk yet (a worker on another
host fetches every LoRA itself from its path), then loads it (server/engine/adapters.py).

A path is one of:

- a name the operator registered in ``loras.registered`` (a local ``.safetensors`` file);
- a Hugging Face repo URL, ``https://huggingface.co/owner/repo`` (optionally ``/tree/REV``): the repo's
  file list comes from the Hub API and its LoRA ``.safetensors`` file is picked;
- a Hub file URL, ``.../owner/repo/resolve/REV/FILE`` (``/blob/`` is read as ``/resolve/``);
- any other http(s) URL of a ``.safetensors`` file.

Every download goes through the guarded fetcher (``server/fetch.py``) with the operator's fetch
allow-lists, the LoRA size cap and the LoRA download deadline, streamed to a temporary file in the cache
folder: the 8-byte header length and the header (every tensor name classified, server/lora_format.py) are
checked before any of the body is written, and the file is never held in memory. Files land in a disk cache
keyed by the request's path, with a byte cap and least-recently-used eviction (the file's mtime is its last
use, so the order survives restarts); concurrent requests for the same uncached LoRA download it once, and
a file in use is never evicted, by this process or another sharing the folder.

Errors: ``LoraError`` (400) when the file or path is at fault; ``LoraUnavailable`` (503) when another
request's fetch of it is still running after the longest a fetch may take; ``LoraStoreFailure`` (500) when
this server's disk or configuration is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from urllib.parse import quote

from . import metrics
from .config import FetchSettings, LoraSettings, Settings
from .errors import DarkroomError, InternalError, InvalidRequest
from .fetch import Fetcher, FetchError
from .filelock import locked
from .lora_format import Loader, StreamCheck, read_header
from .lora_sources import Source, parse_source, pick_lora_file
from .params import LoraRef
from .safetensors_header import FormatError, Limits, check_finite
from .single_flight import SingleFlight

log = logging.getLogger(__name__)

FIELD = "image_loras"
_MAX_LISTING_BYTES = 10_000_000


class LoraError(InvalidRequest):
    """A LoRA a request names cannot be used (the request's fault: 400): the message names its path."""

    code = "invalid_lora"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, param=FIELD, code=code)


class LoraUnavailable(DarkroomError):
    """A LoRA is still being fetched by another request or process after the longest a fetch may take:
    503 with ``Retry-After``, not the file's fault."""

    status = 503
    type = "service_unavailable"
    code = "lora_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, param=FIELD, headers={"Retry-After": "5"})


class LoraStoreFailure(InternalError):
    """The server failed to keep or find a LoRA file (disk full, a registered file missing): 500, logged."""

    code = "lora_store_failed"


def lora_summary(refs: Sequence[LoraRef]) -> list[str]:
    """``image_loras`` as logs show them: ``path@scale`` each, without a URL's query string (signed URLs
    carry credentials there) and cut to 120 characters."""
    out = []
    for ref in refs:
        path = ref.path.split("?", 1)[0].split("#", 1)[0]
        path = path if len(path) <= 120 else path[:117] + "..."
        out.append(f"{path}@{ref.scale:g}")
    return out


def format_error(path: str, exc: FormatError) -> LoraError:
    """A ``FormatError`` about a file (server/lora_format.py) as the 400 naming the LoRA's path."""
    return LoraError(f"LoRA '{shown_path(path)}' {exc.message}", code=exc.code)


def shown_path(path: str) -> str:
    """A LoRA path as messages and logs show it (cut at 200 characters)."""
    return path if len(path) <= 200 else path[:197] + "..."


# -- the store --------------------------------------------------------------------------------------


class LoraStore:
    """Resolves paths and keeps downloaded LoRA files on disk. Safe to share between threads, and between
    processes that share the cache folder (file locks, below); callable from any thread beside a device loop.

    Files in ``directory``, per LoRA path (``key``): ``KEY.safetensors`` (the file), ``.KEY.pin`` (held
    shared while the file is in use, so no process evicts it), ``.KEY.lock`` (held exclusively while it is
    downloaded, so processes fetch it once); a download is written to ``.KEY.*.tmp`` and renamed into place.
    Pin and lock files exist only while held.
    """

    def __init__(self, settings: LoraSettings, fetch: FetchSettings, cache_dir: Path) -> None:
        self.settings = settings
        self.directory = Path(settings.cache_dir or Path(cache_dir) / "loras").expanduser()
        # The project's guarded fetcher, with the operator's allow-lists; only the size cap, deadline and
        # the (unused) image cache differ from the one that fetches request images.
        self.fetcher = Fetcher(fetch.model_copy(update={
            "max_bytes": settings.max_file_bytes, "timeout_s": settings.download_timeout_s,
            "cache_entries": 0,
        }))
        self._lock = threading.Lock()
        self._flights: SingleFlight[str, Path] = SingleFlight(self._lock)
        self.downloads = 0
        self.hits = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> LoraStore:
        """The store a process builds from its ``Settings`` (loras, fetch allow-lists, engine.cache_dir)."""
        return cls(settings.loras, settings.fetch, settings.engine.cache_dir)

    def close(self) -> None:
        self.fetcher.close()

    @staticmethod
    def key(path: str) -> str:
        return hashlib.sha256(path.encode("utf-8")).hexdigest()[:40]

    def file_for(self, path: str) -> Path:
        return self.directory / f"{self.key(path)}.safetensors"

    def _pin_file(self, key: str) -> Path:
        return self.directory / f".{key}.pin"

    def limits(self, *, any_size: bool = False) -> Limits:
        """What a LoRA file's header may cost to read (``loras.max_header_bytes``, ``max_tensors``), and the
        size it may declare: ``loras.max_file_bytes`` for a download, any for a file already on this disk."""
        return Limits(self.settings.max_header_bytes, self.settings.max_tensors,
                      None if any_size else self.settings.max_file_bytes)

    @property
    def fetch_wait_s(self) -> float:
        """The longest one fetch may take: a wait for a download slot, then the download, each up to
        ``download_timeout_s``, and a margin; whoever waits for another's fetch waits this long, then
        answers 503."""
        timeout = self.settings.download_timeout_s
        return 2 * timeout + min(30.0, timeout)

    def on_disk(self, path: str) -> bool:
        """Whether the LoRA at ``path`` needs no download: registered on this server, or in the disk cache
        (a file check, no network)."""
        return path in self.settings.registered or self.file_for(path).is_file()

    # -- use --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, path: str, loader: Loader | None = None) -> Iterator[Path]:
        """The local file of a LoRA (fetched if needed), kept from eviction, by this process and any other
        sharing the folder, while the block runs. A file is checked as ``loader`` (the model's diffusers
        LoRA loader, server/lora_format.py) would convert it; None: refused only if no loader applies it.
        Raises ``LoraError`` (400: the file's fault), ``LoraUnavailable`` (503) or ``LoraStoreFailure``
        (500)."""
        source = parse_source(path, self.settings)
        if source.local is not None:
            yield self._registered(source, loader)
            return
        key = self.key(path)
        self._mkdir()
        pin = locked(self._pin_file(key), exclusive=False, wait_s=None)  # an evictor holds it an instant
        assert pin is not None  # waited for
        try:
            yield self._ensure(source, loader)
        finally:
            os.close(pin)
            self._remove_unheld(self._pin_file(key))  # unless another user holds it now

    def ensure(self, path: str, loader: Loader | None = None) -> Path:
        with self.use(path, loader) as file:
            return file

    def prefetch(self, refs: Sequence[LoraRef], loader: Loader | None = None) -> None:
        """Each LoRA fetched into the cache and checked (for ``loader``'s model, when given)."""
        for ref in refs:
            self.ensure(ref.path, loader)

    def _registered(self, source: Source, loader: Loader | None) -> Path:
        assert source.local is not None
        file = source.local.resolve()
        try:
            read_header(file, self.limits(any_size=True), loader)
        except FormatError as exc:
            raise format_error(source.path, exc) from None
        except OSError as exc:
            log.error("registered lora unreadable name=%s file=%s error=%s", source.path, file, exc)
            raise LoraStoreFailure(f"LoRA '{source.path}' is registered on this server but its file cannot "
                                   "be read; see the server log") from None
        return file

    def _ensure(self, source: Source, loader: Loader | None) -> Path:
        key, file = self.key(source.path), self.file_for(source.path)

        def cached() -> Path | None:
            if not file.is_file():
                return None
            self.hits += 1
            metrics.LORA_CACHE_HITS.labels(cache="disk").inc()
            _touch(file)
            return file

        # Another request fetching the same LoRA at this moment: share its outcome.
        try:
            return self._flights.run(key, lambda: self._fetch_locked(source, file, loader),
                                     self.fetch_wait_s, cached=cached)
        except FutureTimeout:
            raise LoraUnavailable(f"LoRA '{shown_path(source.path)}' is still being fetched for another "
                                  f"request after {self.fetch_wait_s:g} s; retry shortly") from None

    def _fetch_locked(self, source: Source, file: Path, loader: Loader | None) -> Path:
        """Download under a per-file lock, so processes sharing the cache folder fetch it once too."""
        self._mkdir()
        lock_file = self.directory / f".{file.stem}.lock"
        lock = locked(lock_file, exclusive=True, wait_s=self.fetch_wait_s)
        if lock is None:
            raise LoraUnavailable(f"LoRA '{shown_path(source.path)}' is still being fetched by another "
                                  f"process sharing the cache folder after {self.fetch_wait_s:g} s; retry "
                                  "shortly")
        try:
            if file.is_file():
                _touch(file)
                return file
            size = self._download_to(source, file, loader)
            with self._lock:
                self.downloads += 1
            metrics.LORA_CACHE_MISSES.labels(cache="disk").inc()
            log.info("lora downloaded path=%s bytes=%d file=%s", shown_path(source.path), size, file.name)
        finally:
            # Removed while held: a process waiting on this lock file finds it gone and opens a new one.
            with contextlib.suppress(OSError):
                lock_file.unlink()
            os.close(lock)
        self.evict()
        return file

    def _download_to(self, source: Source, file: Path, loader: Loader | None) -> int:
        """Stream the LoRA into a temporary file beside ``file``, checking its header before its body
        (server/lora_format.py ``StreamCheck``), then rename it into place. Returns its size in bytes."""
        url = source.url or self._pick_from_repo(source)
        started = time.monotonic()
        fd, tmp = tempfile.mkstemp(prefix=f".{file.stem}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as out:
                check = StreamCheck(out.write, self.limits(), loader)
                # The field is the request field (it labels the fetcher's metrics); messages name the path.
                self.fetcher.fetch_to(url, FIELD, self.settings.max_file_bytes, check)
            check_finite(Path(tmp), check.finish())
            os.replace(tmp, file)
        except FetchError as exc:
            raise LoraError(_naming(exc.message, source.path), code=exc.code) from None
        except FormatError as exc:
            raise format_error(source.path, exc) from None
        except OSError as exc:  # the server's disk, not the file
            log.error("lora could not be written path=%s folder=%s error=%s", shown_path(source.path),
                      self.directory, exc)
            raise LoraStoreFailure(f"LoRA '{shown_path(source.path)}' could not be stored on this server; "
                                   "see the server log") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        log.debug("lora fetched path=%s seconds=%.2f", shown_path(source.path), time.monotonic() - started)
        return check.received

    def _pick_from_repo(self, source: Source) -> str:
        assert source.repo is not None
        hub = self.settings.hub_url.rstrip("/")
        repo, rev = source.repo, quote(source.revision, safe="")
        listing_url = f"{hub}/api/models/{repo}/revision/{rev}"
        try:
            raw = self.fetcher.fetch_bytes(listing_url, FIELD, _MAX_LISTING_BYTES)
            listing = json.loads(raw)
            files = [s["rfilename"] for s in listing.get("siblings", []) if isinstance(s, dict)]
        except FetchError as exc:
            raise LoraError(f"{_naming(exc.message, source.path)} (listing the files of Hugging Face "
                            f"repo {repo})",
                            code=exc.code) from None
        except (ValueError, TypeError, KeyError, AttributeError):
            raise LoraError(f"LoRA '{shown_path(source.path)}': the Hub's file list for {repo} is unreadable",
                            code="fetch_failed") from None
        picked = pick_lora_file(files, source.subfolder)
        if picked is None:
            raise LoraError(f"LoRA '{shown_path(source.path)}': Hugging Face repo {repo} has no .safetensors "
                            "file" + (f" in {source.subfolder}" if source.subfolder else " at its top level"),
                            code="invalid_lora_file")
        if isinstance(picked, list):
            shown = ", ".join(picked[:8])
            raise LoraError(f"LoRA '{shown_path(source.path)}': Hugging Face repo {repo} holds several "
                            f".safetensors files ({shown}); name one with a "
                            f"{hub}/{repo}/resolve/{source.revision}/FILE URL")
        return f"{hub}/{repo}/resolve/{rev}/{quote(picked)}"

    # -- eviction ---------------------------------------------------------------------------------

    def cached(self) -> list[Path]:
        """Cached files, least recently used first."""
        if not self.directory.is_dir():
            return []
        files = []
        for file in self.directory.glob("*.safetensors"):
            with contextlib.suppress(OSError):
                files.append((file.stat().st_mtime_ns, file))
        return [f for _, f in sorted(files)]

    def cached_bytes(self) -> int:
        return sum(_size(f) for f in self.cached())

    def evict(self) -> list[Path]:
        """Delete least recently used files until the cache fits ``cache_bytes``. A file in use here or in
        another process sharing the folder stays (its pin file is held shared: see ``use``); so do the
        temporary files of downloads in progress. Leftovers of crashed processes go too."""
        removed: list[Path] = []
        files = self.cached()
        total = sum(_size(f) for f in files)
        for file in files:
            if total <= self.settings.cache_bytes:
                break
            size = _size(file)
            pin = locked(self._pin_file(file.stem), exclusive=True, wait_s=0)
            if pin is None:
                continue  # in use
            try:
                file.unlink()
                removed.append(file)
                total -= size
                self._pin_file(file.stem).unlink()
            except OSError:
                pass
            finally:
                os.close(pin)
        self._sweep()
        for file in removed:
            log.info("lora evicted from the disk cache file=%s", file.name)
        if removed:
            metrics.LORA_CACHE_EVICTIONS.labels(cache="disk").inc(len(removed))
        return removed

    def _sweep(self) -> None:
        """Remove what crashed processes left: temporary files older than any download may take, and pin or
        lock files of no cached file that nobody holds."""
        old = time.time() - self.fetch_wait_s
        for tmp in self.directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < old:
                    tmp.unlink()
        for extra in [*self.directory.glob(".*.pin"), *self.directory.glob(".*.lock")]:
            if not (self.directory / f"{extra.name[1:].rsplit('.', 1)[0]}.safetensors").exists():
                self._remove_unheld(extra)

    @staticmethod
    def _remove_unheld(lock_file: Path) -> None:
        fd = locked(lock_file, exclusive=True, wait_s=0, create=False)
        if fd is None:
            return
        with contextlib.suppress(OSError):
            lock_file.unlink()
        os.close(fd)

    def _mkdir(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("lora cache folder cannot be created folder=%s error=%s", self.directory, exc)
            raise LoraStoreFailure("this server cannot store LoRA files; see the server log") from None


def _naming(message: str, path: str) -> str:
    """A fetcher message ("'image_loras' could not be fetched: ...") about the LoRA at ``path``."""
    return f"LoRA '{shown_path(path)}'{message.removeprefix(repr(FIELD))}"


def _touch(file: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(file)


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return 0
