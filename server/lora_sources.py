"""Where an ``image_loras`` path points: a registered name, a Hugging Face repo or file URL, or any URL.

Torch-free and I/O-free; the LoRA store (server/loras.py) fetches what a ``Source`` names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import LoraSettings

HUB_HOSTS = ("huggingface.co", "hf.co", "www.huggingface.co")
# Diffusers' own file name for a LoRA saved by its training scripts: preferred in a repo.
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"


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
