"""API keys: who may call, which models each key may use, how fast, and whether it may skip the safety checker.

Keys come from ``auth.keys`` in the config, from ``auth.keys_file`` (YAML or JSON, e.g. a mounted Secret,
re-read when it changes) and from the plain list ``server.api_keys``. Only SHA-256 digests are kept in
memory; a key is never logged (logs and metrics name a key by its ``name``). With no key configured at
all, any bearer key is accepted (the SDKs refuse to start without one) and gets the default limits.

Limits (requests and images per sliding minute) are checked when a generation request has been
validated, before it is queued: over a limit is a 429 with ``retry-after``; every answer to a limited key
carries Together's lowercase ``x-ratelimit-*`` headers (``-images`` for the images quota). Only admitted work
counts: a request refused after its charge (flagged prompt, bad image URL, queue full, Redis unreachable)
gets the charge back (``Charge.refund``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from fastapi import Request
from pydantic import TypeAdapter, ValidationError

from ..config import ApiKeySpec, AuthSettings, Settings
from ..errors import DarkroomError, Forbidden, InvalidRequest, ServiceUnavailable, Unauthorized
from ..registry import ModelManifest, Registry
from .ratelimit import Ask, Decision, Limiter, MemoryLimiter, RedisLimiter

log = logging.getLogger(__name__)


class RateLimited(DarkroomError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One key's policy. ``name`` stands for the key in logs; ``bucket`` (a prefix of the key's SHA-256)
    names its limiter state, so two entries that share a name never share limits."""

    name: str
    bucket: str = ""
    requests_per_minute: int | None = None
    images_per_minute: int | None = None
    # Manifest ids; None: every served model.
    models: frozenset[str] | None = None
    # From the key store: its permission; None (server.api_keys, open mode): safety.disable_keys decides.
    disable_safety_checker: bool | None = None

    def may_use(self, manifest: ModelManifest) -> bool:
        return self.models is None or manifest.id in self.models

    def asks(self, images: int) -> list[Ask]:
        asks = []
        if self.requests_per_minute is not None:
            asks.append(Ask("requests", self.requests_per_minute, 1))
        if self.images_per_minute is not None:
            asks.append(Ask("images", self.images_per_minute, images))
        return asks


_ENTRIES = TypeAdapter(list[ApiKeySpec])


def read_keys_file(path: Path) -> list[ApiKeySpec]:
    """The entries of a keys file: a YAML/JSON list, or a mapping with a ``keys`` list."""
    data = yaml.safe_load(path.read_text()) or []
    if isinstance(data, dict):
        data = data.get("keys") or []
    try:
        return _ENTRIES.validate_python(data)
    except ValidationError as exc:
        # The message names fields and positions, never input values (which may be keys).
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid keys file {path}: {errors}") from None


