"""What a LoRA file must pass before a device loads it: every check against the model, raising ``LoraError``
(a 400) for what is wrong with the file and nothing else.

Before anything is loaded, every tensor of the raw file is accounted for (applied, or refused by name:
server/lora_format.py), its values are checked for NaN and infinity, and the weights diffusers converts it
to are checked against the model: each must name a layer of the transformer (or CLIP text encoder) with
matching shapes, and no layer of the file may be lost in the conversion. So a LoRA with parts Darkroom cannot
apply, for another architecture, or one diffusers would "expand" the base model for, is refused and touches
nothing. In hotswap mode only what a slot holds passes (server/engine/adapters.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import LoraSettings
from ..lora_format import FLUX1, FLUX2, Loader, read_header
from ..loras import LoraError, format_error, shown_path
from ..safetensors_header import FormatError, Limits, check_finite, has_non_finite, non_finite_message

COMPONENTS = ("transformer", "text_encoder")
LORA_KEY = re.compile(
    r"^(?P<comp>transformer|text_encoder)\.(?P<module>.+?)\."
    r"(?:(?P<kind>lora_A|lora_B)\.(?P<param>weight|bias)|lora_magnitude_vector(?:\.weight)?)$"
)


@dataclass(frozen=True)
class LoraInfo:
    state_dict: dict[str, torch.Tensor]
    load_from_file: bool   # alphas or adapter metadata that only a load from the file applies
    text_encoder: bool
    rank: int


def inspect_lora(model_id: str, pipe: Any, file: Path, path: str, limits: Limits, *, hotswap: bool,
                 settings: LoraSettings) -> LoraInfo:
    """Account for every tensor of a LoRA file, then read it as diffusers converts it and check every
    weight against the model's layers. Raises ``LoraError`` (400) for what is wrong with the file only:

    1. the raw file, before any conversion: its header, and every tensor name classified as applied
       (transformer, CLIP-L) or refused by name and count (server/lora_format.py);
    2. its weights are finite (no NaN or infinity);
    3. diffusers' conversion (``lora_state_dict``: kohya, ComfyUI, xlabs, ... to diffusers/peft names);
    4. every converted weight is finite and names a layer of the transformer or CLIP text encoder with
       matching shapes, and every LoRA layer of each part survived the conversion;
    5. in hotswap mode, only what a slot holds (transformer LoRA matrices up to the slot rank).

    Running out of memory, or failing to read this server's own copy of the file, is raised as it is:
    the worker answers it as the internal error it is.
    """
    label = shown_path(path)
    try:
        header = read_header(Path(file), limits, loader_of(pipe))
    except FormatError as exc:
        raise format_error(path, exc) from None
    inventory = header.inventory
    assert inventory is not None  # read_header classified every name, and nothing was refused
    try:
        check_finite(Path(file), header)
    except FormatError as exc:
        raise format_error(path, exc) from None
    try:
        state_dict, alphas, _ = _read_lora(pipe, str(file))
    except _INTERNAL:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a hostile file makes diffusers' converters raise
        raise LoraError(f"LoRA '{label}' is not in a LoRA format this server reads for {model_id} "
                        f"(kohya, xlabs, diffusers/peft, ...): {_summary(exc)}") from None
    _check_finite(state_dict, label, " after conversion (its alphas overflow)")
    # A torch.compile'd component is a wrapper: its layers are those of the module it wraps.
    modules = {c: dict(getattr(getattr(pipe, c), "_orig_mod", getattr(pipe, c)).named_modules())
               for c in lora_components(pipe) if getattr(pipe, c, None) is not None}
    bad: list[str] = []
    layers: dict[str, set[str]] = {c: set() for c in COMPONENTS}
    rank, extras = 0, set()
    for key, tensor in _peft_names(state_dict).items():
        why = _misfit(key, tensor, modules)
        if why:
            bad.append(f"{key}: {why}")
            continue
        match = LORA_KEY.match(key)
        assert match is not None  # _misfit checked it
        layers[match["comp"]].add(match["module"])
        if match["kind"] is None:
            extras.add("DoRA magnitudes (lora_magnitude_vector)")
        elif match["param"] == "bias":
            extras.add("lora_B biases")
        elif match["kind"] == "lora_A":
            rank = max(rank, int(tensor.shape[0]))
    if not any(layers.values()) and all(r.endswith((": no such layer", "transformer or text encoder"))
                                        for r in bad):
        sample = ", ".join(sorted(state_dict)[:3]) or "none"
        raise LoraError(f"LoRA '{label}' has no weights for the layers of {model_id} (its weights are "
                        f"named like {sample}): a LoRA for another architecture?")
    if bad:
        raise LoraError(f"LoRA '{label}' does not fit {model_id}: {len(bad)} of {len(state_dict)} "
                        f"weights do not match its layers (e.g. {bad[0]}): a LoRA for another model?")
    for part, comp in (("transformer", "transformer"), ("clip", "text_encoder")):
        named, converted = inventory.converted_layers[part], len(layers[comp])
        if converted < named:
            raise LoraError(f"LoRA '{label}': {named - converted} of the {named} {_PART_NAMES[part]} "
                            f"LoRA layers it names would be lost in diffusers' conversion for {model_id} "
                            "(one layer under two names?)")
    text_encoder = bool(layers["text_encoder"])
    if hotswap:
        if text_encoder:
            raise LoraError(f"LoRA '{label}' has text-encoder weights; this server swaps LoRAs into a "
                            "compiled transformer and takes transformer LoRAs only")
        if extras:
            raise LoraError(f"LoRA '{label}' has {' and '.join(sorted(extras))}, which this server's "
                            "hotswap slots (plain LoRA matrices) cannot hold")
        # Slotted layers hold peft wrappers; a plain layer has no slot, and hotswap would fail on it.
        slotted = modules.get("transformer", {})
        outside = sorted(m for m in layers["transformer"] if not hasattr(slotted.get(m), "base_layer"))
        if outside:
            covered = ", ".join(settings.hotswap_target_modules)
            raise LoraError(f"LoRA '{label}' has weights for {len(outside)} layers outside this server's "
                            f"LoRA slots (e.g. {outside[0]}); the slots cover {covered} "
                            "(loras.hotswap_target_modules)")
        if rank > settings.hotswap_target_rank:
            raise LoraError(f"LoRA '{label}' has rank {rank}; this server takes LoRAs up to rank "
                            f"{settings.hotswap_target_rank}")
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    metadata = bool(header.metadata.get(LORA_ADAPTER_METADATA_KEY))
    return LoraInfo(state_dict=state_dict, load_from_file=bool(alphas) or metadata,
                    text_encoder=text_encoder, rank=rank)


_PART_NAMES = {"transformer": "transformer", "clip": "CLIP text-encoder"}
# What is never the file's fault: the server's memory (host or device) and its own disk.
_INTERNAL = (MemoryError, torch.OutOfMemoryError, OSError)


# torch dtype -> safetensors dtype, for the NaN/Inf check of converted weights (server/lora_format.py).
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3"}


def _check_finite(tensors: dict[str, torch.Tensor], label: str, when: str) -> None:
    """``LoraError`` naming the weights that hold NaN or infinite values, read from their bit patterns (much
    faster on CPU than ``torch.isfinite``, which is not vectorised for half precision)."""
    bad = [k for k, t in tensors.items() if t.dtype in _ST_DTYPES and has_non_finite(
        t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy(), _ST_DTYPES[t.dtype])]
    if bad:
        raise LoraError(f"LoRA '{label}' {non_finite_message(bad, when)}", code="invalid_lora_file")


def _peft_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Converted weights with text-encoder keys named as peft loads them: diffusers' kohya converter emits
    the older ``to_k_lora.down`` / ``lora_linear_layer.up`` names, which ``_load_lora_into_text_encoder``
    renames with these two functions before loading (diffusers/loaders/lora_base.py)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    prefix = "text_encoder."
    te = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not te:
        return state_dict
    renamed = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te))
    return {**{k: v for k, v in state_dict.items() if not k.startswith(prefix)},
            **{prefix + k: v for k, v in renamed.items()}}


def loader_of(pipe: Any) -> Loader:
    """How the pipeline's diffusers LoRA loader converts files (server/lora_format.py)."""
    from diffusers.loaders import FluxLoraLoaderMixin

    return FLUX1 if isinstance(pipe, FluxLoraLoaderMixin) else FLUX2


