"""Model weights on disk: ``darkroom models`` (what is there), ``darkroom pull MODEL`` (fetch it), and the
start-up check that refuses to serve a model whose weights are missing.

A manifest's weights are its ``source``, its ``redux_prior``, its ``control.depth_model`` and its image safety
checker (the config's ``safety.image_checker`` when set, else the manifest's), plus the config's prompt
classifier. Each is:

- ``builtin``: built offline on first use into ``engine.cache_dir``; always available (``pull`` builds it);
- ``path``: a local folder, present when it exists (``pull`` cannot fetch it);
- ``hub``: a Hugging Face repo, present when it is in the local Hub cache (``HF_HOME`` / ``HF_HUB_CACHE``,
  where ``from_pretrained`` reads); ``pull`` downloads it there with the Hub client's progress bars, resuming
  any partial download.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Settings, WeightsSource
from .registry import ModelManifest, ModelSource, load_manifests

log = logging.getLogger(__name__)

# Weight formats from_pretrained never reads when safetensors are there.
_UNUSED = ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.ckpt", "*.gguf", "*.mlmodel", "*.tflite"]


@dataclass(frozen=True)
class Weights:
    """One set of weights a model needs."""

    role: str  # model, redux prior, depth model, image checker, prompt classifier
    source: WeightsSource
    # Folders of a repo that are used (None: the whole repo).
    subfolders: tuple[str, ...] | None = None

    @property
    def in_memory(self) -> bool:
        """A random-weight model built in memory at start (``builtin: flux-*-random``): nothing on disk."""
        return isinstance(self.source, ModelSource) and self.source.in_memory

    @property
    def kind(self) -> str:
        return "hub" if self.source.hub else "path" if self.source.path is not None else "builtin"

    def describe(self) -> str:
        s = self.source
        if s.hub:
            return f"hub:{s.hub}" + (f"@{s.revision}" if s.revision else "")
        if s.path is not None:
            return f"path:{s.path}"
        return f"builtin:{s.builtin}"


def manifest_weights(manifest: ModelManifest, settings: Settings) -> list[Weights]:
    weights = [Weights("model", manifest.source)]
    if manifest.redux_prior is not None:
        weights.append(Weights("redux prior", manifest.redux_prior))
    if manifest.control is not None and manifest.control.depth_model is not None:
        weights.append(Weights("depth model", manifest.control.depth_model))
    checker = settings.safety.image_checker or manifest.safety.image_checker
    if settings.safety.enabled and checker is not None and checker.source is not None:
        subs = tuple(s for s in (checker.source.subfolder, checker.source.processor_subfolder) if s)
        weights.append(Weights("image checker", checker.source, subs or None))
    classifier = settings.safety.prompt.classifier
    if settings.safety.enabled and classifier is not None:
        weights.append(Weights("prompt classifier", classifier.source,
                               (classifier.source.subfolder,) if classifier.source.subfolder else None))
    return weights


def find_manifest(name: str, settings: Settings) -> ModelManifest:
    manifests = load_manifests(settings.models_dir)
    for manifest in manifests.values():
        if name == manifest.id or name in manifest.aliases:
            return manifest
    raise KeyError(f"no manifest in {settings.models_dir} for {name!r}; known: {', '.join(sorted(manifests))}")


# -- presence ----------------------------------------------------------------------------------------


def _hub_snapshot(source: WeightsSource) -> Path | None:
    """The cached snapshot folder of a Hub source, or None (no network is used)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(source.hub), revision=source.revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _complete(folder: Path, subfolders: tuple[str, ...] | None) -> bool:
    """A diffusers pipeline: model_index.json and every component folder it names have files. Otherwise:
    the named subfolders (or the folder itself) have files."""
    def has_files(path: Path) -> bool:
        return path.is_dir() and any(p.is_file() for p in path.iterdir())

    index = folder / "model_index.json"
    if index.is_file():
        try:
            components = [k for k, v in json.loads(index.read_text()).items()
                          if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
        except (ValueError, AttributeError, IndexError):
            return False
        return all(has_files(folder / c) for c in components)
    return all(has_files(folder / s) for s in subfolders) if subfolders else has_files(folder)


def present(weights: Weights) -> tuple[bool, str]:
    """Whether the weights are available locally, and where (or why not)."""
    source = weights.source
    if weights.in_memory:
        return True, "random weights built in memory at start"
    if source.builtin is not None:
        return True, "built on first use"
    if source.path is not None:
        folder = source.path.expanduser()
        return folder.is_dir(), str(folder) if folder.is_dir() else f"no folder {folder}"
    snapshot = _hub_snapshot(source)
    if snapshot is None:
        return False, "not in the local Hub cache"
    if not _complete(snapshot, weights.subfolders):
        return False, f"incomplete in the local Hub cache ({snapshot})"
    return True, str(snapshot)


def missing_weights(settings: Settings) -> list[str]:
    """One message per missing set of weights of the served models (empty: all there)."""
    from .registry import Registry

    registry = Registry.from_settings(settings.models_dir, settings.models, settings.aliases)
    problems: list[str] = []
    seen: set[str] = set()
    for manifest in registry.models:
        for weights in manifest_weights(manifest, settings):
            ok, where = present(weights)
            if ok or weights.describe() in seen:
                continue
            seen.add(weights.describe())
            if weights.kind == "hub":
                problems.append(
                    f"model {manifest.id}: the {weights.role} weights ({weights.describe()}) are {where}; "
                    f"run `darkroom pull {manifest.id}` first (or set engine.allow_downloads: true in the "
                    "config, or DARKROOM_ENGINE__ALLOW_DOWNLOADS=true in the environment)")
            else:
                problems.append(f"model {manifest.id}: the {weights.role} weights ({weights.describe()}) are "
                                f"missing: {where}")
    return problems


# -- pulling -----------------------------------------------------------------------------------------


def _pull_hub(weights: Weights) -> Path:
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()
    source = weights.source
    repo, revision = str(source.hub), source.revision
    allow: list[str] | None = None
    ignore = list(_UNUSED)
    try:
        index = Path(hf_hub_download(repo, "model_index.json", revision=revision))
    except EntryNotFoundError:
        index = None
    if index is not None:  # a diffusers pipeline: only its components (not e.g. a single-file checkpoint)
        components = [k for k, v in json.loads(index.read_text()).items()
                      if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
        allow = ["model_index.json", *[f"{c}/*" for c in components]]
    elif weights.subfolders:
        allow = [f"{s}/*" for s in weights.subfolders] + ["*.json", "*.txt"]
    if not constants.HF_HUB_OFFLINE:
        files = HfApi().list_repo_files(repo, revision=revision)
        if any(f.endswith(".safetensors") for f in files):
            ignore += ["*.bin", "*.pt", "*.pth"]
    return Path(snapshot_download(repo, revision=revision, allow_patterns=allow, ignore_patterns=ignore))


def pull(name: str, settings: Settings, out: Any = sys.stdout) -> int:
    manifest = find_manifest(name, settings)
    failures = 0
    for weights in manifest_weights(manifest, settings):
        label = f"{weights.role}: {weights.describe()}"
        if weights.in_memory:
            print(f"{label}: random weights built in memory at start; nothing to pull", file=out)
        elif weights.kind == "builtin":
            location = _build_builtin(weights, settings)
            print(f"{label} ready at {location}", file=out)
        elif weights.kind == "path":
            ok, where = present(weights)
            if ok:
                print(f"{label} present", file=out)
            else:
                failures += 1
                print(f"{label} missing ({where}): a local folder cannot be pulled; copy the weights there "
                      "or point the manifest's source at a Hub repo", file=out)
        else:
            print(f"{label} downloading into the Hub cache", file=out, flush=True)
            try:
                snapshot = _pull_hub(weights)
            except Exception as exc:  # noqa: BLE001 - network, auth, a missing repo: say which, go on
                failures += 1
                print(f"{label} download failed: {type(exc).__name__}: {exc}", file=out)
                continue
            ok, where = present(weights)
            print(f"{label} {'ready at ' + str(snapshot) if ok else 'still incomplete: ' + where}", file=out)
            failures += 0 if ok else 1
    return 1 if failures else 0


def _build_builtin(weights: Weights, settings: Settings) -> Path:
    from .engine.weights import ensure_builtin  # the builders need torch and diffusers

    return ensure_builtin(str(weights.source.builtin), settings.engine.cache_dir)


# -- listing -----------------------------------------------------------------------------------------


def list_models(settings: Settings, as_json: bool = False, out: Any = sys.stdout) -> int:
    manifests = load_manifests(settings.models_dir)
    served = set(settings.models)
    rows = []
    for manifest in manifests.values():
        entries = []
        for weights in manifest_weights(manifest, settings):
            ok, where = present(weights)
            entries.append({"role": weights.role, "source": weights.describe(), "present": ok, "where": where})
        rows.append({
            "id": manifest.id, "aliases": manifest.aliases, "family": manifest.family,
            "served": bool(served & {manifest.id, *manifest.aliases}),
            "present": all(e["present"] for e in entries), "weights": entries,
        })
    if as_json:
        print(json.dumps(rows, indent=2), file=out)
        return 0
    width = max((len(r["id"]) for r in rows), default=10)
    print(f"{'MODEL':<{width}}  {'WEIGHTS':<9} {'SERVED':<6} SOURCE", file=out)
    for row in rows:
        state = "present" if row["present"] else "missing"
        print(f"{row['id']:<{width}}  {state:<9} {'yes' if row['served'] else 'no':<6} "
              f"{row['weights'][0]['source']}", file=out)
        for entry in row["weights"][1:]:
            print(f"{'':<{width}}  {'present' if entry['present'] else 'missing':<9} {'':<6} "
                  f"{entry['role']}: {entry['source']}", file=out)
    return 0
