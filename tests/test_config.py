"""Settings come from defaults, a YAML file and DARKROOM_* variables, in that order of strength."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import REPO_ROOT, Settings, load_settings
from server.registry import Registry


def test_defaults_are_the_embedded_tiny_model() -> None:
    settings = Settings()
    assert settings.models == ["darkroom/tiny-flux"]
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8000)
    registry = Registry.from_settings(settings.models_dir, settings.models)
    assert registry.default.source.builtin == "tiny-flux"


def test_shipped_default_config_matches_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    from_file = load_settings(REPO_ROOT / "configs" / "default.yaml")
    defaults = Settings()
    for section in ("limits", "queue", "scheduler", "loras"):
        assert getattr(from_file, section) == getattr(defaults, section), section
    assert from_file.engine.cache_dir == defaults.engine.cache_dir  # "~" is expanded
    assert from_file.engine.model_dump(exclude={"cache_dir"}) == defaults.engine.model_dump(exclude={"cache_dir"})
    assert from_file.server.port == defaults.server.port


def test_yaml_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  port: 9100\n  api_keys: [a, b]\nqueue:\n  max_jobs: 7\n")
    monkeypatch.setenv("DARKROOM_QUEUE__MAX_JOBS", "11")
    settings = load_settings(config)
    assert settings.server.port == 9100
    assert [k.get_secret_value() for k in settings.server.api_keys] == ["a", "b"]
    assert settings.queue.max_jobs == 11  # the environment wins over the file
    assert "a" not in repr(settings.server.api_keys)  # secrets are not printed


def test_config_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("scheduler:\n  max_batch_images: 3\n")
    monkeypatch.setenv("DARKROOM_CONFIG", str(config))
    assert load_settings().scheduler.max_batch_images == 3


def test_bad_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("queue:\n  max_jobs: many\n")
    with pytest.raises(ValueError, match="max_jobs"):
        load_settings(config)
    config.write_text("no_such_section: 1\n")
    with pytest.raises(ValueError, match="no_such_section"):
        load_settings(config)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml")


def test_unknown_served_model_is_refused() -> None:
    with pytest.raises(ValueError, match="no manifest"):
        Registry.from_settings(REPO_ROOT / "models", ["nope/nothing"])


def test_manifests_in_repo_are_valid() -> None:
    registry = Registry.from_settings(
        REPO_ROOT / "models",
        ["darkroom/tiny-flux", "black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev"],
    )
    schnell = registry.get("flux-schnell")
    assert schnell.defaults.steps == 4 and schnell.source.hub == "black-forest-labs/FLUX.1-schnell"
    assert registry.get("FLUX.1-dev").defaults.steps == 28
