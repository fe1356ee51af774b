"""Prometheus metrics (``GET /metrics``), one registry per process.

The API records requests by route, status and model, and reads queue depth, worker readiness, device
memory and the safety counters when scraped. Workers record queue wait, batch sizes, per-stage latencies
and images generated. In `darkroom serve` both live in one process; a `darkroom worker` process exposes
its own ``/metrics`` on its health port.

Other modules increment the counters below directly, e.g. ``metrics.LORA_CACHE_HITS.labels(cache="disk")``.
Both processes import this module; besides the Prometheus families it holds ``SafetyCounters`` (plain counts
of the safety stages, kept by the API's prompt stage and by each engine's image stage) and the protocols of
what observers read from a worker and from the API's runtime.
"""

from __future__ import annotations

import os
import resource
import threading
from collections import Counter as Counts
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# No *_created series: they double the exposition and no dashboard here reads them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=False)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
_WAIT = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_COUNT = (1, 2, 4, 8, 16, 32, 64)

# -- API ------------------------------------------------------------------------------------------
REQUESTS = Counter(
    "darkroom_requests", "HTTP requests answered, by route, status code and model ('' when none).",
    ["route", "status", "model"], registry=REGISTRY)
REQUEST_SECONDS = Histogram(
    "darkroom_request_duration_seconds", "Time from request to response, by route.", ["route"],
    buckets=_SECONDS + (120.0, 300.0), registry=REGISTRY)
RATE_LIMITED = Counter(
    "darkroom_ratelimited_requests", "Requests refused with 429 by a key's limit, by the quota that was "
    "exceeded (requests, images).", ["kind"], registry=REGISTRY)

# -- workers --------------------------------------------------------------------------------------
QUEUE_WAIT = Histogram(
    "darkroom_queue_wait_seconds", "Time a job waited in the queue before its batch started.", ["model"],
    buckets=_WAIT, registry=REGISTRY)
BATCH_IMAGES = Histogram(
    "darkroom_batch_size_images", "Images per pipeline call (batch).", ["model"], buckets=_COUNT,
    registry=REGISTRY)
BATCH_JOBS = Histogram(
    "darkroom_batch_size_jobs", "Jobs (requests) per pipeline call (batch).", ["model"], buckets=_COUNT,
    registry=REGISTRY)
STAGES = ("text_encode", "denoise", "vae_decode", "safety", "image_encode", "storage")
STAGE_SECONDS = Histogram(
    "darkroom_stage_duration_seconds", "Latency of one stage: text_encode, denoise and vae_decode per "
    "pipeline call, safety per batch, image_encode per job, storage per job (URL responses).",
    ["stage", "model"], buckets=_SECONDS, registry=REGISTRY)
IMAGES = Counter(
    "darkroom_images_generated", "Images generated and returned.", ["model"], registry=REGISTRY)
JOBS = Counter(
    "darkroom_jobs", "Jobs finished by a worker, by outcome (done, refused by the safety checker, failed).",
    ["model", "outcome"], registry=REGISTRY)

# -- LoRAs and fetching ----------------------------------------------------------------------------
# cache="disk": the LoRA file cache (server/loras.py); cache="adapter": adapters resident on a device
# (server/engine/adapters.py).
LORA_CACHE_HITS = Counter(
    "darkroom_lora_cache_hits", "LoRA cache hits.", ["cache"], registry=REGISTRY)
LORA_CACHE_MISSES = Counter(
    "darkroom_lora_cache_misses", "LoRA cache misses.", ["cache"], registry=REGISTRY)
LORA_CACHE_EVICTIONS = Counter(
    "darkroom_lora_cache_evictions", "LoRAs evicted from a cache.", ["cache"], registry=REGISTRY)
BATCH_LORAS = Histogram(
    "darkroom_batch_loras", "LoRA adapters applied per pipeline call (batch); 0 for a batch without LoRAs.",
    ["model"], buckets=(0, 1, 2, 3, 4, 6, 8), registry=REGISTRY)
FETCH_FAILURES = Counter(
    "darkroom_fetch_failures", "Remote fetches (image_url, reference_images, LoRAs) refused or failed, by "
    "request field and error code.", ["field", "code"], registry=REGISTRY)


def observe_batch(model: str, jobs: int, images: int, stages: dict[str, float], loras: int = 0) -> None:
    """One pipeline call: its size, the LoRA adapters it applied and the stages it timed (seconds)."""
    BATCH_IMAGES.labels(model=model).observe(images)
    BATCH_JOBS.labels(model=model).observe(jobs)
    BATCH_LORAS.labels(model=model).observe(loras)
    for stage, seconds in stages.items():
        STAGE_SECONDS.labels(stage=stage, model=model).observe(seconds)


