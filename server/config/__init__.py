"""One typed settings object for the whole server.

Values come, highest priority first, from ``DARKROOM_*`` environment variables (nested with ``__``, e.g.
``DARKROOM_QUEUE__MAX_JOBS=32``), then the YAML file given with ``--config`` (or ``DARKROOM_CONFIG``),
then the defaults of each section, which are the embedded default: the tiny FLUX model on this machine's CPU.
The object is built once at start-up and passed down; nothing deeper reads the environment.

Both processes import it. The sections live by subject: processes.py (server, limits, queue, scheduler,
worker, engine, storage), inputs.py (fetch, loras), safety.py (safety, and ``WeightsSource``), auth.py (auth);
``from server.config import X`` names any of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from .auth import ApiKeySpec, AuthSettings
from .inputs import DEFAULT_HOTSWAP_TARGETS, FetchSettings, LoraSettings
from .processes import (
    REPO_ROOT,
    EngineSettings,
    LimitSettings,
    QueueSettings,
    S3Settings,
    SchedulerSettings,
    ServerSettings,
    StorageSettings,
    WorkerSettings,
    expand_path,
)
from .safety import (
    DEFAULT_PROMPT_BLOCKLIST,
    DEFAULT_PROMPT_PATTERNS,
    CheckerSource,
    ImageCheckerSpec,
    PromptCheckSettings,
    SafetySettings,
    TextClassifierSpec,
    WeightsSource,
)

__all__ = [
    "DEFAULT_HOTSWAP_TARGETS", "DEFAULT_PROMPT_BLOCKLIST", "DEFAULT_PROMPT_PATTERNS", "REPO_ROOT", "ApiKeySpec", "AuthSettings",
    "CheckerSource", "EngineSettings", "FetchSettings", "ImageCheckerSpec", "LimitSettings", "LoraSettings",
    "PromptCheckSettings", "QueueSettings", "S3Settings", "SafetySettings", "SchedulerSettings",
    "ServerSettings", "Settings", "StorageSettings", "TextClassifierSpec", "WeightsSource", "WorkerSettings",
    "load_settings",
]


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
    safety: SafetySettings = Field(default_factory=SafetySettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    loras: LoraSettings = Field(default_factory=LoraSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    models_dir: Path = REPO_ROOT / "models"
    # Manifest ids (or aliases) to serve; the first is the default for requests that name none.
    models: list[str] = Field(default_factory=lambda: ["darkroom/tiny-flux"])

    _expand_models_dir = field_validator("models_dir")(expand_path)

    @model_validator(mode="before")
    @classmethod
    def _key_store_permissions(cls, data: object) -> object:
        """With a key store, each key's disable_safety_checker permission replaces safety.disable_keys."""
        if not isinstance(data, dict):
            return data
        auth, safety = data.get("auth"), data.get("safety")
        if isinstance(auth, AuthSettings):
            configured = auth.store_configured
        else:
            configured = isinstance(auth, dict) and bool(auth.get("keys") or auth.get("keys_file"))
        if configured and isinstance(safety, dict) and "key_permissions" not in safety:
            data = {**data, "safety": {**safety, "key_permissions": True}}
        return data

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
