"""Keeping finished images for ``response_format: url`` behind signed URLs (API side: workers never store).

The API process that answers a request stores its images (encoded by the worker, server/images.py); S3 is
in server/api/storage_s3.py. A URL is ``/v1/files/<key>?expires=<unix>&signature=<hmac>``: anyone holding it
may fetch the image until it expires, with no API key, as with Together's hosted URLs. The signature covers
key and expiry, so neither can be changed. Files older than the retention are deleted by a periodic sweep.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

from ..config import StorageSettings
from ..errors import Forbidden, NotFound

log = logging.getLogger(__name__)

MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_KEY = re.compile(r"^[0-9a-f]{32}\.(jpeg|png|webp)$")


class LocalStorage:
    """Images in a local directory, served back by the API under signed, expiring URLs."""

    def __init__(self, settings: StorageSettings) -> None:
        self.directory = Path(settings.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.url_ttl_s = settings.url_ttl_s
        self.retention_s = settings.retention_s
        if settings.signing_key is None:
            log.warning("storage.signing_key is not set: image URLs stop working when the server restarts")
            self._key = secrets.token_bytes(32)
        else:
            self._key = settings.signing_key.get_secret_value().encode()

    def put(self, data: bytes, fmt: str) -> str:
        key = f"{uuid.uuid4().hex}.{fmt}"
        tmp = self.directory / f".{key}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / key)
        return key

    def _signature(self, key: str, expires: int) -> str:
        return hmac.new(self._key, f"{key}:{expires}".encode(), hashlib.sha256).hexdigest()

    def signed_path(self, key: str, now: float | None = None) -> str:
        expires = int(now if now is not None else time.time()) + self.url_ttl_s
        query = urlencode({"expires": expires, "signature": self._signature(key, expires)})
        return f"/v1/files/{key}?{query}"

    def url(self, key: str, base: str, now: float | None = None) -> str:
        """The signed URL of a stored image under ``base``, the API's public address."""
        return base + self.signed_path(key, now)

    def open(self, key: str, expires: int, signature: str, now: float | None = None) -> Path:
        """The file behind a signed URL: 403 when the signature is wrong or expired, 404 when gone."""
        if not _KEY.match(key):
            raise NotFound("no such file", code="file_not_found")
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a refusal).
        supplied = signature.encode("utf-8", "replace")
        if not hmac.compare_digest(self._signature(key, expires).encode(), supplied):
            raise Forbidden("invalid URL signature", code="invalid_signature")
        if (now if now is not None else time.time()) > expires:
            raise Forbidden("this URL has expired", code="url_expired")
        path = self.directory / key
        if not path.is_file():
            raise NotFound("no such file (it may have been cleaned up)", code="file_not_found")
        return path

    def cleanup(self, now: float | None = None) -> int:
        """Delete images older than the retention period; returns how many went."""
        cutoff = (now if now is not None else time.time()) - self.retention_s
        removed = 0
        for path in self.directory.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("storage cleanup removed=%d", removed)
        return removed