def failure_outcome(status: int) -> str:
    """The ``darkroom_jobs`` outcome of a job answered with an error of HTTP ``status``: ``refused`` for the
    safety checker's 422, ``failed`` for anything else."""
    return "refused" if status == 422 else "failed"


def observe_job(model: str, outcome: str, queue_s: float | None = None, encode_s: float | None = None,
                images: int = 0) -> None:
    JOBS.labels(model=model, outcome=outcome).inc()
    if queue_s is not None:
        QUEUE_WAIT.labels(model=model).observe(max(0.0, queue_s))
    if encode_s is not None:
        STAGE_SECONDS.labels(stage="image_encode", model=model).observe(encode_s)
    if images:
        IMAGES.labels(model=model).inc(images)


# -- plain counts, and what observers read --------------------------------------------------------


class SafetyCounters:
    """Thread-safe counters; names are plain strings such as ``prompts_flagged``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counts[str] = Counts()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class WorkerStatus(Protocol):
    """What readiness, ``/metrics`` and a worker process's probes read of a worker (server/worker/loop.py)."""

    name: str
    ready: threading.Event
    load_error: str | None

    @property
    def failed(self) -> bool: ...

    @property
    def device(self) -> str: ...

    @property
    def calls(self) -> int:
        """Pipeline calls run so far (warm-up calls included)."""

    @property
    def safety_counters(self) -> SafetyCounters: ...

    @property
    def state(self) -> str:
        """For /ready: ``ready``, ``loading``, ``not ready: why`` (e.g. restarting), ``failed: why``."""

    def stats(self) -> dict[str, float]:
        """``busy_seconds`` (time in pipeline calls) and the engine's counters (the prompt-embedding cache:
        ``prompt_cache_hits``, ``prompt_cache_misses``, ...)."""

    def compile_report(self) -> dict[str, Any]:
        """torch.compile's ``graphs`` and ``recompiles_after_ready`` (server/engine/compile_stats.py)."""


class _Depth(Protocol):
    def depth(self) -> int: ...


class RuntimeStatus(Protocol):
    """What ``/metrics`` reads of the API's runtime (server/api/runtime.py)."""

    @property
    def workers(self) -> Sequence[WorkerStatus]: ...

    @property
    def queue(self) -> _Depth: ...

    def readiness(self) -> tuple[bool, dict[str, str]]: ...

    def safety_report(self) -> dict[str, Any]: ...


# -- read when scraped -----------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory(devices: list[str]) -> Iterator[tuple[str, str, float]]:
    """(device, kind, bytes): allocated/reserved/total for CUDA devices, the process RSS for the CPU."""
    for device in devices:
        if device.startswith("cuda"):
            import torch  # only in a process with CUDA workers (never an API pod: it has no devices)

            if not torch.cuda.is_available():
                continue
            index = torch.device(device).index or 0
            yield device, "allocated", float(torch.cuda.memory_allocated(index))
            yield device, "reserved", float(torch.cuda.memory_reserved(index))
            yield device, "total", float(torch.cuda.get_device_properties(index).total_memory)
        elif device == "cpu":
            yield device, "rss", float(_rss_bytes())


class RuntimeCollector(Collector):
    """Gauges read from a live runtime (or a worker process's workers) at scrape time."""

    def __init__(self, runtime: RuntimeStatus | None = None, workers: Sequence[WorkerStatus] = ()) -> None:
        self.runtime = runtime
        self.workers = workers

    def _workers(self) -> list[WorkerStatus]:
        return list(self.runtime.workers if self.runtime is not None else self.workers)

    def collect(self) -> Iterator[Any]:
        workers = self._workers()
        if self.runtime is not None:
            depth = GaugeMetricFamily("darkroom_queue_depth", "Jobs waiting in the queue (not yet running).")
            try:
                depth.add_metric([], float(self.runtime.queue.depth()))
            except Exception:  # noqa: BLE001 - Redis away: the family is left empty, not the scrape failed
                pass
            yield depth
            ready, _ = self.runtime.readiness()
            gauge = GaugeMetricFamily("darkroom_ready", "1 when /ready answers 200 (models loaded and warm).")
            gauge.add_metric([], 1.0 if ready else 0.0)
            yield gauge
            safety = CounterMetricFamily(
                "darkroom_safety_events", "Safety checker events (prompts_checked, prompts_flagged, "
                "images_checked, images_flagged, disable_honored, disable_refused, ...).", labels=["event"])
            for event, count in sorted(self.runtime.safety_report()["counters"].items()):
                safety.add_metric([event], float(count))
            yield safety
        elif workers:
            safety = CounterMetricFamily("darkroom_safety_events", "Safety checker events.", labels=["event"])
            totals: dict[str, int] = {}
            for worker in workers:
                for event, count in worker.safety_counters.snapshot().items():
                    totals[event] = totals.get(event, 0) + count
            for event, count in sorted(totals.items()):
                safety.add_metric([event], float(count))
            yield safety
        states = GaugeMetricFamily("darkroom_worker_ready",
                                   "1 when a worker has loaded and warmed its models.", labels=["worker"])
        for worker in workers:
            states.add_metric([worker.name], 1.0 if worker.ready.is_set() else 0.0)
        yield states
        yield from _engine_stats(workers)
        yield from compile_families(workers)
        memory = GaugeMetricFamily("darkroom_device_memory_bytes", "Memory of each worker device: CUDA "
                                   "allocated/reserved/total, or the process RSS for the CPU.",
                                   labels=["device", "kind"])
        devices = list(dict.fromkeys(worker.device for worker in workers))
        for device, kind, value in device_memory([d for d in devices if d]):
            memory.add_metric([device, kind], value)
        yield memory


