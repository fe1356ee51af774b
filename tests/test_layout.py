"""The layout rule of ``server/``, checked: dependencies point one way, nothing imports in a cycle, and an API
pod (``darkroom api``) runs without torch.

The import contracts are declared in pyproject.toml (``[tool.importlinter]``) and checked by import-linter's
``lint-imports``, which reads every import statement of the package (those inside functions too), so a lazy
import that breaks a rule is caught as well; the torch-free start is checked on a real process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from .conftest import REPO
from .support.launch import REDIS_SERVER, RedisProcess, free_port, stop, wait_ready

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "cv2")


def test_import_contracts_hold() -> None:
    """Layers (cli -> api | worker -> queue | engine -> shared top level), a torch-free API, no cycles."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", "pyproject.toml"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout, proc.stdout


def test_api_modules_import_no_torch() -> None:
    """What ``darkroom api`` imports (the command, the app, the Redis queue) loads none of the GPU stack."""
    code = ("import sys, server.cli, server.api.app, server.api.runtime, server.queue.redis_api; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_darkroom_api_serves_without_torch(tmp_path: Path) -> None:
    """A real ``darkroom api`` process answers /health, /ready and /v1/models, and never maps libtorch."""
    redis_proc = RedisProcess(tmp_path).start()
    config = tmp_path / "api.yaml"
    config.write_text(yaml.safe_dump({
        "queue": {"backend": "redis", "redis_url": redis_proc.url},
        "storage": {"directory": str(tmp_path / "images")},
    }))
    port = free_port()
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", "api", "--config", str(config),
                                 "--port", str(port)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/ready", [proc], 90, log.read_text)
        assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["darkroom/tiny-flux"]
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps and "/torch/" not in maps
    finally:
        stop(proc)
        redis_proc.stop()
