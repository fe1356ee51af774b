"""What a request may bring in from elsewhere: remote URLs (``fetch``) and LoRA files (``loras``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .processes import valid_networks


class FetchSettings(BaseModel):
    """The guarded fetcher (server/fetch.py, server/addresses.py): what a remote URL in a request may point
    at, and limits."""

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
    # Longest silence from the origin (connecting, waiting for headers, between body reads).
    read_timeout_s: float = 10.0
    # Average body rate an origin must keep once rate_grace_s have passed (a drip of a byte a second is
    # cut long before timeout_s); 0: no minimum.
    min_bytes_per_s: int = 16_384
    rate_grace_s: float = 5.0
    max_redirects: int = 3
    # Downloads at once in a process (in the API: image_url, reference_images and LoRA prefetches together,
    # in their own threads); when all are busy a request waits at most slot_wait_s, then 429 fetch_busy.
    max_concurrent: int = 16
    slot_wait_s: float = 1.0
    # Downloads one API key may have in progress at once in the API; more: 429 fetch_busy at once.
    max_per_key: int = 8
    # Width x height of a fetched image, checked from its header before it is decoded: 4096 x 4096, four
    # times the largest output (limits.max_pixels), so a phone photo fits.
    max_pixels: int = 16_777_216
    # Memory one decode may take: pixels x bytes per pixel (as Pillow stores the mode) x the copies its
    # conversion to RGB makes, checked before decoding; decodes run at most max_concurrent_decodes at once
    # (data: URLs included), so decoding takes at most about their product.
    max_decode_bytes: int = 160_000_000
    max_concurrent_decodes: int = 2
    # In-memory LRU of decoded images keyed by URL (data: URLs are not cached).
    cache_entries: int = 64
    cache_bytes: int = 256_000_000
    cache_ttl_s: float = 300.0

    _valid_cidrs = field_validator("allow_cidrs")(valid_networks)


# The layers LoRAs train, where hotswap slots go (engine/lora_slots.py). FLUX.1: diffusers' FLUX LoRA
# trainer's target_modules, plus the single blocks' proj_mlp / proj_out that kohya's linear1 / linear2
# become. FLUX.2: the same attention projections, its feed-forwards (linear_in / linear_out) and the single
# blocks' fused attn.to_qkv_mlp_proj / attn.to_out. Neither family's modulation layers or embedders.
DEFAULT_HOTSWAP_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    "attn.to_qkv_mlp_proj", "attn.to_out",
)


class UploadSettings(BaseModel):
    """Multipart bodies (``POST /v1/images/edits``, server/api/multipart.py): what one request may upload.
    One file may be at most ``fetch.max_bytes`` (the limit of a fetched image); its pixels are checked as a
    fetched image's are (``fetch.max_pixels``)."""

    model_config = ConfigDict(extra="forbid")

    # The whole body, all files together.
    max_bytes: int = Field(default=25_000_000, ge=1)
    max_parts: int = Field(default=64, ge=1)
    # One text field (a prompt is at most limits.max_prompt_chars characters, up to 4 bytes each).
    max_field_bytes: int = Field(default=65_536, ge=1)
    # The headers of one part.
    max_header_bytes: int = Field(default=8192, ge=64)


class LoraSettings(BaseModel):
    """``image_loras``: per-request LoRAs by URL or registered name (server/loras.py,
    server/engine/adapters.py)."""

    model_config = ConfigDict(extra="forbid")

    # LoRAs in one request, and the range a scale must lie in.
    max_count: int = 4
    min_scale: float = -2.0
    max_scale: float = 2.0
    # A LoRA file larger than this is refused (checked while downloading, from the header's sizes first).
    max_file_bytes: int = 1_000_000_000
    # A safetensors header (tensor names, shapes, __metadata__) longer than this is refused before it is read,
    # and one of more tensors than max_tensors while it is parsed (its parse costs about 1 KB a tensor).
    max_header_bytes: int = 16_000_000
    max_tensors: int = 20_000
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
    # (9.7% before; `python scripts/hotswap_cost.py`). A request takes at most hotswap_slots LoRAs
    # (Together's own limit is 2); LoRAs of a higher rank, with text-encoder weights or with weights on
    # layers outside the slots are refused with a 400. A model that compiles its transformer always uses
    # slots, whatever this says (engine/adapters.py).
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
        if not 2 <= self.max_header_bytes <= 100_000_000:
            raise ValueError("loras.max_header_bytes must be between 2 and 100000000 (safetensors' own cap)")
        if self.max_tensors < 1:
            raise ValueError("loras.max_tensors must be >= 1")
        if self.hotswap_target_rank < 1 or self.hotswap_slots < 1 or not self.hotswap_target_modules:
            raise ValueError("loras.hotswap_target_rank and loras.hotswap_slots must be >= 1, and "
                             "loras.hotswap_target_modules must name at least one layer")
        return self

    def max_per_request(self, hotswap: bool | None = None) -> int:
        """LoRAs one request may name: max_count, and with hotswap slots (``loras.hotswap``, or a model
        that compiles its transformer) at most one per slot."""
        slotted = self.hotswap if hotswap is None else hotswap
        return min(self.max_count, self.hotswap_slots) if slotted else self.max_count
