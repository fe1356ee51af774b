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
allow-lists, the LoRA size cap and the LoRA download deadline. Files land in a disk cache keyed by the
request's path, with a byte cap and least-recently-used eviction (the file's mtime is its last use, so
the order survives restarts); concurrent requests for the same uncached LoRA download it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from . import metrics
from .config import FetchSettings, LoraSettings, Settings
from .errors import DarkroomError, InvalidRequest
from .fetch import Fetcher, FetchError
from .params import LoraRef
from .single_flight import SingleFlight

log = logging.getLogger(__name__)

FIELD = "image_loras"
HUB_HOSTS = ("huggingface.co", "hf.co", "www.huggingface.co")
# Diffusers' own file name for a LoRA saved by its training scripts: preferred in a repo.
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
_MAX_HEADER_BYTES = 100_000_000
_MAX_LISTING_BYTES = 10_000_000


class LoraError(InvalidRequest):
    """A LoRA a request names cannot be used: the message names its path."""

    code = "invalid_lora"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, param=FIELD, code=code)


def shown_path(path: str) -> str:
    """A LoRA path as messages and logs show it (cut at 200 characters)."""
    return path if len(path) <= 200 else path[:197] + "..."


# -- where a path points ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """How to get the file a path names: a local file, a URL, or a Hub repo whose file is still to pick."""

    path: str
    local: Path | None = None
    url: str | None = None
    repo: str | None = None       # owner/name, for a repo URL
    revision: str = "main"
    subfolder: str = ""


def _is_hub(host: str, hub: Any) -> bool:
    return host.lower() in HUB_HOSTS or host.lower() == (hub.netloc or "").lower()


def parse_source(path: str, settings: LoraSettings) -> Source:
    if path in settings.registered:
        return Source(path, local=settings.registered[path])
    parts = urlsplit(path)
    hub = urlsplit(settings.hub_url.rstrip("/"))
    if not _is_hub(parts.netloc, hub):
        return Source(path, url=path)
    segments = [s for s in parts.path.split("/") if s]
    base = f"{hub.scheme}://{hub.netloc}{hub.path.rstrip('/')}"
    if len(segments) == 2 or (len(segments) >= 4 and segments[2] == "tree"):
        revision = segments[3] if len(segments) >= 4 else "main"
        return Source(path, repo="/".join(segments[:2]), revision=revision,
                      subfolder="/".join(segments[4:]))
    if len(segments) >= 5 and segments[2] in ("resolve", "blob"):
        file_path = "/".join(segments[:2] + ["resolve"] + segments[3:])
        query = f"?{parts.query}" if parts.query else ""
        return Source(path, url=f"{base}/{file_path}{query}")
    # Anything else on the Hub's host: a plain URL, sent to the configured endpoint.
    return Source(path, url=f"{base}{parts.path}" + (f"?{parts.query}" if parts.query else ""))


def pick_lora_file(files: Sequence[str], subfolder: str = "") -> str | None | list[str]:
    """The repo file that is the LoRA: ``None`` if none fits, a list of candidates if several do."""
    prefix = f"{subfolder.strip('/')}/" if subfolder.strip("/") else ""
    here = [f for f in files if f.startswith(prefix) and f.endswith(".safetensors")
            and "/" not in f[len(prefix):]]
    if not here:
        return None
    for name in here:
        if name[len(prefix):] == DIFFUSERS_LORA_NAME:
            return name
    if len(here) == 1:
        return here[0]
    named = [f for f in here if "lora" in f[len(prefix):].lower()]
    if len(named) == 1:
        return named[0]
    return sorted(here)


# -- the file itself --------------------------------------------------------------------------------


def safetensors_keys(data: bytes | Path, label: str) -> list[str]:
    """The tensor names in a safetensors file, checking its header and layout (no tensor is read)."""
    if isinstance(data, Path):
        size = data.stat().st_size
        with data.open("rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = fh.read(length) if 2 <= length <= min(_MAX_HEADER_BYTES, size - 8) else b""
    else:
        size = len(data)
        length = int.from_bytes(data[:8], "little") if size >= 8 else -1
        raw = data[8 : 8 + length] if 2 <= length <= min(_MAX_HEADER_BYTES, size - 8) else b""
    not_st = LoraError(f"LoRA '{shown_path(label)}' is not a safetensors file", code="invalid_lora_file")
    if not raw:
        raise not_st
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise not_st from None
    if not isinstance(header, dict):
        raise not_st
    keys, end = [], 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
                and len(info["data_offsets"]) == 2):
            raise not_st
        keys.append(key)
        end = max(end, int(info["data_offsets"][1]))
    if not keys or end != size - 8 - length:
        raise LoraError(f"LoRA '{shown_path(label)}' is not a complete safetensors file with tensors",
                        code="invalid_lora_file")
    return keys


