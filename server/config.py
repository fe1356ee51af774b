"""One typed settings object for the whole server.

Values come, highest priority first, from ``DARKROOM_*`` environment variables (nested with ``__``, e.g.
``DARKROOM_QUEUE__MAX_JOBS=32``), then the YAML file given with ``--config`` (or ``DARKROOM_CONFIG``),
then the defaults below, which are the embedded default: the tiny FLUX model on this machine's CPU.
The object is built once at start-up and passed down; nothing deeper reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    # Base of the image URLs handed to clients; None means "the URL the client used to reach us".
    public_url: str | None = None
    # Bearer keys. Empty means any key is accepted (the SDKs refuse to start without one).
    api_keys: list[SecretStr] = Field(default_factory=list)
    # A job that has not started by this many seconds after arrival is answered 504 and never runs.
    request_timeout_s: float = 300.0
    max_body_bytes: int = 1_000_000
    # What a request without response_format gets; Together answers with a URL.
    default_response_format: Literal["url", "base64"] = "url"
    log_level: str = "INFO"


class LimitSettings(BaseModel):
    """Server-wide ceilings; a model manifest can only lower them."""

    max_n: int = 4
    max_steps: int = 50
    max_width: int = 2048
    max_height: int = 2048
    max_pixels: int = 2048 * 2048
    max_prompt_chars: int = 4000


class QueueSettings(BaseModel):
    backend: Literal["memory"] = "memory"
    # Jobs waiting (not yet running) before new requests are answered 429.
    max_jobs: int = 256
    retry_after_s: int = 1


class SchedulerSettings(BaseModel):
    # How long the worker waits for compatible jobs to fill a batch; a lone job never waits longer.
    batch_window_ms: float = 5.0
    max_batch_images: int = 8


def _expand(path: Path) -> Path:
    return path.expanduser()


class StorageSettings(BaseModel):
    backend: Literal["local"] = "local"
    directory: Path = REPO_ROOT / "var" / "images"
    # How long a signed URL stays valid, and how long a stored image is kept on disk.
    url_ttl_s: int = 3600
    retention_s: int = 3600
    cleanup_interval_s: float = 60.0
    # HMAC key for URL signatures. None: a random key per process (URLs die with the process).
    signing_key: SecretStr | None = None

    _expand_directory = field_validator("directory")(_expand)


class EngineSettings(BaseModel):
    # "auto": every CUDA device, else the CPU. One worker runs per device.
    devices: list[str] = Field(default_factory=lambda: ["auto"])
    cache_dir: Path = Path(os.path.expanduser("~/.cache/darkroom"))
    # Threads torch may use on CPU (0 = torch's default).
    cpu_threads: int = 0

    _expand_cache = field_validator("cache_dir")(_expand)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DARKROOM_", env_nested_delimiter="__", extra="forbid"
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    models_dir: Path = REPO_ROOT / "models"
    # Manifest ids (or aliases) to serve; the first is the default for requests that name none.
    models: list[str] = Field(default_factory=lambda: ["darkroom/tiny-flux"])

    _expand_models_dir = field_validator("models_dir")(_expand)

    @field_validator("models")
    @classmethod
    def _at_least_one(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one model must be served")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = settings_cls.model_config.get("yaml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


def load_settings(config_file: Path | str | None = None) -> Settings:
    """Build the settings from a YAML file (or ``DARKROOM_CONFIG``) plus the environment."""
    path = config_file or os.environ.get("DARKROOM_CONFIG")
    if not path:
        return Settings()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": path})

    return _FromFile()
