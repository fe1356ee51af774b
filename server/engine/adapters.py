"""Per-request LoRAs on a device: resident adapters, activation per batch, and hotswap slots.

The engine half of ``image_loras``: files come from the LoRA store (server/loras.py), shared with the API.

One ``LoraManager`` per engine (one device), called from that device's worker thread only.

Default mode: every LoRA a batch uses is loaded once as a named diffusers adapter (``load_lora_weights``
with ``adapter_name``) and stays resident, in a least-recently-used set of ``loras.max_resident``
adapters per model; a batch's set is activated with ``set_adapters(names, scales)`` on the components
that hold weights of it. A batch without LoRAs disables the LoRA layers: peft's disabled layers run the
base layer alone, so its images are bit-for-bit those of a pipeline that never saw a LoRA.

Hotswap mode (``loras.hotswap``, for a ``torch.compile``d transformer): ``enable_lora_hotswap`` runs
before anything is loaded (and before compiling), then ``loras.hotswap_slots`` adapter slots are created,
each holding an all-zero LoRA of rank ``hotswap_target_rank`` on the layers LoRAs train
(``hotswap_target_modules``, server/engine/lora_slots.py), so any LoRA up to that rank on those layers
fits. A model whose transformer is compiled always gets slots (``prepare(..., hotswap=True)``): with named
adapters every new LoRA set would recompile the transformer, until dynamo's recompile limit makes it run
eagerly for good. A LoRA enters a slot with ``load_lora_weights(..., hotswap=True)``, which swaps the
weights in place (no new modules, no recompilation); hotswap resets the slot's scale, so the
scales are set after it. Every slot stays active, unused ones at scale 0 (a zero scale adds exact zeros:
no-LoRA images stay exact), and scales are written into peft's scaling tensors in place, as the LoRA's own
alpha / rank times the request's scale (``set_adapters`` would swap those tensors for floats, which a
compiled graph specialises on, and after a hotswap it would use the first LoRA's alpha and rank). The
slots are the resident set in this mode, reused least recently used first.

Before anything is loaded, a file passes every check against the model (server/engine/lora_checks.py): a
LoRA with parts Darkroom cannot apply, for another architecture, or one diffusers would "expand" the base
model for, is a 400 and touches nothing. What fails after those checks (memory, a diffusers or peft error) is
the server's, not the file's: a 500 the worker answers as an internal error.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from .. import metrics
from ..config import LoraSettings
from ..errors import InternalError
from ..loras import LoraError, LoraStore, shown_path
from ..params import LoraRef
from .loading import LOAD_LOCK
from .lora_checks import COMPONENTS, LoraInfo, inspect_lora, loader_of
from .lora_slots import SlotCost, slot_layers

log = logging.getLogger(__name__)


class _NoTextEncoderNotice(logging.Filter):
    """diffusers warns on every load of a LoRA that one component (transformer, text encoder) got no keys."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No LoRA keys associated to")



@contextlib.contextmanager
def _loading() -> Iterator[None]:
    """The process-wide load lock; and peft's warning that a model gets a second adapter goes unsaid
    (resident adapters and hotswap slots are just that)."""
    with LOAD_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model")
        yield


for _name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft", "diffusers.loaders.lora_pipeline"):
    logging.getLogger(_name).addFilter(_NoTextEncoderNotice())



@dataclass
class _ModelState:
    pipe: Any
    # Default mode: path -> adapter name, least recently used first.
    resident: OrderedDict[str, str] = field(default_factory=OrderedDict)
    # Default mode: the resident LoRAs with text-encoder weights (what prompt embeddings depend on).
    text_encoder: set[str] = field(default_factory=set)
    # Hotswap mode: the path each slot holds (None: the zero LoRA).
    slots: list[str | None] = field(default_factory=list)
    # Hotswap mode: the all-zero LoRA a slot starts with (made before any adapter wraps a layer).
    zero: dict[str, torch.Tensor] = field(default_factory=dict)
    # Hotswap mode: per slot, each LoRA layer's own scaling (alpha / rank of the LoRA in the slot), and the
    # request scales last applied on top of it (None: to be applied again).
    base: list[dict[str, float]] = field(default_factory=list)
    applied: list[float | None] = field(default_factory=list)
    hotswap: bool = False  # this model's LoRAs go into fixed slots
    layers: dict[str, Any] = field(default_factory=dict)  # hotswap mode: the LoRA layers (fixed)
    used: list[int] = field(default_factory=list)  # hotswap mode: when each slot last served a batch
    tick: int = 0
    # What set_adapters last set ((name, scale) pairs; () = LoRA layers disabled); None: unknown.
    active: tuple[tuple[str, float], ...] | None = ()


