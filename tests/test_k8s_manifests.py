"""The Kubernetes manifests under configs/k8s/: schema-valid for a fixed Kubernetes version (the JSON
schemas ship inside kubernetes-validate, so no cluster or network is needed), and consistent with the
server: the ConfigMap's config loads as Settings with the Secret's variables, probes hit real paths and
ports, the worker asks for a GPU with enough memory, reads pre-pulled weights and a shared compile cache from
volumes, and KEDA scales it on the queue's Redis stream. KEDA's CRDs are not in kubernetes-validate's
schemas: its objects are checked field by field against KEDA's documented spec instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.cli import listen_refusal
from server.config import Settings, load_settings

from .conftest import REPO

K8S = REPO / "configs" / "k8s"
KUBERNETES_VERSION = "1.30.0"
KEDA = "keda.sh/v1alpha1"


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def by_kind_name() -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in documents()}


def core_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f, d in documents() if d["apiVersion"] != KEDA]


@pytest.mark.parametrize(("file", "doc"), core_documents(),
                         ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in core_documents()])
def test_manifest_is_schema_valid(file: str, doc: dict[str, Any]) -> None:
    # strict: unknown fields (typos such as "readinesProbe") fail too.
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_expected_object_is_there() -> None:
    assert set(by_kind_name()) == {
        ("ConfigMap", "darkroom-config"), ("Secret", "darkroom-secrets"),
        ("Deployment", "darkroom-api"), ("Service", "darkroom-api"),
        ("Deployment", "darkroom-worker"),
        ("Deployment", "darkroom-redis"), ("Service", "darkroom-redis"),
        ("PersistentVolumeClaim", "darkroom-models"), ("PersistentVolumeClaim", "darkroom-compile-cache"),
        ("Job", "darkroom-pull"),
        ("ScaledObject", "darkroom-worker"), ("TriggerAuthentication", "darkroom-redis-auth"),
    }


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def pod_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a pod gets: the ConfigMap's config.yaml, with the Secret's variables in the environment."""
    objects = by_kind_name()
    config = tmp_path / "config.yaml"
    config.write_text(objects[("ConfigMap", "darkroom-config")]["data"]["config.yaml"])
    for name, value in objects[("Secret", "darkroom-secrets")]["stringData"].items():
        monkeypatch.setenv(name, value)
    return load_settings(config)


