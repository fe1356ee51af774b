"""What a LoRA file holds, read from its safetensors header alone: every tensor accounted for by name, before
any conversion.

Both processes use it (no torch): the LoRA store checks a file while it downloads (server/loras.py) and the
engine checks it again before loading (server/engine/adapters.py).

The header is read strictly (server/safetensors_header.py: anything else a header can hold is a
``FormatError``, never another exception). Every tensor name is then classified as diffusers 0.42's loader
of the model (``Loader``: ``FluxLoraLoaderMixin`` for FLUX.1, ``Flux2LoraLoaderMixin`` for FLUX.2) converts
it (``lora_state_dict`` and ``_convert_kohya_flux_lora_to_diffusers``, ``_convert_xlabs_...``,
``_convert_bfl_flux_control_...``, ``_convert_kohya_flux2_...`` in ``diffusers/loaders/
lora_conversion_utils.py``): into the part it is for (transformer, CLIP-L, T5, ...) and its kind (a LoRA
matrix, alpha, DoRA magnitude, LoHa, ...).
What diffusers would drop, with at most a log line, is refused here by name and count
(``"12 T5 weights (lora_te2_...) cannot be applied"``) instead of loading part of a LoRA.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .safetensors_header import NOT_SAFETENSORS, FormatError, Header, Limits, cut, header_length, parse_header


def read_header(path: Path, limits: Limits, loader: Loader | None = None) -> Header:
    """The header of a local file, checked as ``check_header`` checks it; the file's size must be exactly
    what the header declares. ``FormatError`` for the file's content; ``OSError`` if it cannot be read."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        length = header_length(fh.read(8), limits.header_bytes)
        if length > size - 8:
            raise FormatError(NOT_SAFETENSORS)
        header = check_header(fh.read(length), limits, loader)
    if header.file_bytes != size:
        raise FormatError(f"is not a complete safetensors file ({size} bytes; its header describes "
                          f"{header.file_bytes})")
    return header


# -- what each tensor is ----------------------------------------------------------------------------

# Part a weight is for, by name prefix (diffusers/peft, kohya/sd-scripts, ComfyUI, xlabs, BFL, fal).
_PARTS: tuple[tuple[str, str], ...] = (
    ("lora_te2_", "t5"), ("text_encoders.t5xxl.", "t5"), ("text_encoder_2.", "t5"),
    ("lora_te1_", "clip"), ("lora_te_", "clip"), ("text_encoders.clip_l.", "clip"), ("text_encoder.", "clip"),
    ("lora_te3_", "other_te"), ("text_encoder_3.", "other_te"), ("text_encoders.", "other_te"),
    ("unet.", "unet"),
    ("lora_unet_", "transformer"), ("diffusion_model.", "transformer"), ("transformer.", "transformer"),
    ("lora_transformer_", "transformer"), ("double_blocks.", "transformer"),
    ("single_blocks.", "transformer"),
    ("base_model.model.", "transformer"), ("final_layer.", "transformer"), ("img_in.", "transformer"),
    ("txt_in.", "transformer"), ("time_in.", "transformer"), ("vector_in.", "transformer"),
    ("guidance_in.", "transformer"),
)
APPLIED_PARTS = ("transformer", "clip")

# Kind of a weight, by name suffix (one pattern, one search per name; the group that matched is the kind).
# "lora": one of a LoRA's two matrices (kohya lora_down/up, peft lora_A/B, xlabs and diffusers' older
# to_q_lora.down / lora_linear_layer.up).
_SUFFIX = re.compile(
    r"\.(?:(?P<lora>lora_(?:down|up)\.weight|lora_[AB]\.weight|(?:down|up)\.weight)"
    r"|(?P<lora_bias>lora_B\.bias)|(?P<locon>lora_mid\.weight)|(?P<dora>lora_magnitude_vector(?:\.weight)?)"
    r"|(?P<alpha>alpha)|(?P<dora_scale>dora_scale)|(?P<loha>hada_(?:w1_a|w1_b|w2_a|w2_b|t1|t2))"
    r"|(?P<lokr>lokr_(?:w1|w2|w1_a|w1_b|w2_a|w2_b|t1|t2))|(?P<diff_b>diff_b)|(?P<diff>diff))$"
)
# Weights of a normalisation layer itself (not of a Linear inside one, like norm1.linear): RMSNorm scales of
# BFL Control LoRAs (query_norm.scale, norm_q.weight), their .diff in ComfyUI exports, LyCORIS w_norm/b_norm.
_NORM_LAYER = re.compile(r"norm(?:\d+|_q|_k|_added_q|_added_k)?$")
_NORM_WEIGHT = ("scale", "weight", "bias", "diff", "diff_b")
_EMBEDDING = re.compile(r"(?:token|position)[._]?embedding|^bundle_emb|^emb_params|^string_to_param")

