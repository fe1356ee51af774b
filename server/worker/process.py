"""``darkroom worker``: a process with no HTTP API that runs jobs from the Redis queue on its devices.

One ``Worker`` thread per device (server/worker/loop.py, the same batching, safety screen and encoding as in
``darkroom serve``; wired in server/worker/wiring.py), each reading through its own consumer in the Redis
group. On SIGTERM (or SIGINT) a worker finishes the batch in hand, answers and acknowledges it, returns jobs
it read but did not start to the queue, and exits 0. On a sticky device error (an illegal address, ECC) it
exits 3, leaving that batch's jobs pending for another run, so the pod restarts with a fresh CUDA context
(Kubernetes runs one pod per GPU). A small HTTP listener (``worker.health_port``) answers
``/health`` (the process and its worker threads are alive) and ``/ready`` (models loaded, Redis reachable)
for probes.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .. import metrics
from ..config import Settings
from ..queue.redis_worker import RedisSource
from ..registry import Registry
from .loop import Worker
from .wiring import device_workers, redis_sources

log = logging.getLogger(__name__)


def _report(pairs: list[tuple[Worker, RedisSource]]) -> tuple[bool, bool, dict[str, Any]]:
    states: dict[str, Any] = {}
    alive = ready = True
    for worker, source in pairs:
        thread_alive = worker.alive
        redis_ok = source.healthy()
        state = worker.state
        states[worker.name] = {"state": state, "consumer": source.consumer, "redis": redis_ok,
                               "pipeline_calls": worker.calls, "reclaimed": source.reclaimed,
                               "compile": worker.compile_report()}
        alive = alive and (thread_alive or not worker.ready.is_set()) and not worker.failed
        ready = ready and worker.ready.is_set() and thread_alive and redis_ok
    return alive, ready, states


def _health_server(host: str, port: int, pairs: list[tuple[Worker, RedisSource]]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path == "/metrics":  # this process's batches, stages, images (server/metrics.py)
                payload, content_type = metrics.exposition()
                self.send_response(200)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            alive, ready, states = _report(pairs)
            if self.path == "/health":
                status, body = (200 if alive else 503), {"status": "ok" if alive else "failed"}
            elif self.path == "/ready":
                status, body = (200 if ready else 503), {"ready": ready, "workers": states}
            else:
                status, body = 404, {"error": {"message": "no such path", "type": "invalid_request_error",
                                               "param": None, "code": "not_found"}}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes are not news
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="worker-health", daemon=True).start()
    return server


def run_worker(settings: Settings) -> int:
    if settings.queue.backend != "redis":
        log.error("darkroom worker needs queue.backend: redis (set it, or DARKROOM_QUEUE__BACKEND=redis)")
        return 2
    registry = Registry.from_settings(settings.models_dir, settings.models)
    sources: list[RedisSource] = []
    consumer = redis_sources(settings)

    def source_for(device: str) -> RedisSource:
        sources.append(consumer(device))
        return sources[-1]

    # A sticky device error leaves the batch's jobs pending in the group: the process exits (below) and they
    # are run again, by its restart or another worker, at most queue.max_attempts times.
    workers = device_workers(settings, registry, source_for, answer_on_device_error=False)
    pairs = list(zip(workers, sources, strict=True))
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    health = None
    if settings.worker.health_port:
        metrics.attach(metrics.RuntimeCollector(workers=workers))
        health = _health_server(settings.worker.health_host, settings.worker.health_port, pairs)
    for worker in workers:
        worker.start()
    log.info("worker process started consumers=%s redis=%s",
             ",".join(source.consumer for source in sources),
             settings.queue.redis_url.split("@")[-1])
    code = 0
    while not stop.wait(0.5):
        if any(w.device_error is not None for w in workers):
            log.error("a device failed (%s); exiting so the process restarts with a fresh device context",
                      "; ".join(w.state for w in workers if w.device_error is not None))
            code = 3
            break
        if all(w.failed for w in workers):
            log.error("every worker failed to load its models; exiting")
            code = 1
            break
    for worker in workers:
        worker.stop(settings.worker.shutdown_timeout_s)
    for source in sources:
        source.close()
    if health is not None:
        health.shutdown()
    log.info("worker process stopped")
    return code
