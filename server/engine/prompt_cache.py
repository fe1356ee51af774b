"""The prompt-embedding cache of one engine: a repeated prompt skips the text encoders.

FLUX encodes every prompt with CLIP-L (the pooled vector) and T5-XXL (one vector per token, padded to
``max_sequence_length``); on a GPU T5-XXL is ~5 TFLOP per prompt. The cache keeps both outputs per prompt, on
the device, least recently used first out, within ``engine.prompt_cache_bytes`` (0: off). A FLUX T5 row at 512
tokens in bf16 is 4 MiB, so the default 256 MiB keeps 64 prompts.

The key is (model, prompt, max_sequence_length (the sequence bucket), the batch's LoRA set with its scales):
a LoRA may carry text-encoder weights (CLIP, server/engine/adapters.py), which change the embeddings, so
every LoRA set has embeddings of its own. Prompts missing from the cache are encoded in one
``pipe.encode_prompt`` call (diffusers ``FluxPipeline.encode_prompt``, the call the pipeline makes itself when
given strings), each once however many images use it; the pipeline then gets ``prompt_embeds`` and
``pooled_prompt_embeds`` instead of strings. Called from the device thread only; ``stats`` from anywhere.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import torch

Key = tuple[str, str, int, Hashable]


class PromptCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[Key, tuple[torch.Tensor, torch.Tensor, int]] = OrderedDict()
        self._lock = threading.Lock()  # stats() reads from the /metrics thread
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"prompt_cache_hits": self.hits, "prompt_cache_misses": self.misses,
                    "prompt_cache_evictions": self.evictions, "prompt_cache_bytes": self.bytes,
                    "prompt_cache_entries": len(self._entries)}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def embeddings(self, pipe: Any, model: str, prompts: Sequence[str], max_sequence_length: int,
                   loras: Hashable, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompt_embeds`` [len(prompts), max_sequence_length, dim] and ``pooled_prompt_embeds``
        [len(prompts), pooled_dim] for ``prompts`` (one row per image), from the cache where it can."""
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        missing: list[str] = []
        with self._lock:
            for prompt in dict.fromkeys(prompts):
                entry = self._entries.get((model, prompt, max_sequence_length, loras))
                if entry is None:
                    missing.append(prompt)
                    self.misses += 1
                else:
                    self._entries.move_to_end((model, prompt, max_sequence_length, loras))
                    found[prompt] = (entry[0], entry[1])
                    self.hits += 1
        if missing:
            embeds, pooled, _text_ids = pipe.encode_prompt(
                prompt=missing, prompt_2=None, device=device, num_images_per_prompt=1,
                max_sequence_length=max_sequence_length,
            )
            for i, prompt in enumerate(missing):
                # Own copies: a row of the call's tensor would keep the whole tensor alive.
                row, pooled_row = embeds[i].clone(), pooled[i].clone()
                found[prompt] = (row, pooled_row)
                self._put((model, prompt, max_sequence_length, loras), row, pooled_row)
        return (torch.stack([found[p][0] for p in prompts]), torch.stack([found[p][1] for p in prompts]))

    def _put(self, key: Key, row: torch.Tensor, pooled: torch.Tensor) -> None:
        size = row.numel() * row.element_size() + pooled.numel() * pooled.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[2]
            while self._entries and self.bytes + size > self.max_bytes:
                _key, (_r, _p, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted
                self.evictions += 1
            self._entries[key] = (row, pooled, size)
            self.bytes += size
