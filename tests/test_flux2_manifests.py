"""The manifests of the FLUX.2, FLUX.1 Krea and Canny/Depth models: what they name, that ``darkroom models``
and ``darkroom pull`` know them (the Depth model's depth-estimation weights too), that a real model without
its weights refuses to start, and that a manifest asking for what its family cannot do is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from server.registry import ModelManifest, load_manifests

from .conftest import REPO, free_port

REAL = {
    "black-forest-labs/FLUX.2-dev": ("flux2", "black-forest-labs/FLUX.2-dev"),
    "black-forest-labs/FLUX.2-klein-4B": ("flux2-klein", "black-forest-labs/FLUX.2-klein-4B"),
    "black-forest-labs/FLUX.2-klein-9B": ("flux2-klein", "black-forest-labs/FLUX.2-klein-9B"),
    "black-forest-labs/FLUX.2-klein-base-4B": ("flux2-klein", "black-forest-labs/FLUX.2-klein-base-4B"),
    "black-forest-labs/FLUX.2-klein-base-9B": ("flux2-klein", "black-forest-labs/FLUX.2-klein-base-9B"),
    "black-forest-labs/FLUX.1-Krea-dev": ("flux", "black-forest-labs/FLUX.1-Krea-dev"),
    "black-forest-labs/FLUX.1-Canny-dev": ("flux-control", "black-forest-labs/FLUX.1-Canny-dev"),
    "black-forest-labs/FLUX.1-Depth-dev": ("flux-control", "black-forest-labs/FLUX.1-Depth-dev"),
}
TINY = ["darkroom/tiny-flux2", "darkroom/tiny-flux2-klein", "darkroom/tiny-flux-canny",
        "darkroom/tiny-flux-depth"]


def test_real_manifests_name_hub_ids_and_upstream_defaults() -> None:
    manifests = load_manifests(REPO / "models")
    for model_id, (family, hub) in REAL.items():
        m = manifests[model_id]
        assert (m.family, m.source.hub, m.dtype) == (family, hub, "bfloat16"), model_id
    dev = manifests["black-forest-labs/FLUX.2-dev"]
    d = dev.defaults
    assert (d.steps, d.guidance_scale, d.max_sequence_length) == (50, 4.0, 512)
    assert dev.limits.max_reference_images == 6 and not dev.capabilities.negative_prompt
    assert dev.capabilities.loras and dev.capabilities.reference_images
    for size in ("4B", "9B"):
        distilled = manifests[f"black-forest-labs/FLUX.2-klein-{size}"]
        base = manifests[f"black-forest-labs/FLUX.2-klein-base-{size}"]
        assert (distilled.defaults.steps, distilled.defaults.guidance_scale) == (4, 1.0)
        assert not distilled.capabilities.negative_prompt and base.capabilities.negative_prompt
        assert (base.defaults.steps, base.defaults.guidance_scale) == (50, 4.0)
        assert distilled.limits.max_reference_images == base.limits.max_reference_images == 4
    krea = manifests["black-forest-labs/FLUX.1-Krea-dev"]
    assert (krea.defaults.steps, krea.defaults.guidance_scale) == (28, 4.5)
    canny = manifests["black-forest-labs/FLUX.1-Canny-dev"]
    assert canny.control is not None and (canny.control.preprocessor, canny.control.canny_low,
                                          canny.control.canny_high) == ("canny", 50, 200)
    assert (canny.defaults.steps, canny.defaults.guidance_scale) == (50, 30.0)
    depth = manifests["black-forest-labs/FLUX.1-Depth-dev"]
    assert depth.control is not None and depth.control.depth_model is not None
    assert depth.control.depth_model.hub == "LiheYoung/depth-anything-large-hf"
    assert (depth.defaults.steps, depth.defaults.guidance_scale) == (30, 10.0)
    for m in (canny, depth):
        assert not m.capabilities.reference_images and not m.capabilities.negative_prompt


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("flux2-manifests")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"models_dir": str(REPO / "models"),
                                      "engine": {"cache_dir": str(root / "cache")}}))
    # An empty Hub cache and no network: every Hub model is missing.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root / "hub"),
           "HF_HOME": str(root / "hf")}
    return {"root": root, "config": config, "env": env}


def darkroom(env: dict[str, Any], *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", *args, "--config", str(config or env["config"])],
                          cwd=REPO, env=env["env"], capture_output=True, text=True, timeout=300)


def test_darkroom_models_checks_them(env: dict[str, Any]) -> None:
    out = darkroom(env, "models", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["id"]: row for row in json.loads(out.stdout)}
    for model_id, (_, hub) in REAL.items():
        assert rows[model_id]["present"] is False, model_id
        assert rows[model_id]["weights"][0] == {"role": "model", "source": f"hub:{hub}", "present": False,
                                                "where": "not in the local Hub cache"}
    depth_roles = {w["role"]: w["source"] for w in rows["black-forest-labs/FLUX.1-Depth-dev"]["weights"]}
    assert depth_roles["depth model"] == "hub:LiheYoung/depth-anything-large-hf"
    for model_id in TINY:
        assert rows[model_id]["present"] is True, model_id
    tiny_depth = {w["role"]: w["source"] for w in rows["darkroom/tiny-flux-depth"]["weights"]}
    assert tiny_depth["depth model"] == "builtin:tiny-depth-anything"


def test_pull_builds_the_tiny_depth_model_and_its_depth_estimator(env: dict[str, Any]) -> None:
    out = darkroom(env, "pull", "tiny-flux-depth")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "model: builtin:tiny-flux-depth ready" in out.stdout
    assert "depth model: builtin:tiny-depth-anything ready" in out.stdout
    assert (env["root"] / "cache" / "tiny-depth-anything-v1" / "config.json").is_file()


@pytest.mark.parametrize("model", ["black-forest-labs/FLUX.2-dev", "black-forest-labs/FLUX.1-Depth-dev"])
def test_real_models_refuse_to_start_without_weights(env: dict[str, Any], model: str) -> None:
    config = env["root"] / f"serve-{model.split('/')[1]}.yaml"
    config.write_text(yaml.safe_dump({"models_dir": str(REPO / "models"), "models": [model],
                                      "engine": {"cache_dir": str(env["root"] / "cache")}}))
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--config", str(config), "--port",
                          str(free_port())], cwd=REPO, env=env["env"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert "not starting" in out.stderr and f"run `darkroom pull {model}` first" in out.stderr, out.stderr


def _manifest(**changes: Any) -> dict[str, Any]:
    data = yaml.safe_load((REPO / "models" / "tiny-flux2.yaml").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    return data


@pytest.mark.parametrize("changes, words", [
    ({"capabilities__negative_prompt": True}, "no negative conditioning"),
    ({"capabilities__image_to_image": False}, "go together"),
    ({"engine": {"sequence_buckets": [64]}}, "T5"),
    ({"family": "flux-control", "capabilities__negative_prompt": False}, "control is required"),
    ({"control": {"preprocessor": "canny"}}, "control is required"),
    ({"family": "flux-control", "control": {"preprocessor": "depth"}}, "depth_model"),
    ({"family": "flux-control", "control": {"preprocessor": "canny"}}, "no reference_images"),
    ({"redux_prior": {"builtin": "tiny-redux"}}, "family flux only"),
])
def test_manifests_that_ask_too_much_are_refused(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        ModelManifest.model_validate(_manifest(**changes))
