"""API keys, their limits and permissions (``auth``; server/api/keys.py)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class ApiKeySpec(BaseModel):
    """One API key of the key store (server/api/keys.py): the key itself or its SHA-256, and its policy."""

    model_config = ConfigDict(extra="forbid")

    # Shown in logs and metrics instead of the key; default: "key-" + the first 8 hex digits of its SHA-256.
    name: str | None = None
    # Exactly one of: the key, or the hex SHA-256 of the key (so the config need not hold the secret).
    key: SecretStr | None = None
    sha256: str | None = None
    # Sliding one-minute windows; None: the auth.default_* limit (None there too: unlimited).
    requests_per_minute: int | None = Field(default=None, ge=1)
    images_per_minute: int | None = Field(default=None, ge=1)
    # Model ids or aliases this key may use; None: every served model.
    models: list[str] | None = None
    # May send disable_safety_checker (with safety.allow_disable: per_key; the model must allow it too).
    disable_safety_checker: bool = False

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKeySpec:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("an API key entry needs exactly one of key, sha256")
        if self.sha256 is not None:
            digest = self.sha256.strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError("sha256 must be 64 hex digits (sha256sum of the key)")
            self.sha256 = digest
        return self


class AuthSettings(BaseModel):
    """API keys with limits and permissions (server/api/keys.py). ``server.api_keys`` stays valid: such
    keys get the default limits, every model, and safety.disable_keys decides their safety permission."""

    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKeySpec] = Field(default_factory=list)
    # A YAML or JSON file (e.g. a mounted Kubernetes Secret): a list of entries like ``keys``, or
    # {"keys": [...]}. Re-read when it changes (checked at most every reload_interval_s).
    keys_file: Path | None = None
    reload_interval_s: float = 5.0
    # Limits of keys that set none (also of server.api_keys, and of any bearer when no key is configured).
    default_requests_per_minute: int | None = Field(default=None, ge=1)
    default_images_per_minute: int | None = Field(default=None, ge=1)

    @property
    def store_configured(self) -> bool:
        return bool(self.keys) or self.keys_file is not None