def check_lora_keys(keys: Sequence[str], label: str) -> None:
    """Every format diffusers converts (kohya, xlabs, diffusers/peft, ...) names its weights with "lora"."""
    if not any("lora" in k.lower() for k in keys):
        sample = ", ".join(sorted(keys)[:3])
        raise LoraError(f"LoRA '{shown_path(label)}' holds no LoRA weights (tensors like {sample})",
                        code="invalid_lora_file")


# -- the store --------------------------------------------------------------------------------------


class LoraStore:
    """Resolves paths and keeps downloaded LoRA files on disk. Safe to share between threads."""

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
        self._pins: Counter[str] = Counter()
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

    def on_disk(self, path: str) -> bool:
        """Whether the LoRA at ``path`` needs no download: registered on this server, or in the disk cache
        (a file check, no network)."""
        return path in self.settings.registered or self.file_for(path).is_file()

    # -- use --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, path: str) -> Iterator[Path]:
        """The local file of a LoRA (fetched if needed), kept from eviction while the block runs."""
        source = parse_source(path, self.settings)
        if source.local is not None:
            yield self._registered(source)
            return
        key = self.key(path)
        with self._lock:
            self._pins[key] += 1
        try:
            yield self._ensure(source)
        finally:
            with self._lock:
                self._pins[key] -= 1
                if self._pins[key] <= 0:
                    del self._pins[key]

    def ensure(self, path: str) -> Path:
        with self.use(path) as file:
            return file

    def prefetch(self, refs: Sequence[LoraRef]) -> None:
        for ref in refs:
            self.ensure(ref.path)

    def _registered(self, source: Source) -> Path:
        assert source.local is not None
        file = source.local.resolve()
        if not file.is_file():
            raise LoraError(f"LoRA '{source.path}' is registered on this server but its file is missing",
                            code="lora_unavailable")
        check_lora_keys(safetensors_keys(file, source.path), source.path)
        return file

    def _ensure(self, source: Source) -> Path:
        key, file = self.key(source.path), self.file_for(source.path)

        def cached() -> Path | None:
            if not file.is_file():
                return None
            self.hits += 1
            metrics.LORA_CACHE_HITS.labels(cache="disk").inc()
            _touch(file)
            return file

        # Another request fetching the same LoRA at this moment: share its outcome.
        return self._flights.run(key, lambda: self._fetch_locked(source, file),
                                 self.settings.download_timeout_s + 60, cached=cached)

    def _fetch_locked(self, source: Source, file: Path) -> Path:
        """Download under a per-file lock, so processes sharing the cache folder fetch it once too."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f".{file.stem}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if file.is_file():
                    _touch(file)
                    return file
                data = self._download(source)
                keys = safetensors_keys(data, source.path)
                check_lora_keys(keys, source.path)
                fd, tmp = tempfile.mkstemp(prefix=f".{file.stem}.", suffix=".tmp", dir=self.directory)
                try:
                    with os.fdopen(fd, "wb") as out:
                        out.write(data)
                    os.replace(tmp, file)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                with self._lock:
                    self.downloads += 1
                metrics.LORA_CACHE_MISSES.labels(cache="disk").inc()
                log.info("lora downloaded path=%s bytes=%d file=%s", shown_path(source.path), len(data),
                         file.name)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.evict()
        return file

    def _download(self, source: Source) -> bytes:
        url = source.url or self._pick_from_repo(source)
        started = time.monotonic()
        try:
            # The field is the request field (it labels the fetcher's metrics); messages name the path.
            data = self.fetcher.fetch_bytes(url, FIELD, self.settings.max_file_bytes)
        except FetchError as exc:
            raise LoraError(_naming(exc.message, source.path), code=exc.code) from None
        except DarkroomError:
            raise
        log.debug("lora fetched path=%s seconds=%.2f", shown_path(source.path), time.monotonic() - started)
        return data

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
        """Delete least recently used files until the cache fits ``cache_bytes``; pinned files stay."""
        removed: list[Path] = []
        with self._lock:
            files = self.cached()
            total = sum(_size(f) for f in files)
            for file in files:
                if total <= self.settings.cache_bytes:
                    break
                if self._pins.get(file.stem):
                    continue
                size = _size(file)
                with contextlib.suppress(OSError):
                    file.unlink()
                    removed.append(file)
                    total -= size
        for file in removed:
            log.info("lora evicted from the disk cache file=%s", file.name)
        if removed:
            metrics.LORA_CACHE_EVICTIONS.labels(cache="disk").inc(len(removed))
        return removed


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
