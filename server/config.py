"""One typed settings object for the whole server.

Values come, highest priority first, from ``DARKROOM_*`` environment variables (nested with ``__``, e.g.
``DARKROOM_QUEUE__MAX_JOBS=32``), then the YAML file given with ``--config`` (or ``DARKROOM_CONFIG``),
then the defaults below, which are the embedded default: the tiny FLUX model on this machine's CPU.
The object is built once at start-up and passed down; nothing deeper reads the environment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
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
    # text: one human-readable line per event; json: one JSON object per line (server/logs.py).
    log_format: Literal["text", "json"] = "text"


class LimitSettings(BaseModel):
    """Server-wide ceilings; a model manifest can only lower them."""

    max_n: int = 4
    max_steps: int = 50
    max_width: int = 2048
    max_height: int = 2048
    max_pixels: int = 2048 * 2048
    max_prompt_chars: int = 4000


class QueueSettings(BaseModel):
    # memory: one process (`darkroom serve`). redis: API pods and worker pods share a Redis Stream.
    backend: Literal["memory", "redis"] = "memory"
    # Jobs waiting (not yet running) before new requests are answered 429; with Redis, counted across
    # every API pod (the stream's undelivered entries).
    max_jobs: int = 256
    retry_after_s: int = 1
    # -- backend: redis (server/queue_redis.py) --
    # A password belongs in the URL from a Secret: DARKROOM_QUEUE__REDIS_URL=redis://:PASS@host:6379/0
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every key (stream, reply lists, job state) starts with this; pods sharing it share one queue.
    key_prefix: str = "darkroom"
    # A job held this long by a worker that stopped heart-beating is claimed by another worker.
    visibility_timeout_s: float = 30.0
    # Starts per job (the first run plus re-runs after its worker died); then it fails with a 500.
    max_attempts: int = 2
    # An API pod stops waiting for a started job this long after its start deadline (all workers gone).
    max_run_s: float = 600.0

    @model_validator(mode="after")
    def _positive(self) -> QueueSettings:
        if self.max_attempts < 1 or self.visibility_timeout_s <= 0:
            raise ValueError("queue.max_attempts must be >= 1 and queue.visibility_timeout_s > 0")
        return self


class SchedulerSettings(BaseModel):
    # How long the worker waits for compatible jobs to fill a batch; a lone job never waits longer.
    batch_window_ms: float = 5.0
    max_batch_images: int = 8


def _expand(path: Path) -> Path:
    return path.expanduser()


class S3Settings(BaseModel):
    """S3-compatible object storage (AWS S3, MinIO, R2, GCS interop). Credentials are never here: boto3's
    standard chain supplies them (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a web identity, a profile)."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = ""
    prefix: str = "images/"
    endpoint_url: str | None = None        # None: AWS; else e.g. http://minio.storage:9000
    # Base the presigned URLs are made for, when clients reach the store by another name than pods do.
    public_endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    # At start-up, add/replace a lifecycle rule expiring objects under prefix after retention_s (in whole
    # days, at least 1); needs s3:GetLifecycleConfiguration and s3:PutLifecycleConfiguration.
    lifecycle_rule: bool = False
    # Delete objects older than retention_s from the API's periodic sweep (stores without lifecycle rules).
    sweep: bool = False


class StorageSettings(BaseModel):
    # local: a directory served back by the API. s3: presigned URLs of an S3-compatible bucket.
    backend: Literal["local", "s3"] = "local"
    directory: Path = REPO_ROOT / "var" / "images"
    # How long a signed URL stays valid, and how long a stored image is kept on disk.
    url_ttl_s: int = 3600
    retention_s: int = 3600
    cleanup_interval_s: float = 60.0
    # HMAC key for URL signatures. None: a random key per process (URLs die with the process).
    signing_key: SecretStr | None = None
    s3: S3Settings = Field(default_factory=S3Settings)

    _expand_directory = field_validator("directory")(_expand)

    @model_validator(mode="after")
    def _bucket_for_s3(self) -> StorageSettings:
        if self.backend == "s3" and not self.s3.bucket:
            raise ValueError("storage.backend: s3 needs storage.s3.bucket")
        return self


