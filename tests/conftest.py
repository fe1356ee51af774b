"""Shared fixtures: the app in-process (``make_app``, ``app``), a real ``darkroom serve`` process on a free
loopback port (``make_server``, ``server``) where a real process matters, and ways to call either.

Both kinds answer the same calls: ``.url``, ``.client`` (an httpx.Client with ``.url`` as its base),
``.http_client`` (what to hand the together 3.x / openai clients: None for a process), ``.generate(**body)``
and ``.log()``. In-process apps are the default tier (no process start, no socket); see
tests/support/inprocess.py. Every server runs the embedded tiny FLUX model (or, in-process, the stand-in
engine), built once per test session into a shared cache. Tests pass small sizes and few steps so the whole
suite stays fast on two CPU cores.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from .support.inprocess import Engine, InProcessServer, in_process_settings
from .support.launch import free_port, stop, wait_ready
from .support.standin import StandInEngine, stand_in_engine

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (`make test` runs two workers on two cores) each worker is one core's worth: one
    # torch/OpenMP thread (spinning OpenMP threads of two processes slow each other down many times over),
    # and inductor compiles in this process instead of starting a pool of compile workers. Read at import.
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
        os.environ.setdefault(_name, "1")

REPO = Path(__file__).resolve().parents[1]
TOGETHER1_PYTHON = REPO / ".venv-together1" / "bin" / "python"
MODEL = "darkroom/tiny-flux"


class Server:
    """A ``darkroom serve`` subprocess with its own config, storage folder and log file."""

    def __init__(self, workdir: Path, cache_dir: Path, config: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.storage_dir = workdir / "images"
        merged: dict[str, Any] = {
            "storage": {"directory": str(self.storage_dir)},
            # One torch thread per server: several servers share two cores, and OpenMP's spinning
            # threads slow each other down many times over when oversubscribed.
            "engine": {"cache_dir": str(cache_dir), "cpu_threads": 1},
        }
        for section, values in (config or {}).items():
            if isinstance(values, dict):
                merged.setdefault(section, {}).update(values)
            else:
                merged[section] = values
        self.config_file = workdir / "config.yaml"
        self.config_file.write_text(yaml.safe_dump(merged))
        self.log_file = workdir / "server.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=120)
        self.http_client: httpx.Client | None = None  # the SDKs open their own connections to a process

    def start(self, timeout_s: float = 90.0) -> Server:
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server", "serve", "--config", str(self.config_file),
                 "--port", str(self.port)],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            wait_ready(f"{self.url}/ready", [self.proc], timeout_s, self.log)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)
        self.client.close()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def generate(self, **body: Any) -> httpx.Response:
        body.setdefault("model", MODEL)
        return httpx.post(f"{self.url}/v1/images/generations", json=body, timeout=120)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the whole test run, the tiny FLUX built in it before any server starts; every
    other tiny model (and builtin checker) is built there on first use. With pytest-xdist the workers share
    it (a folder beside their own temp folders): ``ensure_built`` serialises builders with a file lock, so
    each model is built once per run, not once per worker."""
    from server.engine.tiny import ensure_tiny_flux

    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.getbasetemp().parent / "model-cache"
    else:
        cache = tmp_path_factory.mktemp("model-cache")
    ensure_tiny_flux(cache)
    return cache


@pytest.fixture(scope="module")
def make_server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[Any]:
    """Start servers with a given config; each is stopped when its test module ends."""
    started: list[Server] = []

    def _make(config: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Server:
        server = Server(tmp_path_factory.mktemp("server"), tiny_cache, config, env).start()
        started.append(server)
        return server

    yield _make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[Server]:
    """The plain default server, one process for the session (tests/test_clients.py and tests/test_logs.py,
    one work unit under xdist: see ``GROUPS``)."""
    started = Server(tmp_path_factory.mktemp("server"), tiny_cache,
                     {"server": {"default_response_format": "base64"}}).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def make_app(tmp_path_factory: pytest.TempPathFactory,
             tiny_cache: Path) -> Iterator[Callable[..., InProcessServer]]:
    """Start apps in-process from a config dict (sections merged over the test defaults), with the real tiny
    engine in a worker thread (``engine="tiny"``) or the stand-in engine (``engine="stand-in"``, made by
    ``stand_in(device)``, e.g. ``functools.partial(stand_in_engine, poison="x")``); ``listen=True`` serves it
    on a loopback port too (a real ``url`` for together 1.x, browsers, plain httpx); each is stopped when its
    test module ends."""
    started: list[InProcessServer] = []

    def _make(config: dict[str, Any] | None = None, engine: Engine = "tiny",
              stand_in: Callable[[str], StandInEngine] = stand_in_engine, *,
              listen: bool = False) -> InProcessServer:
        settings = in_process_settings(tmp_path_factory.mktemp("app"), tiny_cache, config)
        started.append(InProcessServer(settings, engine, stand_in))
        started[-1].start()
        return started[-1].listen() if listen else started[-1]

    yield _make
    for app in started:
        app.stop()


@pytest.fixture(scope="module")
def app(make_app: Callable[..., InProcessServer]) -> InProcessServer:
    """The plain default app in-process (tiny engine, base64 answers), shared by a module's tests."""
    return make_app({"server": {"default_response_format": "base64"}})


class Reachable(Protocol):
    """What the SDK helpers need of a server, in-process or a process."""

    url: str
    http_client: httpx.Client | None


def together3(server: Reachable, key: str = "x") -> Any:
    """The together 3.x client on a server, without retries (a test wants the first answer)."""
    from together import Together

    return Together(base_url=server.url, api_key=key, max_retries=0, timeout=120,
                    http_client=server.http_client)


def openai_client(server: Reachable, key: str = "x") -> Any:
    """The openai client on a server (base URL ending in /v1, as its users configure it)."""
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120,
                  http_client=server.http_client)


