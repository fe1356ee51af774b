"""The in-process test tier: the real app (``create_app(settings, runtime)``) in the test process, called
through httpx, with no server process and no socket.

The app's lifespan (its runtime: queue, workers, guards) runs on an event loop in a background thread (an
anyio blocking portal); ``client`` is a plain ``httpx.Client`` whose transport hands each request to the app
through ``httpx.ASGITransport`` on that loop. Because it is an ``httpx.Client``, the together 3.x and openai
clients take it as their ``http_client=``. Unhandled errors answer 500 as a real server would, and the app's
log lines (logger ``server``) are kept for ``log()``.

Engines: ``"tiny"`` runs the real tiny FLUX in a worker thread (loads in a few seconds); ``"stand-in"``
answers with solid images from tests/support/standin.py (no torch work) for everything around the engine.
``listen()`` serves the same app on a free loopback port too (uvicorn on the app's event loop): ``url`` is then
a real ``http://127.0.0.1:PORT`` for callers that need a socket (together 1.x from its own venv, signed URLs
fetched with plain httpx, a browser), without the start-up of a ``darkroom serve`` process.

Metrics are process-wide (server/metrics.py): counters add up across the apps of one test process, and the
scrape-time gauges (queue depth, readiness, safety counters) are those of the app started last.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import anyio.from_thread
import httpx

from server.api.app import create_app
from server.api.runtime import Runtime
from server.config import Settings
from server.worker.wiring import device_slots, serve_workers, uses_processes

from .launch import free_port
from .standin import StandInEngine, stand_in_engine

URL = "http://testserver"
Engine = Literal["tiny", "stand-in"]


class _Body(httpx.AsyncByteStream):
    """A request body read from the sync client, chunk by chunk as it was sent (no content-length added)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


