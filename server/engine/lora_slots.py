"""Which layers LoRA hotswap slots cover, and what the slots cost.

A hotswap slot (server/engine/loras.py) is an always-present LoRA of rank ``loras.hotswap_target_rank`` on
each covered layer: it takes memory (rank x (in + out) parameters per layer) and runs on every call, LoRA
or not (two skinny matmuls per layer and token), because a compiled graph cannot skip it. So slots cover
only the layers FLUX.1 LoRAs train:

- diffusers' FLUX.1 LoRA trainer (examples/dreambooth/train_dreambooth_lora_flux.py, default
  ``target_modules``): ``attn.to_q/to_k/to_v/to_out.0``, ``attn.add_q_proj/add_k_proj/add_v_proj``,
  ``attn.to_add_out``, ``ff.net.0.proj``, ``ff.net.2``, ``ff_context.net.0.proj``, ``ff_context.net.2``
  (``attn.to_q/k/v`` also match the single blocks' attention);
- kohya / ai-toolkit LoRAs in BFL's layout also train the single blocks' ``linear1`` and ``linear2``, which
  diffusers converts to ``attn.to_q/k/v`` + ``proj_mlp`` and ``proj_out``;
- FLUX.2 names its feed-forwards ``ff.linear_in`` / ``ff.linear_out`` (and ``ff_context.*``), and its single
  blocks' fused projections ``attn.to_qkv_mlp_proj`` and ``attn.to_out``: they are in the list too (the
  names of one family match nothing in the other).

Not covered by default: the modulation layers (FLUX.1's ``norm1.linear``, ``norm1_context.linear``,
``norm.linear``, up to 3072 x 18432 each; FLUX.2's shared ``*_modulation.linear``) and the embedders. A
LoRA with weights there is refused with a 400 naming the setting that widens the slots
(``loras.hotswap_target_modules``).

A target matches a Linear layer inside ``transformer_blocks.N`` or ``single_transformer_blocks.N`` whose
name within the block is the target or ends with ``.`` + the target (peft's rule, kept inside blocks so
``proj_out`` does not also catch the transformer's final projection).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import DEFAULT_HOTSWAP_TARGETS

DEFAULT_TARGETS: tuple[str, ...] = DEFAULT_HOTSWAP_TARGETS

_BLOCK = re.compile(r"^(?:transformer_blocks|single_transformer_blocks)\.\d+\.(?P<inner>.+)$")


def covered(name: str, targets: Sequence[str]) -> bool:
    """Whether the transformer layer ``name`` (e.g. ``transformer_blocks.3.attn.to_q``) gets a slot."""
    match = _BLOCK.match(name)
    if match is None:
        return False
    inner = match["inner"]
    return any(inner == t or inner.endswith("." + t) for t in targets)


def slot_layers(transformer: torch.nn.Module, targets: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The Linear layers of ``transformer`` the slots cover, by name (peft wrappers: their base layer)."""
    layers: dict[str, torch.nn.Linear] = {}
    for name, module in transformer.named_modules():
        if name.endswith(".base_layer") or not covered(name, targets):
            continue
        while hasattr(module, "base_layer"):  # a layer already holding adapters is a peft wrapper
            module = module.base_layer
        if isinstance(module, torch.nn.Linear):
            layers[name] = module
    return layers


@dataclass(frozen=True)
class SlotCost:
    """One slot of a rank on a set of layers: how many layers, and its parameters (= its multiply-adds per
    token through all of them: rank x (in + out) per layer)."""

    layers: int
    params_per_slot: int

    @classmethod
    def of(cls, layers: dict[str, torch.nn.Linear], rank: int) -> SlotCost:
        """The size of one slot of ``rank`` on ``layers`` (``slot_layers``; a ``meta`` module's work too)."""
        return cls(layers=len(layers),
                   params_per_slot=sum(rank * (m.in_features + m.out_features) for m in layers.values()))

    def bytes(self, slots: int, bytes_per_param: int = 2) -> int:
        return self.params_per_slot * slots * bytes_per_param