@dataclass(frozen=True)
class Loader:
    """What one diffusers LoRA loader applies, and how its kohya/sd-scripts converter names layers: a kohya
    layer it does not know, or a key without one of its prefixes, is left over and dropped with a warning."""

    name: str
    parts: tuple[str, ...]                  # the parts it loads weights into
    kohya_prefixes: tuple[str, ...]         # the key prefixes its kohya converter keeps
    kohya_layers: re.Pattern[str]           # the sd-scripts layers it converts (groups d, s: block numbers)
    kohya_blocks: tuple[tuple[str, int], ...]  # (group, blocks it converts) for the numbered layers
    fused: tuple[tuple[re.Pattern[str], int], ...]  # raw layers it splits into several, and into how many
    mixes: bool                             # FLUX.1's special files (kohya beside peft names, "mixture")


_QKV = re.compile(r"(?:attn_qkv|processor_qkv_lora\d*)$")  # kohya, ComfyUI, BFL img_attn.qkv; xlabs qkv_lora1
_KOHYA_DOUBLE = ("img_attn_proj", "img_attn_qkv", "img_mlp_0", "img_mlp_2", "img_mod_lin", "txt_attn_proj",
                 "txt_attn_qkv", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin")

# FluxLoraLoaderMixin (FLUX.1, Kontext, Canny/Depth): the transformer and CLIP-L; kohya layers of
# ``_convert_sd_scripts_to_ai_toolkit`` (19 double, 38 single blocks); a fused qkv becomes to_q/to_k/to_v,
# a single block's linear1 to_q/to_k/to_v/proj_mlp.
FLUX1 = Loader(
    name="FLUX.1", parts=("transformer", "clip"),
    kohya_prefixes=("lora_unet_", "diffusion_model.", "lora_te_", "lora_te1_",
                    "text_encoders.clip_l.transformer."),
    kohya_layers=re.compile(
        r"^(?:double_blocks_(?P<d>\d+)_(?:" + "|".join(_KOHYA_DOUBLE) + r")"
        r"|single_blocks_(?P<s>\d+)_(?:linear1|linear2|modulation_lin)"
        r"|guidance_in_(?:in|out)_layer|img_in|txt_in|time_in_(?:in|out)_layer|vector_in_(?:in|out)_layer"
        r"|final_layer_adaLN_modulation_1|final_layer_linear)$"),
    kohya_blocks=(("d", 19), ("s", 38)),
    fused=((_QKV, 3), (re.compile(r"single_blocks_\d+_linear1$"), 4)),
    mixes=True,
)
# Flux2LoraLoaderMixin (FLUX.2 [dev], [klein]): the transformer only; kohya layers of
# ``_convert_kohya_flux2_lora_to_diffusers`` (any number of blocks; modulation is shared, not per block);
# a fused qkv becomes three layers, a single block's linear1 stays one (to_qkv_mlp_proj).
FLUX2 = Loader(
    name="FLUX.2", parts=("transformer",), kohya_prefixes=("lora_unet_",),
    kohya_layers=re.compile(
        r"^(?:double_blocks_(?P<d>\d+)_(?:img|txt)_(?:attn_proj|attn_qkv|mlp_0|mlp_2)"
        r"|single_blocks_(?P<s>\d+)_(?:linear1|linear2)"
        r"|img_in|txt_in|time_in_(?:in|out)_layer|final_layer_linear)$"),
    kohya_blocks=(), fused=((_QKV, 3),), mixes=False,
)
# A manifest's family -> the loader its pipeline uses (server/registry.py lists the families).
LOADERS = {"flux": FLUX1, "flux-kontext": FLUX1, "flux-control": FLUX1, "flux2": FLUX2, "flux2-klein": FLUX2}
_KOHYA_SUFFIX = re.compile(r"\.(?:lora_down\.weight|lora_up\.weight|alpha)$")


def part_of(name: str) -> str:
    """``transformer``, ``clip``, ``t5``, ``other_te``, ``unet`` or ``unknown``."""
    return next((part for prefix, part in _PARTS if name.startswith(prefix)), "unknown")


def kind_of(name: str) -> str:
    """``lora``, ``lora_bias``, ``dora``, ``alpha`` (applied kinds), ``dora_scale``, ``loha``, ``lokr``,
    ``locon``, ``diff``, ``diff_b``, ``norm``, ``embedding`` or ``unknown``."""
    return _kind_and_layer(name)[0]


def _kind_and_layer(name: str) -> tuple[str, str]:
    """A weight's kind and the layer it belongs to (its name without the kind suffix)."""
    if _EMBEDDING.search(name):
        return "embedding", name.rsplit(".", 1)[0]
    module, _, suffix = name.rpartition(".")
    last = module.rsplit(".")[-1]
    if suffix in ("w_norm", "b_norm") or (suffix in _NORM_WEIGHT and _NORM_LAYER.search(last)):
        return "norm", module
    match = _SUFFIX.search(name)
    if match is None:
        return "unknown", module
    return str(match.lastgroup), name[: match.start()]


def _kohya_layer(layer: str) -> str | None:
    """The sd-scripts name of a kohya/ComfyUI transformer layer (``double_blocks_0_img_attn_qkv``)."""
    for prefix in ("lora_unet_", "diffusion_model."):
        if layer.startswith(prefix):
            return layer[len(prefix):].replace(".", "_")
    return None


def _known_kohya_layer(layer: str, loader: Loader) -> bool:
    match = loader.kohya_layers.match(layer)
    if match is None:
        return False
    return all(match[g] is None or int(match[g]) < n for g, n in loader.kohya_blocks)


APPLIED_KINDS = ("lora", "lora_bias", "dora", "alpha")

# Why a group of weights is refused; "{n} {what} ({sample}) cannot be applied: {why}".
REFUSALS: dict[str, tuple[str, str]] = {
    "t5": ("T5 weights", "this LoRA has T5 text-encoder weights, which Darkroom cannot apply "
                         "(diffusers loads FLUX LoRAs into the transformer and the CLIP text encoder only)"),
    "other_te": ("weights of another text encoder", "FLUX has a CLIP-L and a T5 text encoder only"),
    "text_encoder": ("text-encoder weights", "diffusers loads LoRAs for this model into its transformer "
                                             "only"),
    "unet": ("UNet weights", "FLUX has no UNet: a LoRA for another architecture (Stable Diffusion?)"),
    "dora_scale": ("DoRA magnitudes", "DoRA LoRAs are not supported in kohya/LyCORIS form (dora_scale); "
                                      "diffusers/peft DoRA (lora_magnitude_vector) is"),
    "loha": ("LyCORIS LoHa weights", "LoHa (Hadamard-product) LoRAs are not supported"),
    "lokr": ("LyCORIS LoKr weights", "LoKr (Kronecker-product) LoRAs are not supported"),
    "locon": ("LyCORIS LoCon mid weights", "convolution LoRAs are not supported"),
    "diff": ("full-weight deltas", "diffusers does not apply .diff weights to FLUX (only low-rank LoRA "
                                   "matrices)"),
    "diff_b": ("bias deltas", "diffusers drops .diff_b weights of FLUX LoRAs"),
    "norm": ("norm weights", "they would overwrite the model's own normalisation weights for every request "
                             "(as in BFL Control LoRAs)"),
    "embedding": ("embedding weights", "token/position embeddings and textual-inversion vectors are not "
                                       "supported"),
    "unknown_layer": ("weights of layers FLUX does not have", "a LoRA for another architecture?"),
    "dropped": ("weights diffusers' converter would drop", "the file mixes naming schemes (kohya with "
                                                           "diffusers/peft names, or unconvertible layers)"),
    "unpaired": ("LoRA weights without their other half", "a LoRA layer needs both its down (A) and up (B) "
                                                          "matrix"),
    "unknown_part": ("weights for no part of FLUX", "their names start with none of the prefixes of the "
                                                    "transformer or CLIP (transformer., text_encoder., "
                                                    "lora_unet_, lora_te1_, diffusion_model., ...): a LoRA "
                                                    "for another architecture?"),
    "unknown": ("tensors that are not LoRA weights", "this server reads LoRA matrices, alphas, DoRA "
                                                     "magnitudes (lora_magnitude_vector) and lora_B biases"),
}


@dataclass
class Inventory:
    """Every tensor of a file: the weights that will be applied per part, and the refused groups."""

    total: int = 0
    applied: Counter[str] = field(default_factory=Counter)         # part -> weights
    modules: dict[str, set[str]] = field(default_factory=dict)     # part -> LoRA layers (raw names)
    # part -> the diffusers layers its raw layers become (a fused qkv: three; FLUX's single-block linear1:
    # four), which the engine finds again after diffusers' conversion
    converted_layers: Counter[str] = field(default_factory=Counter)
    refused: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # group -> names

    @property
    def has_lora(self) -> bool:
        return any(self.modules.values())

    def problem(self) -> FormatError | None:
        """The refusal of this file, naming every refused group with its count and a sample; or None."""
        if not self.has_lora and set(self.refused) <= {"unknown", "unknown_part"}:
            names = sorted(n for group in self.refused.values() for n in group)
            shown = ", ".join(cut(n, 80) for n in names[:3])
            return FormatError(f"holds no LoRA weights (tensors like {shown})")
        if not self.refused:
            return None
        parts = []
        for group, names in self.refused.items():
            what, why = REFUSALS[group]
            sample = ", ".join(cut(n, 80) for n in sorted(names)[:2]) + (", ..." if len(names) > 2 else "")
            parts.append(f"{len(names)} {what} ({sample}) cannot be applied: {why}")
        applied = sum(self.applied.values())
        tail = f" (of its {self.total} tensors, {applied} could be)" if applied else ""
        return FormatError("; ".join(parts) + tail, code="unsupported_lora")


def classify(names: Iterable[str], loader: Loader = FLUX1) -> Inventory:
    """Account for every tensor name of a LoRA file before any conversion, as ``loader`` would convert it
    (see the module docstring)."""
    names = list(names)
    inv = Inventory(total=len(names))
    # diffusers' loaders pick a converter from the whole file (``lora_state_dict``).
    kohya = any(n.endswith(".lora_down.weight") for n in names)
    peft_mix = loader.mixes and kohya and any(n.startswith("transformer.") for n in names)
    mixture = loader.mixes and kohya and any(n.startswith("lora_transformer_") for n in names)
    kept: list[tuple[str, str, str, str]] = []  # name, part, kind, layer
    for name in names:
        part, (kind, layer) = part_of(name), _kind_and_layer(name)
        group = _refused_group(name, part, kind, layer, loader, kohya=kohya, peft_mix=peft_mix,
                               mixture=mixture)
        if group:
            inv.refused[group].append(name)
        else:
            kept.append((name, part, kind, layer))
    # A LoRA layer is its down (A) and up (B) matrix; one without the other (or an alpha of no layer) would
    # be dropped by the converter or give peft a layer it fills in itself.
    sides: dict[str, set[str]] = defaultdict(set)
    for name, _, kind, layer in kept:
        if kind == "lora":
            sides[layer].add("down" if _DOWN.search(name) else "up")
    for name, part, kind, layer in kept:
        if kind in ("lora", "alpha") and len(sides.get(layer, ())) < 2:
            inv.refused["unpaired"].append(name)
            continue
        inv.applied[part] += 1
        if kind == "lora" and layer not in inv.modules.setdefault(part, set()):
            inv.modules[part].add(layer)
            flat = layer.replace(".", "_")
            inv.converted_layers[part] += next((n for pattern, n in loader.fused if pattern.search(flat)), 1)
    inv.refused = {k: v for k, v in inv.refused.items() if v}  # type: ignore[assignment]
    return inv


_DOWN = re.compile(r"(?:lora_down|lora_A|down)\.weight$")


def _refused_group(name: str, part: str, kind: str, layer: str, loader: Loader, *, kohya: bool,
                   peft_mix: bool, mixture: bool) -> str | None:
    if part in ("t5", "other_te", "unet"):
        return part
    if kind not in APPLIED_KINDS:
        return kind
    if part == "unknown":
        return "unknown_part"
    if part not in loader.parts:
        return "text_encoder"
    if peft_mix and not name.startswith("transformer."):
        return "dropped"  # diffusers keeps transformer.* only from such a file
    if mixture and name.startswith("lora_unet_"):
        return "dropped"
    if kohya and not peft_mix and not mixture:
        if not name.startswith(loader.kohya_prefixes) or not _KOHYA_SUFFIX.search(name):
            return "dropped"
        kohya_layer = _kohya_layer(layer)
        if (kohya_layer is not None and not _known_kohya_layer(kohya_layer, loader)) \
                or "text_projection" in name:
            return "unknown_layer"
    return None


class StreamCheck:
    """A download sink (``Fetcher.fetch_to``): passes every chunk on to ``write``, and checks the file as it
    arrives: the 8-byte header length first, then the header and every tensor name in it (``classify``)
    before any of the body is passed on, then that the body is exactly as long as the header says.

    Holds at most the header (``limits.header_bytes``) plus one chunk in memory. Raises ``FormatError``.
    ``loader``: the loader of the model the file is for (None: refuse only what no loader applies).
    """

    def __init__(self, write: Callable[[bytes], object], limits: Limits,
                 loader: Loader | None = None) -> None:
        self.write = write
        self.limits = limits
        self.loader = loader
        self.header: Header | None = None
        self.received = 0
        self._head = bytearray()
        self._length: int | None = None

    def __call__(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.header is None:
            self._head += chunk
            if self._length is None and len(self._head) >= 8:
                self._length = header_length(bytes(self._head[:8]), self.limits.header_bytes)
            if self._length is None or len(self._head) < 8 + self._length:
                return  # nothing is written before the header has been checked
            self.header = check_header(bytes(self._head[8 : 8 + self._length]), self.limits, self.loader)
            chunk, self._head = bytes(self._head), bytearray()
        if self.received > self.header.file_bytes:
            raise FormatError(f"is longer than its safetensors header says ({self.header.file_bytes} bytes)")
        self.write(chunk)

    def finish(self) -> Header:
        """The checked header, once the whole body has arrived; ``FormatError`` if it is incomplete."""
        if self.header is None:
            raise FormatError(NOT_SAFETENSORS)
        if self.received != self.header.file_bytes:
            raise FormatError(f"is not a complete safetensors file ({self.received} bytes; its header "
                              f"describes {self.header.file_bytes})")
        return self.header


def check_header(raw: bytes, limits: Limits, loader: Loader | None = None) -> Header:
    """``parse_header``, then the size it declares against ``limits.file_bytes``, then every name
    (``classify`` for ``loader``, kept as ``Header.inventory``; for None, refused only if every loader
    refuses it)."""
    header = parse_header(raw, limits.tensors)
    cap = limits.file_bytes
    if cap is not None and header.file_bytes > cap:
        raise FormatError(f"is larger than {cap} bytes (its header describes {header.file_bytes})",
                          code="fetch_failed")
    inventories = [classify(header.tensors, one) for one in ((loader,) if loader else (FLUX1, FLUX2))]
    header.inventory = next((inv for inv in inventories if inv.problem() is None), inventories[0])
    problem = header.inventory.problem()
    if problem is not None:
        raise problem
    return header