class KeyStore:
    """Digest → policy. Lookups are a dict access on the SHA-256 of the presented key."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.auth: AuthSettings = settings.auth
        self.registry = registry
        self._lock = threading.Lock()
        self._legacy: dict[str, ApiKey] = {}
        for secret in settings.server.api_keys:
            key_digest = digest(secret.get_secret_value())
            self._legacy[key_digest] = ApiKey(
                name=f"key-{key_digest[:8]}", bucket=key_digest[:24],
                requests_per_minute=self.auth.default_requests_per_minute,
                images_per_minute=self.auth.default_images_per_minute,
            )
        self._configured = self._policies(self.auth.keys, "auth.keys")
        self._from_file: dict[str, ApiKey] = {}
        self._file_stamp: tuple[float, int] | None = None
        self._checked_at = 0.0
        if self.auth.keys_file is not None:
            self._load_file(strict=True)

    # -- building ----------------------------------------------------------------------------------

    def _policies(self, entries: list[ApiKeySpec], where: str) -> dict[str, ApiKey]:
        policies: dict[str, ApiKey] = {}
        for spec in entries:
            # ApiKeySpec holds exactly one of key and sha256.
            key_digest = spec.sha256 or digest(spec.key.get_secret_value() if spec.key is not None else "")
            models = None
            if spec.models is not None:
                resolved = set()
                for name in spec.models:
                    try:
                        resolved.add(self.registry.get(name).id)
                    except DarkroomError:
                        log.warning("%s: key %s names model %r, which is not served here", where,
                                    spec.name or key_digest[:8], name)
                models = frozenset(resolved)
            policies[key_digest] = ApiKey(
                name=spec.name or f"key-{key_digest[:8]}", bucket=key_digest[:24],
                requests_per_minute=spec.requests_per_minute or self.auth.default_requests_per_minute,
                images_per_minute=spec.images_per_minute or self.auth.default_images_per_minute,
                models=models,
                disable_safety_checker=spec.disable_safety_checker,
            )
        return policies

    def _load_file(self, strict: bool = False) -> None:
        path = self.auth.keys_file
        assert path is not None
        try:
            stat = path.stat()
            stamp = (stat.st_mtime, stat.st_size)
            if stamp == self._file_stamp:
                return
            policies = self._policies(read_keys_file(path), str(path))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            if strict:
                raise
            log.error("keys file not reloaded, keeping the previous keys: %s", exc)
            return
        with self._lock:
            self._from_file, self._file_stamp = policies, stamp
        log.info("keys file loaded path=%s keys=%d", path, len(policies))

    def _maybe_reload(self) -> None:
        if self.auth.keys_file is None:
            return
        now = time.monotonic()
        if now - self._checked_at < self.auth.reload_interval_s:
            return
        self._checked_at = now
        self._load_file()

    # -- lookups -----------------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """No key configured anywhere: any bearer key is accepted."""
        return not (self._legacy or self._configured or self.auth.store_configured)

    def lookup(self, key: str) -> ApiKey | None:
        self._maybe_reload()
        key_digest = digest(key)
        with self._lock:
            return (self._from_file.get(key_digest) or self._configured.get(key_digest)
                    or self._legacy.get(key_digest))

    def anonymous(self, key: str | None) -> ApiKey:
        """Open mode: the presented key (any) is only a name for its limits."""
        key_digest = digest(key or "")
        return ApiKey(
            name="anonymous" if not key else f"anon-{key_digest[:8]}", bucket=f"anon-{key_digest[:24]}",
            requests_per_minute=self.auth.default_requests_per_minute,
            images_per_minute=self.auth.default_images_per_minute,
        )


def open_limiter(settings: Settings) -> Limiter:
    """Redis when the queue is on Redis (limits hold across every API process), else this process only."""
    if settings.queue.backend == "redis":
        return RedisLimiter(settings.queue.redis_url, settings.queue.key_prefix,
                            timeout_s=settings.queue.redis_timeout_s,
                            max_connections=settings.queue.redis_max_connections)
    return MemoryLimiter()


# -- request handling ------------------------------------------------------------------------------


def bearer_token(authorization: str | None) -> str | None:
    """The key in an ``Authorization: Bearer <key>`` header value (any case of the scheme); None without."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def authenticate(request: Request) -> ApiKey:
    """The FastAPI dependency: the caller's key policy (401 for a missing or unknown key)."""
    store: KeyStore = request.app.state.runtime.keys
    token = bearer_token(request.headers.get("authorization"))
    if store.open:
        key = store.anonymous(token)
    else:
        if token is None:
            raise Unauthorized("missing bearer API key (Authorization: Bearer <key>)")
        found = store.lookup(token)
        if found is None:
            raise Unauthorized("invalid API key")
        key = found
    request.state.api_key = key
    return key


def api_key_of(request: Request) -> ApiKey:
    key = getattr(request.state, "api_key", None)
    return key if key is not None else authenticate(request)


def authorize_model(request: Request, manifest: ModelManifest) -> ApiKey:
    """403 when the caller's key may not use ``manifest``; notes the model for metrics and logs."""
    request.state.model = manifest.id
    key = api_key_of(request)
    if not key.may_use(manifest):
        raise Forbidden(f"this API key may not use model {manifest.id}", param="model",
                        code="model_not_allowed")
    return key


