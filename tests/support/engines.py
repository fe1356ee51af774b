"""The tiny model's manifest with an ``engine:`` block, and a loaded CPU engine for it: what the engine-option
tests (tests/test_optimize.py, tests/test_placement.py) build their cases from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from server.config import EngineSettings
from server.engine.pipelines import Engine
from server.registry import ModelManifest, Registry

TINY = yaml.safe_load((Path(__file__).resolve().parents[2] / "models" / "tiny-flux.yaml").read_text())


def tiny_manifest(engine: dict[str, Any] | None = None, **changes: Any) -> ModelManifest:
    """The tiny FLUX's manifest with ``changes`` and this ``engine:`` block, without its image checker."""
    data = {**TINY, **changes}
    data.pop("safety", None)  # the image checker is not what these tests look at
    if engine is not None:
        data["engine"] = engine
    return ModelManifest.model_validate(data)


def cpu_engine(manifest: ModelManifest, cache: Path) -> Engine:
    """An engine serving ``manifest`` alone on the CPU, loaded (not warmed)."""
    engine = Engine(Registry([manifest]), EngineSettings(cache_dir=cache), "cpu")
    engine.load()
    return engine
