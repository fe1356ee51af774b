"""Which ``FamilyRunner`` serves which manifest ``family`` (server/registry.py lists the families)."""

from __future__ import annotations

from ..config import EngineSettings
from ..registry import ModelManifest
from .control import ControlRunner
from .flux1 import FluxRunner, KontextRunner
from .flux2 import Flux2Runner
from .runner import FamilyRunner

RUNNERS: dict[str, type[FamilyRunner]] = {
    "flux": FluxRunner,
    "flux-kontext": KontextRunner,
    "flux2": Flux2Runner,
    "flux2-klein": Flux2Runner,
    "flux-control": ControlRunner,
}


def load_runner(manifest: ModelManifest, settings: EngineSettings, device: str) -> FamilyRunner:
    """The manifest's model loaded on ``device`` by its family's runner."""
    return RUNNERS[manifest.family](manifest, settings, device)