def test_config_map_loads_as_settings_with_the_secret(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    objects = by_kind_name()
    settings = pod_settings(tmp_path, monkeypatch)
    assert settings.queue.backend == "redis" and settings.storage.backend == "s3"
    assert settings.queue.redis_url.startswith("redis://:")  # the Secret's URL, with its password
    assert [k.get_secret_value() for k in settings.server.api_keys] == ["change-me-key-1", "change-me-key-2"]
    # The API pods listen on 0.0.0.0: they start because the Secret gives them keys (server/cli.py).
    assert settings.server.host == "0.0.0.0" and listen_refusal(settings) is None

    api, worker = objects[("Deployment", "darkroom-api")], objects[("Deployment", "darkroom-worker")]
    assert container(api)["args"][0] == "api" and container(worker)["args"][0] == "worker"
    ports = {p["name"]: p["containerPort"] for p in container(worker)["ports"]}
    assert ports["health"] == settings.worker.health_port
    assert {p["name"]: p["containerPort"] for p in container(api)["ports"]}["http"] == settings.server.port
    # Workers get the time to finish a batch before the kubelet kills them.
    grace = {name: d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
             for name, d in (("api", api), ("worker", worker))}
    assert grace["worker"] > settings.worker.shutdown_timeout_s
    assert grace["api"] > settings.server.request_timeout_s


def test_probes_and_gpu() -> None:
    objects = by_kind_name()
    for name in ("darkroom-api", "darkroom-worker"):
        spec = container(objects[("Deployment", name)])
        assert spec["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert spec["livenessProbe"]["httpGet"]["path"] == "/health"
        named_ports = {p["name"] for p in spec["ports"]}
        assert spec["readinessProbe"]["httpGet"]["port"] in named_ports
        pod = objects[("Deployment", name)]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
        assert mounted == {"darkroom-config"}
    worker = container(objects[("Deployment", "darkroom-worker")])
    # Started means loaded, compiled and warmed up: /health would answer before any of it.
    assert worker["startupProbe"]["httpGet"]["path"] == "/ready"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    api_limits = container(objects[("Deployment", "darkroom-api")])["resources"].get("limits", {})
    assert "nvidia.com/gpu" not in api_limits
    # Services select the pods of their Deployment.
    for name in ("darkroom-api", "darkroom-redis"):
        selector = objects[("Service", name)]["spec"]["selector"]
        labels = objects[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()


def test_split_config_loads() -> None:
    settings = load_settings(REPO / "configs" / "scaleout.yaml")
    assert settings.queue.backend == "redis" and settings.storage.backend == "s3"
    assert settings.worker.health_port == 8001


def test_worker_reads_pulled_weights_and_shares_compiled_kernels(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    objects = by_kind_name()
    settings = pod_settings(tmp_path, monkeypatch)
    deployment = objects[("Deployment", "darkroom-worker")]
    pod = deployment["spec"]["template"]["spec"]
    worker = container(deployment)
    mounts = {m["name"]: m for m in worker["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    # No emptyDir for weights or kernels: both live on claims that outlive the pod.
    assert claims["models"]["claimName"] == "darkroom-models" and claims["models"]["readOnly"] is True
    assert claims["cache"]["claimName"] == "darkroom-compile-cache"
    for claim in ("darkroom-models", "darkroom-compile-cache"):
        assert "ReadWriteMany" in objects[("PersistentVolumeClaim", claim)]["spec"]["accessModes"]
    models_dir, cache_dir = Path(mounts["models"]["mountPath"]), Path(mounts["cache"]["mountPath"])
    assert mounts["models"]["readOnly"] is True and not mounts["cache"].get("readOnly", False)
    # Downloads off; weights from the read-only volume; everything the worker writes goes to the cache one.
    assert settings.engine.allow_downloads is False
    assert settings.engine.cache_dir == models_dir
    compile_cache = settings.engine.compile_cache_dir
    assert compile_cache is not None and compile_cache.is_relative_to(cache_dir)
    assert settings.loras.cache_dir is not None and settings.loras.cache_dir.is_relative_to(cache_dir)
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and Path(env["HF_HOME"]).is_relative_to(models_dir)
    # The weights get there through `darkroom pull`, run by a Job on the same claim (writable there).
    job = objects[("Job", "darkroom-pull")]["spec"]["template"]["spec"]
    (pull,) = job["containers"]
    assert pull["args"][0] == "pull" and pull["args"][1] in settings.models
    job_claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in job["volumes"]
                  if "persistentVolumeClaim" in v}
    (models_mount,) = [m for m in pull["volumeMounts"] if job_claims.get(m["name"]) == "darkroom-models"]
    assert models_mount["mountPath"] == str(models_dir) and not models_mount.get("readOnly", False)
    assert {e["name"]: e["value"] for e in pull["env"]}["HF_HOME"] == env["HF_HOME"]
    # Only nodes whose GPUs have room for the model (GPU feature discovery's label, in MiB).
    required = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    terms = required["nodeSelectorTerms"]
    (expression,) = [e for t in terms for e in t["matchExpressions"] if e["key"] == "nvidia.com/gpu.memory"]
    assert expression["operator"] == "Gt" and int(expression["values"][0]) >= 40000


def test_keda_scales_workers_on_the_queue_lag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ScaledObject's fields as KEDA's redis-streams scaler documents them, pointing at what exists."""
    from server.queue.redis_keys import GROUP, Keys

    objects = by_kind_name()
    settings = pod_settings(tmp_path, monkeypatch)
    scaled = objects[("ScaledObject", "darkroom-worker")]
    assert scaled["apiVersion"] == KEDA
    spec = scaled["spec"]
    assert set(spec) <= {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                         "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
                         "triggers"}
    target = spec["scaleTargetRef"]
    assert target["name"] == "darkroom-worker" and target.get("kind", "Deployment") == "Deployment"
    assert ("Deployment", target["name"]) in objects
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert all(isinstance(spec[k], int) and spec[k] > 0 for k in ("pollingInterval", "cooldownPeriod"))
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values())  # KEDA's metadata is a map of strings
    # The stream and group the workers read (server/queue/redis_keys.py), at the Redis Service's address.
    assert meta["stream"] == Keys(settings.queue.key_prefix).stream and meta["consumerGroup"] == GROUP
    host, port = meta["address"].split(":")
    service = objects[("Service", host)]
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    # Lag (undelivered entries, XINFO GROUPS) needs Redis 7+.
    assert int(meta["lagCount"]) > 0 and int(meta["activationLagCount"]) >= 0
    redis_image = container(objects[("Deployment", "darkroom-redis")])["image"]
    assert int(redis_image.split(":")[1].split(".")[0]) >= 7
    # The password comes from the Secret the pods use.
    auth = objects[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password"
    assert ref["key"] in objects[("Secret", ref["name"])]["stringData"]


def test_cuda_image_can_compile_and_runs_the_tested_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dockerfile.cuda, read as text (no Docker here): a C compiler for Triton, the torch the suite runs,
    torchao for fp8, a non-root user, and every DARKROOM_* variable it sets is a real setting."""
    import re
    import shlex

    import torch

    text = (REPO / "Dockerfile.cuda").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    base = re.search(r"^FROM (\S+)$", text, re.M)
    assert base and "runtime" not in base.group(1)  # a runtime CUDA image has no gcc
    assert re.search(r"apt-get install[^\n]*\bgcc\b", text)
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    assert args["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    assert re.match(r"0\.(1[8-9]|[2-9]\d)\.", args["TORCHAO_VERSION"])  # PerRow float8 as placement uses it
    assert re.search(r"^USER darkroom$", text, re.M) and "--uid 10001" in text
    assert re.search(r'^VOLUME \["/models", "/cache"\]$', text, re.M)
    env_block = re.search(r"^ENV (.*?)\n\n", text, re.M | re.S)
    assert env_block
    words = shlex.split(re.sub(r"#[^\n]*", "", env_block.group(1)).replace("\\\n", " "))
    pairs = dict(item.split("=", 1) for item in words)
    for name, value in pairs.items():
        if name.startswith("DARKROOM_"):
            monkeypatch.setenv(name, value)
    settings = load_settings(None)  # an unknown DARKROOM_* name would fail here (extra="forbid")
    assert settings.engine.cache_dir == Path("/models")
    assert settings.engine.compile_cache_dir == Path(pairs["TORCHINDUCTOR_CACHE_DIR"])
    assert settings.loras.cache_dir is not None and settings.loras.cache_dir.is_relative_to("/cache")
    assert pairs["TRITON_CACHE_DIR"].startswith("/cache/")