class WorkerSettings(BaseModel):
    """`darkroom worker`: a process taking jobs from Redis for the GPUs in engine.devices."""

    model_config = ConfigDict(extra="forbid")

    # Consumer name in the Redis group; None: <hostname>-<pid>. Suffixed with the device.
    name: str | None = None
    # /health and /ready for probes; port 0: no listener.
    health_host: str = "0.0.0.0"
    health_port: int = 0
    # On SIGTERM: how long to wait for the batch in hand before exiting anyway.
    shutdown_timeout_s: float = 60.0


class FetchSettings(BaseModel):
    """The guarded fetcher (server/fetch.py): what a remote URL in a request may point at, and limits."""

    allowed_schemes: list[Literal["https", "http", "data"]] = Field(
        default_factory=lambda: ["https", "http", "data"]
    )
    # Hosts (exact names, case-insensitive) and networks exempt from the private-address refusal,
    # e.g. an internal image host. Everything else must resolve to public addresses only.
    allow_hosts: list[str] = Field(default_factory=list)
    allow_cidrs: list[str] = Field(default_factory=list)
    max_bytes: int = 20_000_000
    # Whole fetch, redirects included (DNS, connect, headers, body).
    timeout_s: float = 15.0
    max_redirects: int = 3
    max_concurrent: int = 8
    # Width x height of a fetched image, checked from its header before it is decoded.
    max_pixels: int = 40_000_000
    # In-memory LRU of decoded images keyed by URL (data: URLs are not cached).
    cache_entries: int = 64
    cache_bytes: int = 256_000_000
    cache_ttl_s: float = 300.0

    @field_validator("allow_cidrs")
    @classmethod
    def _valid_cidrs(cls, value: list[str]) -> list[str]:
        import ipaddress

        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value


# The layers FLUX.1 LoRAs train (diffusers' FLUX LoRA trainer's target_modules, plus the single blocks'
# proj_mlp / proj_out that kohya's linear1 / linear2 become): where hotswap slots go (engine/lora_slots.py).
DEFAULT_HOTSWAP_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
)


