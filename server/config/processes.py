"""Settings of the processes themselves: where they listen, how the queue, scheduler, workers, engine and
image storage behave, and the server-wide request limits (``server``, ``limits``, ``queue``, ``scheduler``,
``worker``, ``engine``, ``storage``)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parents[2]


def expand_path(path: Path) -> Path:
    return path.expanduser()


def valid_networks(value: list[str]) -> list[str]:
    """Each entry an IP network in CIDR notation, IPv4 or IPv6 (a bare address is its /32 or /128);
    ``ValueError`` (a settings error naming the field) otherwise."""
    for network in value:
        ipaddress.ip_network(network, strict=False)
    return value


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    # Base of the image URLs handed to clients; None means "the URL the client used to reach us".
    public_url: str | None = None
    # Bearer keys. Empty means any key is accepted (the SDKs refuse to start without one).
    api_keys: list[SecretStr] = Field(default_factory=list)
    # Without any key (api_keys, auth.keys, auth.keys_file), `darkroom serve` / `api` refuse to listen on
    # an address other than loopback unless this is true (server/cli.py).
    allow_anonymous: bool = False
    # GET /openapi.json and the Swagger UI at /docs, served without a key; false: neither route exists.
    api_docs: bool = True
    # A job that has not started by this many seconds after arrival is answered 504 and never runs.
    request_timeout_s: float = 300.0
    max_body_bytes: int = 1_000_000
    # Request bodies the API holds at once, all requests together (JSON bodies and edit uploads): a body
    # reserves its Content-Length (its limit when chunked) before it is read and keeps it until answered;
    # past the budget, 503 `server_busy` with retry-after within slot_wait_s. Each body byte costs about 3x
    # while its images are decoded (base64 text, bytes, pixels). One request larger than it still runs alone.
    max_inflight_body_bytes: int = Field(default=200_000_000, ge=1)
    # What a request without response_format gets; Together answers with a URL.
    default_response_format: Literal["url", "base64"] = "url"
    log_level: str = "INFO"
    # text: one human-readable line per event; json: one JSON object per line (server/logs.py).
    log_format: Literal["text", "json"] = "text"
    # -- where image URLs point (server/api/hosts.py); the Host header never goes into a URL --
    # Host names this server answers to ("*.example.com" matches subdomains); others get 400. Empty: any.
    allowed_hosts: list[str] = Field(default_factory=list)
    # Reverse proxies (addresses or CIDRs) whose X-Forwarded-Proto/-Host/-Port set the image URLs' base when
    # public_url is unset; from anyone else these headers are ignored and the bound address is used.
    trusted_proxies: list[str] = Field(default_factory=list)
    # -- the HTTP layer (uvicorn with h11, server/api/http.py); a reverse proxy should enforce these too --
    # Request line + headers; more: 431.
    max_header_bytes: int = 32_768
    # To receive a request's line and headers (from the connection's start, or the previous response);
    # then 408 and the connection is closed.
    header_timeout_s: float = 10.0
    # Longest silence while a request body arrives, and the whole body; then 408 and close.
    body_read_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    # Idle keep-alive connections are closed after this (uvicorn's timeout_keep_alive).
    keep_alive_timeout_s: float = 5.0
    # Open connections (server/api/http.py): past it the oldest connection serving no request (idle, or a
    # head still arriving) is closed to make room, else the new one gets 503 server_busy with retry-after.
    max_connections: int = Field(default=1024, ge=1)
    # Longest a request waits for a slot in one of the API's bounded executors (downloads, image decodes,
    # the prompt classifier) before 429 with retry-after.
    slot_wait_s: float = 1.0

    _valid_networks = field_validator("trusted_proxies")(valid_networks)


class LimitSettings(BaseModel):
    """Server-wide ceilings; a model manifest can only lower them (its ``limits``, server/registry.py
    ``ModelLimits``, are these fields plus the per-model ones)."""

    max_n: int = 4
    max_steps: int = 50
    max_width: int = 2048
    max_height: int = 2048
    max_pixels: int = 2048 * 2048
    max_prompt_chars: int = 4000

class QueueSettings(BaseModel):
    # memory: one process (`darkroom serve`). redis: API pods and worker pods share a Redis Stream.
    backend: Literal["memory", "redis"] = "memory"
    # Jobs waiting (not yet running) before new requests are answered 503 (overloaded); with Redis, counted
    # across every API pod (the stream's undelivered entries).
    max_jobs: int = 256
    retry_after_s: int = 1
    # -- backend: redis (server/queue/redis_api.py, server/queue/redis_worker.py) --
    # A password belongs in the URL from a Secret: DARKROOM_QUEUE__REDIS_URL=redis://:PASS@host:6379/0
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every key (stream, reply lists, job state) starts with this; pods sharing it share one queue.
    key_prefix: str = "darkroom"
    # A job held this long by a worker that stopped heart-beating is claimed by another worker.
    visibility_timeout_s: float = 30.0
    # Starts per job (the first run plus re-runs after its worker died); then it fails with a 500.
    max_attempts: int = 2
    # The run deadline, the same on both backends: a pipeline call running longer is answered 504 and its
    # worker marked not ready (server/worker/loop.py); an API pod on Redis also stops waiting for a started
    # job this long after its start deadline (all workers gone). 0: no deadline in the worker.
    max_run_s: float = 600.0
    # Longest an API request waits on Redis (enqueue, withdrawal, the rate limiter); then 503 + retry-after.
    redis_timeout_s: float = 2.0
    # Connections an API process opens to Redis for requests; past it, 503 at once.
    redis_max_connections: int = 64

    @model_validator(mode="after")
    def _positive(self) -> QueueSettings:
        if self.max_attempts < 1 or self.visibility_timeout_s <= 0 or self.redis_timeout_s <= 0:
            raise ValueError("queue.max_attempts must be >= 1, queue.visibility_timeout_s and "
                             "queue.redis_timeout_s > 0")
        return self


class SchedulerSettings(BaseModel):
    # How long the worker waits for compatible jobs to fill a batch; a lone job never waits longer.
    batch_window_ms: float = 5.0
    max_batch_images: int = Field(default=8, ge=1)
    # The most pixels one pipeline call may hold (images x width x height): batches of large images stay
    # small (8 MP: 8 images at 1024x1024, 2 at 2048x2048), bounding the transformer's activations and the
    # VAE's work per call. A lone request always runs whole (its n is bounded by the model's max_n).
    # null: no pixel cap.
    max_batch_pixels: int | None = Field(default=8 * 1024 * 1024, ge=64 * 64)
    # In-process queue: wait the window only while another job is expected (a request is being received, or
    # recent arrivals came in bursts), so a lone request on a quiet server starts at once
    # (server/queue/batching.py). false: always wait the full window.
    adaptive_window: bool = True


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

    _expand_directory = field_validator("directory")(expand_path)

    @model_validator(mode="after")
    def _bucket_for_s3(self) -> StorageSettings:
        if self.backend == "s3" and not self.s3.bucket:
            raise ValueError("storage.backend: s3 needs storage.s3.bucket")
        return self

class WorkerSettings(BaseModel):
    """The device workers (server/worker/): how each runs beside its device, in `darkroom serve` and in
    `darkroom worker` (a process taking jobs from Redis for the GPUs in engine.devices)."""

    model_config = ConfigDict(extra="forbid")

    # Consumer name in the Redis group; None: <hostname>-<pid>. Suffixed with the device.
    name: str | None = None
    # /health and /ready for probes; port 0: no listener.
    health_host: str = "0.0.0.0"
    health_port: int = 0
    # On SIGTERM: how long to wait for the batch in hand before exiting anyway.
    shutdown_timeout_s: float = 60.0
    # -- beside the device loop (server/worker/post.py, server/worker/prefetch.py) --
    # Threads encoding finished images (and running the image safety screen's coordinator) per worker.
    post_threads: int = Field(default=2, ge=1)
    # Pipeline calls whose images may wait for encoding; when full the device waits, so memory stays flat.
    handoff_batches: int = Field(default=2, ge=1)
    # Threads downloading the LoRA files of batches that lack them, while the device runs other batches.
    prefetch_threads: int = Field(default=2, ge=1)
    # -- `darkroom serve` on several devices (server/worker/children.py) --
    # auto: one worker process per device when there are two or more devices, a thread for one device;
    # always: a worker process even for one device (a sticky CUDA error then restarts just that process);
    # never: worker threads in the server process (one GIL and one dynamo for every device: not for GPUs).
    processes: Literal["auto", "always", "never"] = "auto"
    # A worker process that died is started again after this many seconds, doubling up to the maximum
    # while it keeps dying before it is ready.
    restart_backoff_s: float = Field(default=1.0, gt=0)
    max_restart_backoff_s: float = Field(default=30.0, gt=0)

class EngineSettings(BaseModel):
    # "auto": every CUDA device, else the CPU. One worker runs per device.
    devices: list[str] = Field(default_factory=lambda: ["auto"])
    cache_dir: Path = Path(os.path.expanduser("~/.cache/darkroom"))
    # Threads torch may use on CPU (0 = torch's default).
    cpu_threads: int = 0
    # false: `darkroom serve`/`worker` refuse to start a model whose Hub weights are not in the local Hub
    # cache (fetch them with `darkroom pull MODEL`); true: from_pretrained downloads them while loading.
    allow_downloads: bool = False
    # The prompt-embedding cache of each engine (server/engine/prompt_cache.py): bytes of device memory for
    # the text encoders' outputs of recent prompts, so a repeated prompt skips them; 0 turns it off.
    prompt_cache_bytes: int = Field(default=256 * 2**20, ge=0)
    # Compiled kernels (inductor's FX graph cache) of models with engine.compile, kept across restarts so
    # a restart loads kernels instead of compiling; None: <cache_dir>/inductor. Put it on a writable volume
    # when cache_dir is a read-only weights volume. A model's compile.cache_dir overrides it.
    compile_cache_dir: Path | None = None
    # After warm-up, torch.compiler.set_stance("fail_on_recompile"): a request whose shape the warm-up did
    # not compile fails with a 400 naming the cause, instead of compiling (stalling its batch for seconds
    # to minutes). Off: such a request compiles, and /ready and /metrics count it as a recompile.
    fail_on_recompile: bool = False

    _expand_cache = field_validator("cache_dir")(expand_path)

    @field_validator("compile_cache_dir")
    @classmethod
    def _expand_compile_cache(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None
