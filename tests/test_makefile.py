"""The Makefile's venv stamps, run by the real ``make`` in a temporary copy of the repository's Makefile and
pyproject.toml. ``PYTHON`` is a stand-in that records every call (and makes a venv folder holding another
stand-in as its python) instead of building anything, so nothing is downloaded and the shared venv is never
touched. What it checks: the venv is built once, rebuilt (with the new wheel) when ``TORCH`` changes,
reinstalled without a rebuild when pyproject.toml changes, and a venv from before the stamps is kept."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REPO

MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")

# Records its arguments; `-m venv DIR` creates DIR/bin/python (this script again) like a real venv.
FAKE_PYTHON = """#!/bin/sh
echo "python $*" >> "$CALLS"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && chmod +x "$3/bin/python"
fi
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return tmp_path


def make(checkout: Path, *args: str) -> list[str]:
    """Run `make install ARGS` in the copy; the python calls it made, one per line."""
    calls = checkout / "calls.log"
    calls.write_text("")
    proc = subprocess.run(
        [MAKE, "install", f"PYTHON={checkout / 'fake-python'}", *args], cwd=checkout,
        env={**os.environ, "CALLS": str(calls)}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return calls.read_text().splitlines()


def torch_installs(calls: list[str]) -> list[str]:
    return [c for c in calls if "pip install" in c and "torch" in c]


def test_venv_is_rebuilt_when_the_torch_requirement_changes(checkout: Path) -> None:
    first = make(checkout)
    assert any(c.endswith("-m venv .venv") for c in first)
    assert torch_installs(first) == ["python -m pip install -q torch==2.13.0"]
    assert any('install -q -e .[test]' in c for c in first)

    assert make(checkout) == []  # built: nothing to do

    # The GPU instructions: another torch build on the same checkout rebuilds the venv with it.
    cuda = make(checkout, "TORCH=torch==2.13.0+cu128")
    assert any(c.endswith("-m venv .venv") for c in cuda)
    assert torch_installs(cuda) == ["python -m pip install -q torch==2.13.0+cu128"]
    assert any('install -q -e .[test]' in c for c in cuda)
    stamps = list((checkout / ".venv").glob(".torch-*"))
    assert [s.read_text().strip() for s in stamps] == ["torch==2.13.0+cu128"]

    assert make(checkout, "TORCH=torch==2.13.0+cu128") == []
    # Back to the default: rebuilt again.
    assert torch_installs(make(checkout)) == ["python -m pip install -q torch==2.13.0"]


def test_pyproject_change_reinstalls_the_project_only(checkout: Path) -> None:
    make(checkout)
    time.sleep(1.1)  # make compares modification times (whole seconds on some file systems)
    (checkout / "pyproject.toml").touch()
    calls = make(checkout)
    assert calls == ["python -m pip install -q -e .[test]"]


def test_venv_from_before_the_stamps_is_kept_for_the_default_torch(checkout: Path) -> None:
    # What an older Makefile left: a venv with .installed and no torch stamp.
    (checkout / ".venv" / "bin").mkdir(parents=True)
    time.sleep(1.1)
    (checkout / ".venv" / ".installed").touch()
    assert make(checkout) == []
    assert [s.read_text().strip() for s in (checkout / ".venv").glob(".torch-*")] == ["torch==2.13.0"]


def test_venv_from_before_the_stamps_is_rebuilt_for_another_torch(checkout: Path) -> None:
    (checkout / ".venv" / "bin").mkdir(parents=True)
    time.sleep(1.1)
    (checkout / ".venv" / ".installed").touch()
    calls = make(checkout, "TORCH=torch")
    assert torch_installs(calls) == ["python -m pip install -q torch"]


def test_dry_run_shows_the_rebuild(checkout: Path) -> None:
    """`make -n serve TORCH=...` on a built checkout prints the rebuild and runs nothing."""
    make(checkout)
    proc = subprocess.run([MAKE, "-n", "serve", "TORCH=torch", f"PYTHON={checkout / 'fake-python'}"],
                          cwd=checkout, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert 'pip install -q "torch"' in proc.stdout and "rm -rf .venv" in proc.stdout
    assert ".venv/bin/darkroom serve" in proc.stdout
    assert (checkout / ".venv" / ".installed").exists()  # -n ran nothing