def requested_model(request: Request, name: str | None,
                    suits: Callable[[ModelManifest], bool] | None = None) -> ModelManifest | None:
    """The model a request asks for, as the caller's key sees the served models.

    ``name`` (an id or alias): that model (404 for an unknown name, listing only the models this key may
    use, as ``/v1/models`` does for it; whether the key may use it is ``authorize_model``'s to say).
    No name: the first served model this key may use (and that ``suits``, e.g. one that edits images), so a
    key limited to some models gets one of its own rather than a 403 for the server's default; None when
    there is none.
    """
    key = api_key_of(request)
    registry: Registry = request.app.state.runtime.registry
    if name is not None:
        return registry.get(name, key.may_use)
    return next((m for m in registry.models if key.may_use(m) and (suits is None or suits(m))), None)


def ratelimit_headers(decision: Decision) -> dict[str, str]:
    headers: dict[str, str] = {}
    for quota in decision.quotas:
        suffix = "" if quota.kind == "requests" else f"-{quota.kind}"
        headers[f"x-ratelimit-limit{suffix}"] = str(quota.limit)
        headers[f"x-ratelimit-remaining{suffix}"] = str(quota.remaining)
        headers[f"x-ratelimit-reset{suffix}"] = str(math.ceil(quota.reset_s))
    return headers


@dataclass
class Charge:
    """What ``charge`` took from a key's limits; ``refund`` gives it back once (the request was refused
    before its job was queued, so it is not admitted work)."""

    request: Request | None = None
    limiter: Limiter | None = None
    key_id: str = ""
    asks: tuple[Ask, ...] = ()
    id: str = ""

    async def refund(self) -> None:
        if self.limiter is None or self.request is None or not self.id:
            return
        charge_id, self.id = self.id, ""
        try:
            await self.limiter.refund(self.key_id, list(self.asks), charge_id)
        except Exception as exc:  # noqa: BLE001 - the refusal itself is what the client needs to hear
            log.warning("rate limit refund failed: %s", type(exc).__name__)
            return
        # The x-ratelimit-remaining* headers on the refusal count the refund too.
        headers = getattr(self.request.state, "response_headers", {})
        for ask in self.asks:
            name = "x-ratelimit-remaining" + ("" if ask.kind == "requests" else f"-{ask.kind}")
            if name in headers:
                headers[name] = str(min(ask.limit, int(headers[name]) + ask.cost))


async def charge(request: Request, key: ApiKey, images: int) -> Charge:
    """Charge one request of ``images`` images to the key's limits; 429 (nothing charged) when over, 503
    when the limiter (Redis) does not answer within ``queue.redis_timeout_s``."""
    asks = key.asks(images)
    if not asks:
        return Charge()
    for ask in asks:
        if ask.cost > ask.limit:
            raise InvalidRequest(
                f"n={images} is more than this API key's limit of {ask.limit} {ask.kind} per minute",
                param="n", code="over_key_limit")
    limiter: Limiter = request.app.state.runtime.limiter
    key_id = key.bucket or key.name
    try:
        decision = await limiter.acquire(key_id, asks)
    except Exception as exc:  # noqa: BLE001 - Redis down or hung: no one can be admitted fairly
        log.warning("rate limiter unavailable: %s", type(exc).__name__)
        raise ServiceUnavailable("the rate limiter is unavailable; retry later", code="ratelimit_unavailable",
                                 headers={"retry-after": "1"}) from None
    headers = ratelimit_headers(decision)
    # The middleware (server/api/observe.py) puts these on whatever response this request gets.
    request.state.response_headers = {**getattr(request.state, "response_headers", {}), **headers}
    if not decision.allowed:
        from .. import metrics

        over = [a.kind for a, q in zip(asks, decision.quotas, strict=True) if q.remaining < a.cost]
        for kind in over:
            metrics.RATE_LIMITED.labels(kind=kind).inc()
        retry = max(1, math.ceil(decision.retry_after_s))
        raise RateLimited(
            f"this API key is over its limit of {' and '.join(_describe(key, over))}; retry in {retry}s",
            headers={**headers, "retry-after": str(retry)},
        )
    return Charge(request, limiter, key_id, tuple(asks), decision.charge)


def _describe(key: ApiKey, kinds: list[str]) -> list[str]:
    limits = {"requests": key.requests_per_minute, "images": key.images_per_minute}
    return [f"{limits.get(kind)} {kind} per minute" for kind in kinds]


def visible_models(request: Request, models: list[Any]) -> list[Any]:
    key = api_key_of(request)
    return [m for m in models if key.may_use(m)]