def lora_components(pipe: Any) -> tuple[str, ...]:
    """The components the pipeline's diffusers LoRA loader loads into (its ``_lora_loadable_modules``):
    FLUX.1's transformer and CLIP text encoder; FLUX.2's transformer only."""
    return tuple(c for c in COMPONENTS if c in type(pipe)._lora_loadable_modules)


def _read_lora(pipe: Any, file: str) -> tuple[dict[str, torch.Tensor], Any, Any]:
    """``(state_dict, network alphas, adapter metadata)`` of a LoRA file, converted by the pipeline's loader.

    FLUX.1 pipelines (``FluxLoraLoaderMixin``: kohya, xlabs, BFL control, diffusers/peft formats) return
    network alphas; FLUX.2's ``Flux2LoraLoaderMixin`` (kohya, ai-toolkit, LoKr, diffusers/peft) folds kohya
    alphas into the weights on conversion and returns none.
    """
    from diffusers.loaders import FluxLoraLoaderMixin

    if isinstance(pipe, FluxLoraLoaderMixin):
        return pipe.lora_state_dict(file, return_alphas=True, return_lora_metadata=True)
    state_dict, metadata = pipe.lora_state_dict(file, return_lora_metadata=True)
    return state_dict, None, metadata


def _misfit(key: str, tensor: torch.Tensor, modules: dict[str, dict[str, Any]]) -> str | None:
    match = LORA_KEY.match(key)
    if match is None:
        return "not a LoRA weight of the transformer or text encoder"
    layers = modules.get(match["comp"], {})
    name = match["module"]
    module = layers.get(name)
    if module is None and match["comp"] == "text_encoder":
        # CLIP LoRAs name layers "text_model.encoder..."; transformers 5's CLIPTextModel has no
        # "text_model" level (peft maps the names when it loads), so accept either form.
        other = name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}"
        module = layers.get(other)
    if module is None:
        return "no such layer"
    # A layer that already holds adapters is a peft wrapper around the original one.
    while hasattr(module, "base_layer"):
        module = module.base_layer
    if not isinstance(module, torch.nn.Linear):
        return f"the layer is a {type(module).__name__}, not a Linear"
    shape = tuple(tensor.shape)
    kind, param = match["kind"], match["param"]
    if kind == "lora_A" and param == "weight" and (len(shape) != 2 or shape[1] != module.in_features):
        return f"shape {shape} for a layer of {module.in_features} inputs"
    if kind == "lora_B" and param == "weight" and (len(shape) != 2 or shape[0] != module.out_features):
        return f"shape {shape} for a layer of {module.out_features} outputs"
    if kind is None and shape[-1:] != (module.out_features,):
        return f"shape {shape} for a layer of {module.out_features} outputs"
    return None


def _summary(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."