class LoraManager:
    def __init__(self, store: LoraStore, settings: LoraSettings | None = None) -> None:
        self.store = store
        self.settings = settings or store.settings
        self._models: dict[str, _ModelState] = {}
        self._serial = 0
        self.loads = 0
        self.swaps = 0

    def hotswap(self, model_id: str) -> bool:
        """Whether the model's LoRAs go into hotswap slots (as ``prepare`` was told)."""
        state = self._models.get(model_id)
        return state.hotswap if state is not None else self.settings.hotswap

    # -- set-up -----------------------------------------------------------------------------------

    def prepare(self, model_id: str, pipe: Any, hotswap: bool | None = None) -> None:
        """Register a model's pipeline; with ``hotswap`` (default ``loras.hotswap``; True for a compiled
        transformer, see ``ModelManifest.uses_lora_slots``) create its slots, before any compile."""
        state = _ModelState(pipe, hotswap=self.settings.hotswap if hotswap is None else hotswap)
        self._models[model_id] = state
        if not state.hotswap:
            return
        rank = self.settings.hotswap_target_rank
        transformer = getattr(pipe.transformer, "_orig_mod", pipe.transformer)
        layers = slot_layers(transformer, self.settings.hotswap_target_modules)
        state.zero = self._zero_lora(layers, next(transformer.parameters()).dtype)
        with _loading():
            pipe.enable_lora_hotswap(target_rank=rank)
            for i in range(self.settings.hotswap_slots):
                # Fresh tensors per slot: a load may adopt the given tensors as the slot's weights, and a
                # hotswap copies into them, so slots sharing tensors would overwrite each other.
                pipe.load_lora_weights({k: v.clone() for k, v in state.zero.items()},
                                       adapter_name=self._slot(i))
        state.slots = [None] * self.settings.hotswap_slots
        # Every slot stays active from now on; only the scaling values change, in place, in tensors, so a
        # compiled graph neither specialises on them nor sees a different adapter list.
        names = [self._slot(i) for i in range(len(state.slots))]
        transformer.set_adapters(names, [1.0] * len(names))
        state.layers = _lora_layers(transformer)
        for layer in state.layers.values():
            for name in names:
                value = layer.scaling[name]
                if not isinstance(value, torch.Tensor):
                    layer.scaling[name] = torch.tensor(float(value), device=layer.lora_A[name].weight.device)
        state.base = [self._read_scaling(state, i) for i in range(len(names))]
        state.applied = [None] * len(names)
        state.used = [0] * len(names)
        self._apply_slot_scales(state, [0.0] * len(names))
        cost = SlotCost.of(layers, rank)
        log.info("lora hotswap slots ready model=%s slots=%d rank=%d layers=%d params=%d mib=%.1f", model_id,
                 len(state.slots), rank, cost.layers, cost.params_per_slot * len(state.slots),
                 cost.bytes(len(state.slots), weight_bytes(transformer)) / 2**20)

    @staticmethod
    def _slot(i: int) -> str:
        return f"slot{i}"

    def _zero_lora(self, layers: dict[str, torch.nn.Linear], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """An all-zero LoRA of the slot rank on ``layers``: only the layers LoRAs train
        (server/engine/lora_slots.py), as a slot costs memory and FLOPs per layer."""
        rank = self.settings.hotswap_target_rank
        zeros: dict[str, torch.Tensor] = {}
        for name, module in layers.items():
            zeros[f"transformer.{name}.lora_A.weight"] = torch.zeros(rank, module.in_features, dtype=dtype)
            zeros[f"transformer.{name}.lora_B.weight"] = torch.zeros(module.out_features, rank, dtype=dtype)
        if not zeros:
            raise LoraError(f"loras.hotswap_target_modules {self.settings.hotswap_target_modules} match no "
                            "layer of the transformer")
        return zeros

    # -- per batch --------------------------------------------------------------------------------

    def activate(self, model_id: str, refs: Sequence[LoraRef]) -> None:
        """Make exactly ``refs`` (with their scales) act on the model; nothing else stays active."""
        state = self._models.get(model_id)
        if state is None:
            if refs:
                raise LoraError(f"model {model_id} does not take LoRAs on this server")
            return
        if state.hotswap:
            self._activate_slots(model_id, state, refs)
            return
        keep = {ref.path for ref in refs}
        names = [self._resident(model_id, state, ref, keep) for ref in refs]
        self._set(state, [(name, ref.scale) for name, ref in zip(names, refs)])

    def text_encoder_loras(self, model_id: str, refs: Sequence[LoraRef]) -> tuple[LoraRef, ...]:
        """The LoRAs of ``refs`` (already activated) that change what the text encoder returns: the part of a
        batch's LoRA set its prompt embeddings depend on (server/engine/prompt_cache.py's key). Empty in
        hotswap mode (LoRAs with text-encoder weights are refused there) and for transformer-only LoRAs,
        which most FLUX LoRAs are: a switch between those reuses the cached embeddings."""
        state = self._models.get(model_id)
        if state is None or state.hotswap:
            return ()
        return tuple(ref for ref in refs if ref.path in state.text_encoder)

    def resident(self, model_id: str) -> list[str]:
        """Paths of the adapters loaded for a model, least recently used first."""
        state = self._models.get(model_id)
        if state is None:
            return []
        return [p for p in state.slots if p] if state.hotswap else list(state.resident)

    def _resident(self, model_id: str, state: _ModelState, ref: LoraRef, keep: set[str]) -> str:
        if ref.path in state.resident:
            state.resident.move_to_end(ref.path)
            metrics.LORA_CACHE_HITS.labels(cache="adapter").inc()
            return state.resident[ref.path]
        metrics.LORA_CACHE_MISSES.labels(cache="adapter").inc()
        with self.store.use(ref.path, loader_of(state.pipe)) as file:
            info = self.inspect(model_id, state.pipe, file, ref.path)
            while len(state.resident) >= self.settings.max_resident:
                victim = next((p for p in state.resident if p not in keep), None)
                if victim is None:
                    break
                name = state.resident.pop(victim)
                state.text_encoder.discard(victim)
                state.pipe.delete_adapters(name)
                state.active = None
                metrics.LORA_CACHE_EVICTIONS.labels(cache="adapter").inc()
                log.info("lora unloaded model=%s path=%s adapter=%s", model_id, shown_path(victim), name)
            self._serial += 1
            name = f"lora{self._serial}"
            started = time.perf_counter()
            state.active = None  # a load activates the new adapter
            try:
                with _loading():
                    state.pipe.load_lora_weights(str(file) if info.load_from_file else info.state_dict,
                                                 adapter_name=name)
            except BaseException as exc:
                # The file passed every check: what fails now (memory, a diffusers or peft error) is the
                # server's, answered by the worker as an internal error; the adapter state stays as it was.
                log.exception("lora load failed model=%s path=%s", model_id, shown_path(ref.path))
                self._drop_partial(state.pipe, name)
                _raise_load_failure(exc, ref.path)
        state.resident[ref.path] = name
        if info.text_encoder:
            state.text_encoder.add(ref.path)
        self.loads += 1
        log.info("lora loaded model=%s path=%s adapter=%s seconds=%.3f", model_id, shown_path(ref.path), name,
                 time.perf_counter() - started)
        return name

    def _activate_slots(self, model_id: str, state: _ModelState, refs: Sequence[LoraRef]) -> None:
        slots = state.slots
        if len(refs) > len(slots):
            raise LoraError(f"{model_id} takes at most {len(slots)} LoRAs per request on this server "
                            f"(loras.hotswap_slots); got {len(refs)}")
        wanted = {ref.path for ref in refs}
        where: dict[str, int] = {ref.path: slots.index(ref.path) for ref in refs if ref.path in slots}
        # Free slots: those holding nothing this batch needs; empty ones first, then least recently used.
        free = sorted((i for i in range(len(slots)) if slots[i] not in wanted),
                      key=lambda i: (slots[i] is not None, state.used[i]))
        for ref in refs:
            if ref.path in where:
                metrics.LORA_CACHE_HITS.labels(cache="adapter").inc()
                continue
            i = free.pop(0)
            metrics.LORA_CACHE_MISSES.labels(cache="adapter").inc()
            if slots[i] is not None:
                metrics.LORA_CACHE_EVICTIONS.labels(cache="adapter").inc()
            with self.store.use(ref.path, loader_of(state.pipe)) as file:
                info = self.inspect(model_id, state.pipe, file, ref.path)
                state.active = None  # hotswap resets the slot's scale
                started = time.perf_counter()
                try:
                    with _loading():
                        state.pipe.load_lora_weights(str(file) if info.load_from_file else info.state_dict,
                                                     adapter_name=self._slot(i), hotswap=True)
                except BaseException as exc:
                    log.exception("lora swap failed model=%s path=%s slot=%d", model_id, shown_path(ref.path),
                                  i)
                    self._reset_slot(state, i)
                    _raise_load_failure(exc, ref.path)
            slots[i] = ref.path
            where[ref.path] = i
            # Hotswap set the slot's scaling to the new LoRA's alpha / rank: that is its base from now on.
            state.base[i] = self._read_scaling(state, i)
            state.applied[i] = None
            self.swaps += 1
            log.info("lora swapped in model=%s path=%s slot=%d seconds=%.3f", model_id, shown_path(ref.path),
                     i, time.perf_counter() - started)
        scales = [0.0] * len(slots)
        state.tick += 1
        for ref in refs:
            scales[where[ref.path]] = ref.scale
            state.used[where[ref.path]] = state.tick
        self._apply_slot_scales(state, scales)

    def _read_scaling(self, state: _ModelState, i: int) -> dict[str, float]:
        slot = self._slot(i)
        return {name: float(layer.scaling[slot]) for name, layer in state.layers.items()}

    def _apply_slot_scales(self, state: _ModelState, scales: list[float]) -> None:
        """scaling = the LoRA's own alpha / rank x the request's scale, written into the slot's tensors.

        Not ``set_adapters``: after a hotswap peft's ``set_scale`` would use the first LoRA's alpha and rank,
        and it replaces the scaling tensors with floats, which a compiled graph would specialise on.
        """
        for i, scale in enumerate(scales):
            if state.applied[i] == scale:
                continue
            slot = self._slot(i)
            for name, layer in state.layers.items():
                value = state.base[i].get(name, 1.0) * scale
                current = layer.scaling[slot]
                if isinstance(current, torch.Tensor):
                    current.fill_(value)
                else:
                    layer.scaling[slot] = value
            state.applied[i] = scale

    def _reset_slot(self, state: _ModelState, i: int) -> None:
        """After a failed swap the slot's weights are unknown: put the zero LoRA back."""
        state.slots[i] = None
        state.active = None
        state.applied[i] = None
        try:
            with _loading():
                state.pipe.load_lora_weights(state.zero, adapter_name=self._slot(i), hotswap=True)
        except Exception:  # noqa: BLE001
            log.exception("could not reset LoRA slot %d; the engine's LoRA state is unknown", i)
            raise

    @staticmethod
    def _drop_partial(pipe: Any, name: str) -> None:
        present = {n for names in pipe.get_list_adapters().values() for n in names}
        if name in present:
            try:
                pipe.delete_adapters(name)
            except Exception:  # noqa: BLE001
                log.exception("could not remove a half-loaded LoRA adapter %s", name)

    def _set(self, state: _ModelState, pairs: list[tuple[str, float]]) -> None:
        """Activate exactly ``pairs`` on every component that holds adapters (nothing: disable)."""
        wanted = tuple(pairs)
        if state.active == wanted:
            return
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        pipe = state.pipe
        lists = pipe.get_list_adapters()
        for comp_name in COMPONENTS:
            comp = getattr(pipe, comp_name, None)
            present = set(lists.get(comp_name, []))
            if comp is None or not present:
                continue
            chosen = [(n, s) for n, s in pairs if n in present]
            if comp_name == "transformer":
                if chosen:
                    comp.enable_lora()
                    comp.set_adapters([n for n, _ in chosen], [s for _, s in chosen])
                else:
                    comp.disable_lora()
            elif chosen:
                enable_lora_for_text_encoder(comp)
                set_adapters_for_text_encoder([n for n, _ in chosen], comp, [s for _, s in chosen])
            else:
                disable_lora_for_text_encoder(comp)
        state.active = wanted

    # -- checks -----------------------------------------------------------------------------------

    def inspect(self, model_id: str, pipe: Any, file: Path, path: str) -> LoraInfo:
        """Every check of a LoRA file against the model (server/engine/lora_checks.py), in this model's
        mode: ``LoraError`` (400) for what is wrong with the file."""
        return inspect_lora(model_id, pipe, file, path, self.store.limits(any_size=True),
                            hotswap=self.hotswap(model_id), settings=self.settings)

def _raise_load_failure(exc: BaseException, path: str) -> NoReturn:
    """Re-raise what failed loading a LoRA that passed every check: the server's failure, not the file's.
    Out of device memory becomes a 500 ``internal_error`` naming the LoRA (the worker would otherwise take it
    for a request too large for the device, a 400 whose advice, a lower ``n``, does not help)."""
    if isinstance(exc, torch.OutOfMemoryError):
        raise InternalError(f"LoRA '{shown_path(path)}' could not be loaded: the device is out of memory; "
                            "see the server log") from exc
    raise exc


def _lora_layers(module: torch.nn.Module) -> dict[str, Any]:
    """The peft LoRA layers of a module, by name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes per element of a module's weights (the dtype its LoRA slots take)."""
    return next(module.parameters()).element_size()