def _engine_stats(workers: Sequence[WorkerStatus]) -> Iterator[Any]:
    """Per worker: the device's busy time, and the engine's prompt-embedding cache
    (server/engine/prompt_cache.py)."""
    busy = CounterMetricFamily(
        "darkroom_device_busy_seconds", "Seconds a worker's device thread spent in pipeline calls (rate: the "
        "fraction of time the device works; a worker process that restarts starts again from 0).",
        labels=["worker"])
    lookups = CounterMetricFamily(
        "darkroom_prompt_cache_lookups", "Prompt-embedding cache lookups, by result (hit: the text encoders "
        "were skipped for that prompt).", labels=["worker", "result"])
    size = GaugeMetricFamily("darkroom_prompt_cache_bytes", "Device memory held by the prompt-embedding "
                             "cache.", labels=["worker"])
    ratio = GaugeMetricFamily("darkroom_prompt_cache_hit_ratio", "Hits / lookups of the prompt-embedding "
                              "cache since start (0 before any lookup).", labels=["worker"])
    for worker in workers:
        try:
            stats = worker.stats()
        except Exception:  # noqa: BLE001 - a worker process going away: its family stays empty
            continue
        busy.add_metric([worker.name], float(stats.get("busy_seconds", 0.0)))
        hits, misses = stats.get("prompt_cache_hits", 0.0), stats.get("prompt_cache_misses", 0.0)
        lookups.add_metric([worker.name, "hit"], float(hits))
        lookups.add_metric([worker.name, "miss"], float(misses))
        size.add_metric([worker.name], float(stats.get("prompt_cache_bytes", 0.0)))
        ratio.add_metric([worker.name], float(hits) / (hits + misses) if hits + misses else 0.0)
    yield busy
    yield lookups
    yield size
    yield ratio


def compile_families(workers: Sequence[WorkerStatus]) -> Iterator[Any]:
    """torch.compile's graph count and the graphs built after each worker became ready (each one a request
    that waited for a compile: the warm-up missed its shape; should stay 0)."""
    graphs = GaugeMetricFamily("darkroom_compiled_graphs", "Graphs torch.compile has built in the worker's "
                               "process (warm-up included).", labels=["worker"])
    after = CounterMetricFamily("darkroom_recompiles_after_ready", "Graphs torch.compile built after the "
                                "worker became ready: requests that paid for a compile.", labels=["worker"])
    for worker in workers:
        report = worker.compile_report()
        graphs.add_metric([worker.name], float(report.get("graphs", 0)))
        after.add_metric([worker.name], float(report.get("recompiles_after_ready", 0)))
    yield graphs
    yield after


def compile_summary(workers: Sequence[WorkerStatus]) -> dict[str, Any]:
    """/ready's ``compile``: the process's graphs, the most graphs any worker saw built after its ready,
    and the compile stance."""
    reports = [worker.compile_report() for worker in workers]
    return {"graphs": max((r.get("graphs", 0) for r in reports), default=0),
            "recompiles_after_ready": max((r.get("recompiles_after_ready", 0) for r in reports), default=0),
            "stance": next((r["stance"] for r in reports if r.get("stance", "default") != "default"),
                           "default")}


_attached: list[Collector] = []
_attach_lock = threading.Lock()


def attach(collector: Collector) -> None:
    """Register the scrape-time collector of this process (replacing an earlier one)."""
    with _attach_lock:
        for old in _attached:
            REGISTRY.unregister(old)
        _attached[:] = [collector]
        REGISTRY.register(collector)


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
