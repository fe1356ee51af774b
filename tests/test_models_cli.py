"""`darkroom models`, `darkroom pull` and the start-up refusal, without the Hub: the tiny builder (builtin),
local folders, and a Hugging Face cache laid out on disk (HF_HUB_OFFLINE=1) holding the tiny model as if it
had been pulled from a repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import MODEL, REPO, free_port, images_of

pytestmark = pytest.mark.heavy

HUB_MODEL = "darkroom-test/tiny-hub"
ABSENT = "darkroom-test/absent"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def manifest(model_id: str, source: dict[str, Any]) -> dict[str, Any]:
    data = yaml.safe_load((REPO / "models" / "tiny-flux.yaml").read_text())
    data.update(id=model_id, aliases=[], source=source)
    return data


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("models-cli")
    models = root / "models"
    models.mkdir()
    shutil.copy(REPO / "models" / "tiny-flux.yaml", models / "tiny-flux.yaml")
    local = root / "local-weights"
    shutil.copytree(tiny_cache / "tiny-flux-v1", local)
    for name, source in {
        "local-present": {"path": str(local)},
        "local-missing": {"path": str(root / "nowhere")},
        "tiny-hub": {"hub": HUB_MODEL},
        "absent": {"hub": ABSENT},
        "broken-hub": {"hub": "darkroom-test/broken"},
    }.items():
        model_id = name if "/" in name or name.startswith("local") else f"darkroom-test/{name}"
        (models / f"{name}.yaml").write_text(yaml.safe_dump(manifest(model_id, source)))
    # A Hub cache as `darkroom pull` (snapshot_download) leaves it: refs/main -> snapshots/<commit>/.
    hub = root / "hub"
    for repo, drop in ((HUB_MODEL, None), ("darkroom-test/broken", "transformer")):
        folder = hub / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(COMMIT)
        shutil.copytree(tiny_cache / "tiny-flux-v1", folder / "snapshots" / COMMIT)
        if drop:  # an interrupted download: a component is missing
            shutil.rmtree(folder / "snapshots" / COMMIT / drop)
    fresh_cache = root / "fresh-cache"
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"models_dir": str(models), "engine": {"cache_dir": str(fresh_cache)}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_HOME": str(root / "hf-home")}
    return {"root": root, "models": models, "hub": hub, "config": config, "env": env, "fresh": fresh_cache}


def darkroom(layout: dict[str, Any], *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", *args, "--config", str(config or layout["config"])],
                          cwd=REPO, env=layout["env"], capture_output=True, text=True, timeout=120)


def test_models_lists_manifests_and_presence(layout: dict[str, Any]) -> None:
    out = darkroom(layout, "models", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["id"]: row for row in json.loads(out.stdout)}
    assert set(rows) == {MODEL, "local-present", "local-missing", HUB_MODEL, ABSENT, "darkroom-test/broken-hub"}
    present = {model_id: row["present"] for model_id, row in rows.items()}
    assert present == {MODEL: True, "local-present": True, "local-missing": False, HUB_MODEL: True,
                       ABSENT: False, "darkroom-test/broken-hub": False}
    assert rows[MODEL]["served"] is True and rows[HUB_MODEL]["served"] is False
    assert rows[HUB_MODEL]["weights"][0]["where"].endswith(COMMIT)
    assert "incomplete" in rows["darkroom-test/broken-hub"]["weights"][0]["where"]
    assert [w["role"] for w in rows[MODEL]["weights"]] == ["model", "image checker"]

    table = darkroom(layout, "models")
    assert table.returncode == 0
    lines = {line.split()[0]: line for line in table.stdout.splitlines() if line and not line.startswith(" ")}
    assert "present" in lines[HUB_MODEL] and "missing" in lines[ABSENT] and "hub:darkroom-test/absent" in lines[ABSENT]


def test_pull_builtin_builds_it(layout: dict[str, Any]) -> None:
    assert not (layout["fresh"] / "tiny-flux-v1").exists()
    out = darkroom(layout, "pull", "tiny-flux")  # an alias works too
    assert out.returncode == 0, out.stderr
    assert (layout["fresh"] / "tiny-flux-v1" / "model_index.json").is_file()
    assert "model: builtin:tiny-flux ready" in out.stdout


def test_pull_hub_model_already_cached(layout: dict[str, Any]) -> None:
    out = darkroom(layout, "pull", HUB_MODEL)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"model: hub:{HUB_MODEL} ready at" in out.stdout and COMMIT in out.stdout


def test_pull_failures_are_reported(layout: dict[str, Any]) -> None:
    missing = darkroom(layout, "pull", "local-missing")
    assert missing.returncode == 1 and "cannot be pulled" in missing.stdout
    offline = darkroom(layout, "pull", ABSENT)  # no network here (HF_HUB_OFFLINE): the download fails cleanly
    assert offline.returncode == 1 and "download failed" in offline.stdout and "Traceback" not in offline.stderr
    unknown = darkroom(layout, "pull", "no-such-model")
    assert unknown.returncode == 2 and "no manifest" in unknown.stderr


@pytest.mark.parametrize("model, message", [
    (ABSENT, f"run `darkroom pull {ABSENT}` first"),
    ("darkroom-test/broken-hub", "run `darkroom pull darkroom-test/broken-hub` first"),
    ("local-missing", "no folder"),
])
def test_serve_refuses_missing_weights(layout: dict[str, Any], model: str, message: str) -> None:
    config = layout["root"] / f"serve-{model.replace('/', '-')}.yaml"
    config.write_text(yaml.safe_dump({"models_dir": str(layout["models"]), "models": [model],
                                      "engine": {"cache_dir": str(layout["fresh"])}}))
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--config", str(config), "--port",
                          str(free_port())], cwd=REPO, env=layout["env"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "not starting" in out.stderr and message in out.stderr, out.stderr


def test_serve_starts_a_pulled_hub_model(layout: dict[str, Any], make_server: Any) -> None:
    server = make_server({"models_dir": str(layout["models"]), "models": [HUB_MODEL],
                          "server": {"default_response_format": "base64"}},
                         env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(layout["hub"])})
    response = server.generate(model=HUB_MODEL, prompt="a lighthouse", width=64, height=64, steps=1)
    assert images_of(response)[0].size == (64, 64)
    assert f"from={HUB_MODEL}" in server.log()