class PortalTransport(httpx.BaseTransport):
    """A sync httpx transport that runs ``httpx.ASGITransport`` on the app's event loop (``portal``)."""

    def __init__(self, app: Any, portal: anyio.from_thread.BlockingPortal) -> None:
        self.portal = portal
        # False: an unhandled error is the app's 500 response, as a server's client sees it.
        self.asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        chunks = [bytes(chunk) for chunk in request.stream]
        inner = httpx.Request(request.method, request.url, headers=request.headers, stream=_Body(chunks),
                              extensions=request.extensions)
        return self.portal.call(self._send, inner)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        response = await self.asgi.handle_async_request(request)
        body = b"".join([chunk async for chunk in response.stream])
        return httpx.Response(response.status_code, headers=response.headers, content=body,
                              extensions=response.extensions)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class InProcessServer:
    """An app built from a config dict, started in this process. Shaped like conftest's ``Server``
    (``url``, ``generate``, ``log``, ``stop``), with ``client`` (an httpx.Client) for everything else."""

    def __init__(self, settings: Settings, engine: Engine = "tiny",
                 stand_in: Callable[[str], StandInEngine] = stand_in_engine) -> None:
        self.settings = settings
        self.engine = engine
        self.url = URL
        self.storage_dir = settings.storage.directory
        self.engines: list[StandInEngine] = []  # the stand-in engines, for assertions on their calls
        # How each device's stand-in engine is made (in this process for worker threads; in each worker
        # process when the workers are processes, where it must be picklable: a class or a functools.partial
        # of one, and ``engines`` stays empty).
        self._make_stand_in = stand_in
        factory = stand_in if uses_processes(settings, len(device_slots(settings))) else self._stand_in
        workers = (serve_workers if engine == "tiny" else
                   functools.partial(serve_workers, engine_for=factory))
        self.runtime = Runtime.build(settings, workers)
        self.app = create_app(settings, self.runtime)
        self._stack = contextlib.ExitStack()
        self._records = _Records()
        # Set by start(): the app through httpx, which the SDKs take as their http_client too.
        self.client: httpx.Client
        self.http_client: httpx.Client | None

    def _stand_in(self, device: str) -> StandInEngine:
        self.engines.append(self._make_stand_in(device))
        return self.engines[-1]

    def start(self, timeout_s: float = 90.0) -> InProcessServer:
        """Run the lifespan (workers load) and wait until ``/ready`` answers 200."""
        logger = logging.getLogger("server")
        self._records.setLevel(self.settings.server.log_level.upper())
        logger.addHandler(self._records)
        level = logger.level
        logger.setLevel(self.settings.server.log_level.upper())
        self._stack.callback(logger.setLevel, level)
        self._stack.callback(logger.removeHandler, self._records)
        portal = self._portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
        lifespan = self.app.router.lifespan_context(self.app)
        self._stack.enter_context(portal.wrap_async_context_manager(lifespan))
        transport = PortalTransport(self.app, portal)
        self.client = self.http_client = httpx.Client(transport=transport, base_url=URL, timeout=120)
        self._stack.callback(self.client.close)
        deadline = time.monotonic() + timeout_s
        while (ready := self.client.get("/ready")).status_code != 200:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"in-process app not ready after {timeout_s}s: {ready.text}\n{self.log()}")
            time.sleep(0.05)
        return self

    def listen(self, timeout_s: float = 30.0) -> InProcessServer:
        """Serve the started app on a free loopback port too, with the production HTTP settings (uvicorn with
        ``uvicorn_options``, as ``darkroom serve`` runs it, on the app's own event loop); afterwards ``url`` and
        ``client`` go through that socket, and ``http_client`` is None (the SDKs open their own connections)."""
        import uvicorn

        from server.api.http import uvicorn_options

        port = free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, lifespan="off", log_config=None,
                                access_log=False, **uvicorn_options(self.settings.server))
        server = uvicorn.Server(config)
        serving = self._portal.start_task_soon(server.serve)

        def shut() -> None:
            server.should_exit = True
            serving.result(timeout=30)

        self._stack.callback(shut)  # before the lifespan ends (the stack closes last-in, first-out)
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if serving.done():
                serving.result()  # raises what stopped it
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {port} within {timeout_s}s")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=120)
        self._stack.callback(self.client.close)
        self.http_client = None
        return self

    def stop(self) -> None:
        """End the lifespan (the runtime stops: workers finish their batch) and the event loop."""
        self._stack.close()

    def log(self) -> str:
        return "\n".join(self._records.lines)

    def batches_with_loras(self, at_most: str, model: str = "darkroom/tiny-flux") -> float:
        """Pipeline calls so far with at most ``at_most`` LoRAs ("0.0", "1.0", ...): the cumulative bucket
        of ``darkroom_batch_loras`` on /metrics, 0 before the first call."""
        prefix = f'darkroom_batch_loras_bucket{{le="{at_most}",model="{model}"}} '
        lines = self.client.get("/metrics").text.splitlines()
        return next((float(line[len(prefix):]) for line in lines if line.startswith(prefix)), 0.0)

    def generate(self, **body: Any) -> httpx.Response:
        body.setdefault("model", "darkroom/tiny-flux")
        return self.client.post("/v1/images/generations", json=body)

    def async_client(self) -> httpx.AsyncClient:
        """For ``async`` tests: the app through ``httpx.ASGITransport`` on the caller's own event loop (the
        runtime keeps running on its thread)."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
                                 base_url=URL, timeout=120)


def in_process_settings(workdir: Path, cache_dir: Path, config: dict[str, Any] | None = None) -> Settings:
    """Settings from a config dict, sections merged over the test defaults (storage in ``workdir``, models
    cached in ``cache_dir``), as conftest's subprocess ``Server`` merges them."""
    merged: dict[str, Any] = {
        "storage": {"directory": str(workdir / "images")},
        "engine": {"cache_dir": str(cache_dir)},
    }
    for section, values in (config or {}).items():
        if isinstance(values, dict):
            merged.setdefault(section, {}).update(values)
        else:
            merged[section] = values
    return Settings(**merged)


@contextlib.contextmanager
def in_process(workdir: Path, cache_dir: Path, config: dict[str, Any] | None = None,
               engine: Engine = "tiny") -> Iterator[InProcessServer]:
    """One started in-process server for the length of the block."""
    server = InProcessServer(in_process_settings(workdir, cache_dir, config), engine).start()
    try:
        yield server
    finally:
        server.stop()
