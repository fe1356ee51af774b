"""Model manifests: what a served model is, where its weights come from, what it can do.

One YAML file per model under ``models/``. The API validates requests against a manifest's
capabilities and limits; the engine loads weights from its source. Nothing here touches torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import ImageCheckerSpec, LimitSettings, LoraSettings, WeightsSource
from .errors import ModelNotFound

log = logging.getLogger(__name__)


# Built-in weights built in memory at load time, never written to disk: full-size FLUX.1 architectures
# with random weights (server/engine/random_flux.py), for benchmarks on a machine without the real weights;
# the "-small" variants keep every component's structure at tiny widths, for CPU rehearsals.
RANDOM_BUILTINS = ("flux-schnell-random", "flux-dev-random",
                   "flux-schnell-random-small", "flux-dev-random-small")


class ModelSource(WeightsSource):
    """A model's weights: exactly one of a Hub repo id, a local diffusers folder, or a builtin (the tiny
    models are built offline once into the cache; the random full-size ones in memory, at every start)."""

    builtin: Literal[
        "tiny-flux", "tiny-flux-edit", "tiny-redux", "tiny-flux2", "tiny-flux2-klein", "tiny-flux-canny",
        "tiny-flux-depth", "tiny-depth-anything", "flux-schnell-random", "flux-dev-random",
        "flux-schnell-random-small", "flux-dev-random-small",
    ] | None = None

    @property
    def in_memory(self) -> bool:
        """Built on the device at load time; nothing on disk to pull or check."""
        return self.builtin in RANDOM_BUILTINS


# The pipeline families (server/engine/families.py runs each):
# flux: FLUX.1 text-to-image (FluxPipeline; image_url → img2img, reference_images → Redux tokens);
# flux-kontext: FLUX.1 Kontext (FluxKontextPipeline; image_url → the image to edit, references beside it);
# flux2 / flux2-klein: FLUX.2 [dev] / [klein] (Flux2Pipeline / Flux2KleinPipeline; image_url and
#   reference_images → the pipeline's reference images, Together's meaning);
# flux-control: FLUX.1 Canny / Depth [dev] (FluxControlPipeline; image_url → the control image).
Family = Literal["flux", "flux-kontext", "flux2", "flux2-klein", "flux-control"]
# Families whose text encoder is T5 (sequence buckets bound T5 token counts).
T5_FAMILIES = ("flux", "flux-kontext", "flux-control")


class ControlSpec(BaseModel):
    """How a flux-control model turns the user's image (``image_url``) into its control image.

    canny: OpenCV's Canny edges with these hysteresis thresholds (diffusers' FLUX.1 Canny example: 50, 200);
    depth: a depth-estimation model (transformers' ``pipeline("depth-estimation")``), loaded once per worker
    (BFL's and diffusers' FLUX.1 Depth examples: Depth Anything, ``LiheYoung/depth-anything-large-hf``).
    """

    model_config = ConfigDict(extra="forbid")

    preprocessor: Literal["canny", "depth"]
    canny_low: int = Field(default=50, ge=0, le=255)
    canny_high: int = Field(default=200, ge=0, le=255)
    depth_model: ModelSource | None = None

    @model_validator(mode="after")
    def _complete(self) -> ControlSpec:
        if self.preprocessor == "depth" and self.depth_model is None:
            raise ValueError("control.preprocessor depth needs control.depth_model")
        if self.preprocessor == "canny" and self.depth_model is not None:
            raise ValueError("control.depth_model is for preprocessor depth only")
        if self.canny_low > self.canny_high:
            raise ValueError("control.canny_low must not exceed control.canny_high")
        return self


class Capabilities(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_to_image: bool = True
    negative_prompt: bool = True
    guidance: bool = True
    image_to_image: bool = False
    reference_images: bool = False
    loras: bool = False
    # Whether disable_safety_checker may be honored for this model (the operator must allow it too).
    safety_checker_optional: bool = True


class ModelSafety(BaseModel):
    """Which image checker this model's images go through (unless the config names one for all models)."""

    model_config = ConfigDict(extra="forbid")

    image_checker: ImageCheckerSpec | None = None


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = 20
    guidance_scale: float = 3.5
    # Scale of true classifier-free guidance, applied when a negative prompt is given.
    true_cfg_scale: float = 4.0
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = 512
    # img2img (FLUX.1 text-to-image models given image_url): how much of the input is re-noised,
    # 0 < strength <= 1; 1 ignores the image, small values keep it nearly unchanged.
    img2img_strength: float = Field(default=0.75, gt=0, le=1)


class CompileOptions(BaseModel):
    """torch.compile of the transformer and the VAE decoder (inductor), with an on-disk cache."""

    model_config = ConfigDict(extra="forbid")

    # none: eager; regional: each repeated block compiled once and reused (diffusers'
    # compile_repeated_blocks: start-up in seconds to a minute); full: the whole transformer.
    transformer: Literal["none", "regional", "full"] = "none"
    vae_decoder: bool = False
    fullgraph: bool = True
    # torch.compile mode, e.g. "max-autotune-no-cudagraphs"; None: torch's default.
    mode: str | None = None
    # The transformer's shapes, symbolic from the first compile (torch.compile(dynamic=True)): one graph
    # serves every image size, sequence bucket and batch size (batch 1 gets its own: torch specialises
    # sizes of 1), so the warm-up compiles a fixed handful of graphs however many shapes it covers, and a
    # request of a size nobody warmed usually compiles nothing either. false: one graph per shape (faster
    # kernels, but every (size, bucket, batch) shape must be warmed, within torch._dynamo's recompile limit
    # of 8 per block). null: torch's default (static first, dynamic from the first shape that changes).
    # The VAE decoder always compiles static shapes: it decodes one image at a time (VAE slicing), so its
    # only varying shape is the image size, one graph per warm-up size (up to 8), each with kernels made
    # for that size.
    dynamic: bool | None = True
    # torch.compile backend: inductor (generated kernels: the point on a GPU); "eager" / "aot_eager" trace
    # and guard exactly as inductor does (the same graphs and recompiles) without generating code, which is
    # what CPU tests and rehearsals that count recompiles use.
    backend: str = "inductor"
    # Inductor's cache (TORCHINDUCTOR_CACHE_DIR), kept across restarts; None: engine.compile_cache_dir.
    cache_dir: Path | None = None


class WarmupOptions(BaseModel):
    """What the worker runs per model before it reports ready."""

    model_config = ConfigDict(extra="forbid")

    # [width, height] pairs; each is run once per sequence bucket. Empty: one 64x64 call.
    sizes: list[tuple[int, int]] = Field(default_factory=list)
    steps: int = Field(default=1, ge=1)


class EngineOptions(BaseModel):
    """Per-model engine optimizations (server/engine/optimize.py). The defaults change nothing."""

    model_config = ConfigDict(extra="forbid")

    # diffusers' attention dispatcher backend (transformer.set_attention_backend), e.g. native,
    # _native_cudnn, _native_flash, flash (needs flash-attn installed); None: the model's default (SDPA).
    attention_backend: str | None = None
    # One QKV matmul per attention instead of three. LoRAs target to_q/to_k/to_v: not with loras.
    fuse_qkv: bool = False
    compile: CompileOptions = Field(default_factory=CompileOptions)
    # fp8: torchao dynamic float8 activations and weights, one scale per row, for the transformer's linears
    # (CUDA compute capability 8.9+); quantized block by block as it moves to the device (server/engine/
    # placement.py), so the device never holds the bf16 transformer whole.
    quantize: Literal["none", "fp8"] = "none"
    # Where the weights live between calls (diffusers' CPU offload, for cards smaller than the model):
    # none: all on the device; model: each component moves to the device while it runs
    # (enable_model_cpu_offload: FLUX.1 bf16 on ~24 GB with fp8, ~1-2 s more per call over PCIe);
    # sequential: layer by layer (enable_sequential_cpu_offload: a few GB of device memory, many times
    # slower).
    offload: Literal["none", "model", "sequential"] = "none"
    # The VAE decodes a batch one image at a time (always), and in overlapping tiles when width x height is
    # above this many pixels (bounded memory at large sizes; tiles blend at their seams, so pixels change a
    # little). Default: above 2 megapixels, so 1024x1024 and 1536x1024 decode whole and 2048x2048 is tiled.
    vae_tiling_pixels: int = Field(default=2 * 1024 * 1024, ge=64 * 64)
    # T5 lengths a request may be padded to: the smallest that holds its prompts (a conservative token
    # count: characters after NFKC + 2); longer prompts use defaults.max_sequence_length.
    sequence_buckets: list[int] = Field(default_factory=list)
    warmup: WarmupOptions = Field(default_factory=WarmupOptions)


def t5_token_bound(text: str) -> int:
    """An upper bound of T5's token count for ``text``, with no tokenizer.

    T5's SentencePiece unigram model normalises with NFKC and every piece covers at least one character,
    so the count is at most the normalised length plus the leading "▁" and the closing </s>.
    """
    import unicodedata

    return len(unicodedata.normalize("NFKC", text)) + 2


class ModelLimits(LimitSettings):
    """The server-wide ceilings (``LimitSettings``) as this model sets them, plus limits only a model has."""

    model_config = ConfigDict(extra="forbid")

    min_size: int = 64
    # What the pipeline needs: it runs at the next multiple of this and the image is cropped to the request.
    size_multiple: int = 16
    # What a request's width and height must be multiples of (Together asks for 8).
    request_multiple: int = 8
    max_reference_images: int = 4
    # FLUX.2 reference images are scaled down (aspect kept) to at most this many pixels, as
    # Flux2Pipeline does beyond 1024 x 1024; each costs (width / 16) x (height / 16) tokens.
    max_reference_pixels: int = Field(default=1024 * 1024, ge=64 * 64)


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    family: Family = "flux"
    source: ModelSource
    # FLUX.1 Redux prior (SigLIP + ReduxImageEncoder) that turns reference_images into prompt tokens.
    redux_prior: ModelSource | None = None
    # flux-control: how image_url becomes the control image.
    control: ControlSpec | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    owned_by: str = "darkroom"
    capabilities: Capabilities = Field(default_factory=Capabilities)
    defaults: Defaults = Field(default_factory=Defaults)
    limits: ModelLimits = Field(default_factory=ModelLimits)
    safety: ModelSafety = Field(default_factory=ModelSafety)
    engine: EngineOptions = Field(default_factory=EngineOptions)

    @model_validator(mode="after")
    def _conditioning_is_servable(self) -> ModelManifest:
        caps, family = self.capabilities, self.family
        if caps.reference_images and family == "flux" and self.redux_prior is None:
            raise ValueError(f"{self.id}: reference_images needs a redux_prior for family flux")
        if self.redux_prior is not None and family != "flux":
            raise ValueError(f"{self.id}: redux_prior is for family flux only")
        if (self.control is None) != (family != "flux-control"):
            raise ValueError(f"{self.id}: control is required for family flux-control, and for it only")
        if family == "flux-control" and (caps.reference_images or not caps.image_to_image):
            raise ValueError(f"{self.id}: a flux-control model takes its control image from image_url "
                             "(image_to_image: true) and no reference_images")
        # Flux2Pipeline (guidance-distilled) and FluxControlPipeline have no negative conditioning; a
        # distilled FLUX.2 [klein] has none either (the engine checks the weights' is_distilled).
        if caps.negative_prompt and family in ("flux2", "flux-control"):
            raise ValueError(f"{self.id}: family {family} has no negative conditioning; set "
                             "capabilities.negative_prompt: false")
        if family in ("flux2", "flux2-klein") and caps.image_to_image != caps.reference_images:
            raise ValueError(f"{self.id}: on FLUX.2, image_url is one more reference image: "
                             "image_to_image and reference_images go together")
        return self

    @model_validator(mode="after")
    def _random_weights_are_flux1(self) -> ModelManifest:
        if self.source.in_memory and self.family not in ("flux", "flux-kontext"):
            raise ValueError(f"{self.id}: builtin {self.source.builtin} is a FLUX.1 architecture; family "
                             f"{self.family} needs its own weights")
        return self

    @model_validator(mode="after")
    def _engine_options_fit(self) -> ModelManifest:
        if self.engine.fuse_qkv and self.capabilities.loras:
            raise ValueError(
                f"{self.id}: engine.fuse_qkv cannot serve LoRAs (they target the unfused to_q/to_k/to_v "
                "projections); turn off capabilities.loras or engine.fuse_qkv"
            )
        engine = self.engine
        if engine.offload == "sequential" and (engine.quantize != "none" or engine.compile.transformer != "none"
                                               or engine.compile.vae_decoder):
            raise ValueError(
                f"{self.id}: engine.offload: sequential moves weights layer by layer and cannot be combined "
                "with engine.quantize or engine.compile; use offload: model (fp8 fits FLUX.1 on ~24 GB cards)"
            )
        buckets = self.engine.sequence_buckets
        if buckets and self.family not in T5_FAMILIES:
            raise ValueError(f"{self.id}: engine.sequence_buckets bound T5 token counts; family "
                             f"{self.family} has another text encoder")
        if buckets != sorted(set(buckets)) or any(b < 1 for b in buckets):
            raise ValueError(f"{self.id}: engine.sequence_buckets must be positive and increasing")
        if buckets and buckets[-1] > self.defaults.max_sequence_length:
            raise ValueError(
                f"{self.id}: engine.sequence_buckets must not exceed defaults.max_sequence_length "
                f"({self.defaults.max_sequence_length})"
            )
        return self

    def uses_lora_slots(self, loras: LoraSettings) -> bool:
        """Whether this model's LoRAs go into fixed hotswap slots: with ``loras.hotswap``, and always when
        its transformer is compiled (a named adapter per LoRA set would recompile the transformer on every
        new set, and after dynamo's recompile limit leave it running eagerly). Then a request takes at
        most ``loras.hotswap_slots`` LoRAs (server/engine/adapters.py, server/engine/lora_slots.py)."""
        return self.capabilities.loras and (loras.hotswap or self.engine.compile.transformer != "none")

    def sequence_length(self, *texts: str | None) -> int:
        """The T5 length of a call with these prompts: the smallest bucket that holds them, else the
        full defaults.max_sequence_length (so a bucket never truncates more than no bucket would)."""
        need = max((t5_token_bound(t) for t in texts if t is not None), default=0)
        for bucket in self.engine.sequence_buckets:
            if need <= bucket:
                return bucket
        return self.defaults.max_sequence_length

    def effective_limits(self, server: LimitSettings) -> ModelLimits:
        """The tighter of the manifest's and the operator's limits."""
        ceilings = LimitSettings.model_fields
        return self.limits.model_copy(
            update={name: min(getattr(self.limits, name), getattr(server, name)) for name in ceilings}
        )


def load_manifests(directory: Path) -> dict[str, ModelManifest]:
    """Every ``*.yaml`` manifest in a folder, keyed by id."""
    manifests: dict[str, ModelManifest] = {}
    for file in sorted(directory.glob("*.yaml")):
        manifest = ModelManifest.model_validate(yaml.safe_load(file.read_text()))
        if manifest.id in manifests:
            raise ValueError(f"duplicate model id {manifest.id!r} in {file}")
        manifests[manifest.id] = manifest
    return manifests


class Registry:
    """The models this server serves, looked up by id or alias.

    Names: each manifest's ``id`` and ``aliases`` (Together's ids for the same weights ship there), and the
    operator's map (``aliases: {requested-id: served-id}`` at the top of the settings), so code naming a
    model this server does not have (a closed one, say) runs on the one the operator chose.
    """

    def __init__(self, manifests: list[ModelManifest], aliases: dict[str, str] | None = None) -> None:
        if not manifests:
            raise ValueError("a registry needs at least one model")
        self.models = manifests
        self._by_name: dict[str, ModelManifest] = {}
        for manifest in manifests:
            for name in (manifest.id, *manifest.aliases):
                if name in self._by_name:
                    raise ValueError(f"model name {name!r} is used twice")
                self._by_name[name] = manifest
        # requested id -> served manifest id (the operator's map)
        self.operator_aliases: dict[str, str] = {}
        for requested, served in (aliases or {}).items():
            if requested in self._by_name:
                raise ValueError(f"aliases: {requested!r} already names the served model "
                                 f"{self._by_name[requested].id}")
            target = self._by_name.get(served)
            if target is None:
                raise ValueError(f"aliases: {requested!r} maps to {served!r}, which is not served here; "
                                 f"served: {', '.join(m.id for m in manifests)}")
            self.operator_aliases[requested] = target.id
        for requested, served_id in self.operator_aliases.items():
            self._by_name[requested] = self._by_name[served_id]

    def names(self, manifest: ModelManifest) -> list[str]:
        """Every other name that resolves to ``manifest``: its aliases, then the operator's."""
        return [*manifest.aliases, *(a for a, served in self.operator_aliases.items() if served == manifest.id)]

    @property
    def default(self) -> ModelManifest:
        return self.models[0]

    def get(self, name: str | None,
            visible: Callable[[ModelManifest], bool] | None = None) -> ModelManifest:
        """The served model ``name`` names (an id or alias); the default model for None.

        404 (``ModelNotFound``) for a name nothing here answers to; it lists the served ids ``visible``
        admits (an API key limited to some models sees only those, as ``/v1/models`` shows it), every one
        without ``visible``.
        """
        if name is None:
            return self.default
        try:
            return self._by_name[name]
        except KeyError:
            served = ", ".join(m.id for m in self.models if visible is None or visible(m)) or "none"
            raise ModelNotFound(
                f"model {name!r} is not served here; available: {served}", param="model"
            ) from None

    @classmethod
    def from_settings(cls, models_dir: Path, served: list[str],
                      aliases: dict[str, str] | None = None) -> Registry:
        available = load_manifests(models_dir)
        lookup = {name: m for m in available.values() for name in (m.id, *m.aliases)}
        missing = [name for name in served if name not in lookup]
        if missing:
            raise ValueError(
                f"no manifest in {models_dir} for {', '.join(missing)}; "
                f"known: {', '.join(sorted(available))}"
            )
        chosen = list(dict.fromkeys(lookup[name].id for name in served))
        return cls([available[model_id] for model_id in chosen], aliases)
