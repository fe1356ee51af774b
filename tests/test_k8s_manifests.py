"""The Kubernetes manifests under configs/k8s/: schema-valid for a fixed Kubernetes version (the JSON
schemas ship inside kubernetes-validate, so no cluster or network is needed), and consistent with the
server: the ConfigMap's config loads as Settings with the Secret's variables, probes hit real paths and
ports, the worker asks for a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.cli import listen_refusal
from server.config import load_settings

from .conftest import REPO

K8S = REPO / "configs" / "k8s"
KUBERNETES_VERSION = "1.30.0"


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def by_kind_name() -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in documents()}


@pytest.mark.parametrize(("file", "doc"), documents(),
                         ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in documents()])
def test_manifest_is_schema_valid(file: str, doc: dict[str, Any]) -> None:
    # strict: unknown fields (typos such as "readinesProbe") fail too.
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_expected_object_is_there() -> None:
    assert set(by_kind_name()) == {
        ("ConfigMap", "darkroom-config"), ("Secret", "darkroom-secrets"),
        ("Deployment", "darkroom-api"), ("Service", "darkroom-api"),
        ("Deployment", "darkroom-worker"),
        ("Deployment", "darkroom-redis"), ("Service", "darkroom-redis"),
    }


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def test_config_map_loads_as_settings_with_the_secret(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    objects = by_kind_name()
    config = tmp_path / "config.yaml"
    config.write_text(objects[("ConfigMap", "darkroom-config")]["data"]["config.yaml"])
    for name, value in objects[("Secret", "darkroom-secrets")]["stringData"].items():
        monkeypatch.setenv(name, value)
    settings = load_settings(config)
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