class LoraSettings(BaseModel):
    """``image_loras``: per-request LoRAs by URL or registered name (server/loras.py, server/engine/loras.py)."""

    model_config = ConfigDict(extra="forbid")

    # LoRAs in one request, and the range a scale must lie in.
    max_count: int = 4
    min_scale: float = -2.0
    max_scale: float = 2.0
    # A LoRA file larger than this is refused (checked while downloading).
    max_file_bytes: int = 1_000_000_000
    # Downloaded files: a disk cache keyed by the request's path, least recently used evicted first.
    cache_bytes: int = 20_000_000_000
    # None: <engine.cache_dir>/loras
    cache_dir: Path | None = None
    # Adapters kept loaded per model on each device (least recently used unloaded first).
    max_resident: int = 8
    # One LoRA download (the guarded fetcher's limits apply, with this deadline instead of fetch.timeout_s).
    download_timeout_s: float = 600.0
    # Hugging Face endpoint for repo URLs (https://huggingface.co/owner/repo): file lists and downloads go
    # here; a mirror replaces huggingface.co in every Hub URL a request names.
    hub_url: str = "https://huggingface.co"
    # Operator-registered LoRAs: a request may name one instead of a URL; name -> local .safetensors file.
    registered: dict[str, Path] = Field(default_factory=dict)
    # The API downloads and checks a request's LoRAs before queueing it (a bad file is a 400 at once). Turn
    # off on API pods that do not share a disk with the workers: the worker fetches every LoRA itself anyway.
    prefetch: bool = True
    # Load LoRAs into hotswap_slots fixed adapter slots with diffusers' hotswap, so a compiled transformer
    # never recompiles when the LoRA set changes. Each slot is a rank-hotswap_target_rank LoRA on every
    # layer named by hotswap_target_modules (server/engine/lora_slots.py), resident and computed on every
    # call: on FLUX.1, 2 slots at rank 32 on the default layers hold 261 M parameters (0.49 GiB in bf16; the
    # old 4 x rank 64 on all 504 Linears: 2.6 GiB) and add 2.4% to the transformer FLOPs at 1024x1024
    # (9.7% before; `python scripts/hotswap_cost.py`). A request takes at most
    # hotswap_slots LoRAs (Together's own limit is 2); LoRAs of a higher rank, with text-encoder weights or
    # with weights on layers outside the slots are refused with a 400.
    hotswap: bool = False
    hotswap_slots: int = 2
    hotswap_target_rank: int = 32
    hotswap_target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_HOTSWAP_TARGETS))

    @field_validator("registered")
    @classmethod
    def _expand_registered(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name in value:
            if "://" in name or not name.strip():
                raise ValueError(f"registered LoRA name {name!r} must not be empty or look like a URL")
        return {name: path.expanduser() for name, path in value.items()}

    @model_validator(mode="after")
    def _consistent(self) -> LoraSettings:
        if self.max_count < 1 or self.min_scale > self.max_scale:
            raise ValueError("loras.max_count must be >= 1 and loras.min_scale <= loras.max_scale")
        if self.max_resident < self.max_count:
            raise ValueError("loras.max_resident must be at least loras.max_count")
        if self.max_file_bytes > self.cache_bytes:
            raise ValueError("loras.max_file_bytes must not exceed loras.cache_bytes")
        if self.hotswap_target_rank < 1 or self.hotswap_slots < 1 or not self.hotswap_target_modules:
            raise ValueError("loras.hotswap_target_rank and loras.hotswap_slots must be >= 1, and "
                             "loras.hotswap_target_modules must name at least one layer")
        return self

    @property
    def max_per_request(self) -> int:
        """LoRAs one request may name: max_count, and with hotswap at most one per slot."""
        return min(self.max_count, self.hotswap_slots) if self.hotswap else self.max_count


class EngineSettings(BaseModel):
    # "auto": every CUDA device, else the CPU. One worker runs per device.
    devices: list[str] = Field(default_factory=lambda: ["auto"])
    cache_dir: Path = Path(os.path.expanduser("~/.cache/darkroom"))
    # Threads torch may use on CPU (0 = torch's default).
    cpu_threads: int = 0
    # false: `darkroom serve`/`worker` refuse to start a model whose Hub weights are not in the local Hub
    # cache (fetch them with `darkroom pull MODEL`); true: from_pretrained downloads them while loading.
    allow_downloads: bool = False
    # Compiled kernels (inductor's FX graph cache) of models with engine.compile, kept across restarts so
    # a restart loads kernels instead of compiling; None: <cache_dir>/inductor. Put it on a writable volume
    # when cache_dir is a read-only weights volume. A model's compile.cache_dir overrides it.
    compile_cache_dir: Path | None = None
    # After warm-up, torch.compiler.set_stance("fail_on_recompile"): a request whose shape the warm-up did
    # not compile fails with a 400 naming the cause, instead of compiling (stalling its batch for seconds
    # to minutes). Off: such a request compiles, and /ready and /metrics count it as a recompile.
    fail_on_recompile: bool = False

    _expand_cache = field_validator("cache_dir")(_expand)

    @field_validator("compile_cache_dir")
    @classmethod
    def _expand_compile_cache(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class CheckerSource(BaseModel):
    """Where a safety model's weights come from: exactly one of a Hub id, a local folder, a tiny builtin."""

    model_config = ConfigDict(extra="forbid")

    hub: str | None = None
    revision: str | None = None
    path: Path | None = None
    builtin: Literal["tiny-sd-safety-checker", "tiny-nsfw-vit", "tiny-text-classifier"] | None = None
    # Folders inside the repo/folder, as in a Stable Diffusion pipeline ("safety_checker",
    # "feature_extractor"); None: the weights and the image processor sit at the top.
    subfolder: str | None = None
    processor_subfolder: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> CheckerSource:
        if len([x for x in (self.hub, self.path, self.builtin) if x is not None]) != 1:
            raise ValueError("a checker source needs exactly one of hub, path, builtin")
        return self


class ImageCheckerSpec(BaseModel):
    """The image stage: a model run once per batch on the decoded images, before encoding.

    ``sd-safety-checker``: diffusers' StableDiffusionSafetyChecker (CLIP concept checker); an image is
    flagged when a concept score (cosine similarity minus the concept's threshold, plus ``adjustment``)
    is above 0, exactly as diffusers scores it; raise ``adjustment`` for a stricter filter.
    ``image-classification``: a transformers image classifier; flagged when the probability of
    ``label`` is at least ``threshold``. ``none``: no image stage.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["sd-safety-checker", "image-classification", "none"]
    source: CheckerSource | None = None
    label: str = "nsfw"
    threshold: float = 0.5
    adjustment: float = 0.0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="after")
    def _source_given(self) -> ImageCheckerSpec:
        if self.format != "none" and self.source is None:
            raise ValueError(f"an image checker of format {self.format!r} needs a source")
        return self


class TextClassifierSpec(BaseModel):
    """A transformers text-classification model for prompts: flagged when P(label) >= threshold."""

    model_config = ConfigDict(extra="forbid")

    source: CheckerSource
    label: str = "nsfw"
    threshold: float = 0.5
    max_length: int = 512
    device: str = "cpu"


# Prompts that ask for sexual content involving minors. Operators replace or extend these lists.
_MINOR = r"(child|children|kids?|minors?|underage|under-age|preteens?|pre-teens?|toddlers?|infants?)"
_SEXUAL = r"(nude|naked|nudity|porn\w*|sexual\w*|sex|explicit|lewd|erotic\w*|nsfw)"
DEFAULT_PROMPT_BLOCKLIST = ["child porn", "child pornography", "csam", "lolicon", "shotacon"]
DEFAULT_PROMPT_PATTERNS = [rf"\b{_MINOR}\b.*\b{_SEXUAL}\b", rf"\b{_SEXUAL}\b.*\b{_MINOR}\b"]


class PromptCheckSettings(BaseModel):
    """The prompt stage, run in the API before a job is queued (no GPU work for a flagged prompt)."""

    model_config = ConfigDict(extra="forbid")

    # Words or phrases matched whole and case-insensitively (any run of spaces matches a space).
    blocklist: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPT_BLOCKLIST))
    # Python regular expressions, searched case-insensitively.
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPT_PATTERNS))
    classifier: TextClassifierSpec | None = None

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return value


class SafetySettings(BaseModel):
    """The safety checker: on by default; ``disable_safety_checker`` needs the operator's consent."""

    model_config = ConfigDict(extra="forbid")

    # Off: no stage runs for anyone, and disable_safety_checker is accepted as a no-op.
    enabled: bool = True
    # Who may send disable_safety_checker: true: nobody (403), everybody, or the keys in disable_keys.
    allow_disable: Literal["never", "always", "per_key"] = "never"
    disable_keys: list[SecretStr] = Field(default_factory=list)
    # Set for you when auth.keys / auth.keys_file configure a key store: with per_key, a key from the store
    # is allowed by its own disable_safety_checker permission, and disable_keys may be empty.
    key_permissions: bool = False
    prompt: PromptCheckSettings = Field(default_factory=PromptCheckSettings)
    # The image checker for every model; None: each model's manifest names its own (safety.image_checker).
    image_checker: ImageCheckerSpec | None = None

    @model_validator(mode="after")
    def _keys_for_per_key(self) -> SafetySettings:
        if self.allow_disable == "per_key" and not self.disable_keys and not self.key_permissions:
            raise ValueError("safety.allow_disable: per_key needs safety.disable_keys "
                             "(or API keys with disable_safety_checker in auth.keys / auth.keys_file)")
        return self


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

    _expand_models_dir = field_validator("models_dir")(_expand)

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