T1_SCRIPT = r"""
import json, sys
import together
spec = json.load(sys.stdin)
results = []
for call in spec["calls"]:
    key = call.pop("__api_key", spec["api_key"])
    client = together.Together(base_url=spec["base_url"], api_key=key, max_retries=0, timeout=120)
    attempts = []
    for _ in range(spec.get("attempts", 1)):
        try:
            resp = client.images.generate(**call)
            attempts.append({"ok": True, "images": len(resp.data)})
        except Exception as exc:
            attempts.append({"ok": False, "cls": type(exc).__name__, "module": type(exc).__module__,
                             "message": str(exc), "status": getattr(exc, "http_status", None)})
            if spec.get("until") == type(exc).__name__:
                break
    results.append(attempts)
print("RESULT " + json.dumps(results))
"""


def run_together1(server: Reachable, calls: list[dict[str, Any]], key: str = "x", *,
                  attempts: int = 1, until: str | None = None) -> list[list[dict[str, Any]]]:
    """Run ``client.images.generate(**call)`` for each call with together 1.x (from its own venv, since
    1.x and 3.x cannot share one); per call, its attempts. A call's ``__api_key`` overrides ``key``."""
    if not TOGETHER1_PYTHON.exists():
        pytest.fail(f"{TOGETHER1_PYTHON} is missing: run `make test`, which installs together 1.x there")
    spec = {"base_url": server.url + "/v1", "api_key": key, "calls": calls,
            "attempts": attempts, "until": until}
    proc = subprocess.run(
        [str(TOGETHER1_PYTHON), "-c", T1_SCRIPT], input=json.dumps(spec), capture_output=True,
        text=True, timeout=300, env={**os.environ, "TOGETHER_NO_BANNER": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def decode_image(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def images_of(response: httpx.Response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    return [decode_image(item["b64_json"]) for item in response.json()["data"]]


# -- scheduling on pytest-xdist workers (`make test` runs `-n 2`) ------------------------------------------

# Where a module is not one unit of work: tests that share a process-wide fixture run in one worker (the
# session's `server`), and long tests that share nothing with their module run beside it.
GROUPS = {
    "tests/test_clients.py": "plain-server",
    "tests/test_logs.py": "plain-server",
    "tests/test_optimize.py::test_compiled_transformer_and_vae_match_eager": "inductor-compile",
    "tests/test_bench_engine.py::test_tiny_cpu_run_prints_baseline_and_darkroom_rows": "bench-engine-tiny",
    "tests/test_bench_engine.py::test_scaled_down_full_build_loads_through_a_manifest": "bench-engine-weights",
    "tests/test_bench_engine.py::test_random_rehearsal_runs_every_phase_with_no_recompile_after_ready":
        "bench-engine-rehearsal",
}


def work_unit(nodeid: str) -> str:
    """The unit of work of a test under xdist: its module (module-scoped servers start once), or its group."""
    test = nodeid.split("[", 1)[0]
    module = test.split("::", 1)[0]
    return GROUPS.get(test) or GROUPS.get(module) or module


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's load-scope scheduling with ``work_unit`` as the scope, units in collection order (heavy ones
    first, see below). xdist's own ``--dist loadgroup`` cannot be used: it renames node ids through an
    attribute that pytest 9 no longer reads, and silently spreads every test on its own."""
    if config.getoption("dist") not in ("load", "loadscope"):
        return None  # an explicit other --dist choice
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # collection order: the heavy units start first
    return ByWorkUnit(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``heavy`` (tens of seconds of CPU) run first, so that with two workers the run does not
    end waiting on one of them; everything else keeps its order."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # a stable sort


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI nothing may be skipped: a missing redis-server or chromium there is a broken install step."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {report.longrepr}"
