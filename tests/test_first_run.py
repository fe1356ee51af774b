"""What a newcomer meets first: the `darkroom` command (version, a pipe closed early, the start log), the
refusal to listen on a public address without API keys, `GET /` and the public API docs.

One real `darkroom serve` for the module, on 0.0.0.0 without keys, allowed by the environment variable the
refusal names (DARKROOM_SERVER__ALLOW_ANONYMOUS=true); the refusals are processes that exit at once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomllib
import yaml

from server.cli import listen_refusal
from server.config import load_settings
from server.logs import HARMLESS, DropHarmless

from .conftest import MODEL, REPO, Server

# What a start printed before these lines were silenced (transformers 5 without torchvision; diffusers 0.42).
KNOWN_HARMLESS = ("requires torchvision (not installed)", "should be kept in float32: []")


def darkroom(*args: str, env: dict[str, str] | None = None,
             **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, **kwargs)


@pytest.fixture(scope="module")
def public(make_server: Any) -> Server:
    """Listening on every interface, no keys, allowed through the environment."""
    return make_server({"server": {"host": "0.0.0.0", "default_response_format": "base64"}},
                       env={"DARKROOM_SERVER__ALLOW_ANONYMOUS": "true"})


# -- the command ---------------------------------------------------------------------------------------


def test_version() -> None:
    result = darkroom("--version")
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert result.returncode == 0 and result.stdout.strip() == f"darkroom {version}", result


def test_models_json_into_a_closed_pipe_exits_quietly() -> None:
    # A real pipe whose reader is gone before anything is written: every write fails with EPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "server", "models", "--json"], cwd=REPO,
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored" at exit


def test_models_json_piped_into_head() -> None:
    """The reported command line, through a shell with pipefail: one line, nothing on stderr, status 0."""
    line = f"{sys.executable} -m server models --json | head -1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout == "[\n" and result.stderr == "", result


def test_missing_weights_message_names_the_environment_variable(tmp_path: Path) -> None:
    result = darkroom("serve", env={"DARKROOM_MODELS": '["black-forest-labs/FLUX.1-schnell"]',
                                    "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "engine.allow_downloads: true" in result.stderr
    assert "DARKROOM_ENGINE__ALLOW_DOWNLOADS=true" in result.stderr
    assert "darkroom pull black-forest-labs/FLUX.1-schnell" in result.stderr


# -- no keys on a public address -------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "api"])
def test_refuses_a_public_address_without_keys(tmp_path: Path, command: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"server": {"host": "0.0.0.0"}, "queue": {"backend": "redis"}}))
    result = darkroom(command, "--config", str(config), "--port", "1")
    assert result.returncode == 2
    message = result.stderr
    assert "not starting" in message and "0.0.0.0" in message
    # It says how: set keys, or opt in by the config key or the environment variable.
    for how in ("DARKROOM_SERVER__API_KEYS", "server.allow_anonymous: true",
                "DARKROOM_SERVER__ALLOW_ANONYMOUS=true", "--host 127.0.0.1"):
        assert how in message, how
    assert "Uvicorn running" not in message


def test_refuses_the_host_option_too() -> None:
    result = darkroom("serve", "--host", "0.0.0.0", "--port", "1")
    assert result.returncode == 2 and "server.allow_anonymous" in result.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_keys(host: str) -> None:
    settings = load_settings()
    settings.server.host = host
    assert listen_refusal(settings) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.5", "darkroom.example.com"])
def test_public_hosts_need_keys_or_the_opt_in(host: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    settings.server.host = host
    assert listen_refusal(settings) is not None
    # The YAML key.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"server": {"host": host, "allow_anonymous": True}}))
    assert listen_refusal(load_settings(config)) is None
    # The environment variable.
    monkeypatch.setenv("DARKROOM_SERVER__ALLOW_ANONYMOUS", "true")
    config.write_text(yaml.safe_dump({"server": {"host": host}}))
    assert listen_refusal(load_settings(config)) is None
    monkeypatch.delenv("DARKROOM_SERVER__ALLOW_ANONYMOUS")
    # Any kind of key.
    for keys in ({"server": {"host": host, "api_keys": ["sk-1"]}},
                 {"server": {"host": host}, "auth": {"keys": [{"key": "sk-2"}]}},
                 {"server": {"host": host}, "auth": {"keys_file": str(tmp_path / "keys.yaml")}}):
        config.write_text(yaml.safe_dump(keys))
        assert listen_refusal(load_settings(config)) is None, keys


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_take_their_keys_from_the_environment(name: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = REPO / "configs" / name
    if listen_refusal(load_settings(path)) is None:
        assert load_settings(path).server.host == "127.0.0.1"  # only a loopback config starts without keys
        return
    monkeypatch.setenv("DARKROOM_SERVER__API_KEYS", '["sk-from-the-environment"]')
    settings = load_settings(path)
    assert [k.get_secret_value() for k in settings.server.api_keys] == ["sk-from-the-environment"]
    assert listen_refusal(settings) is None


# -- a start -----------------------------------------------------------------------------------------------


def test_start_log_is_quiet_and_says_what_runs(public: Server) -> None:
    log = public.log()
    for line in KNOWN_HARMLESS:
        assert line not in log, line
    # The build that runs, in one line; the anonymous opt-in is still a warning; where the playground is.
    assert "INFO server.cli torch " in log and "cuda_available=" in log and "devices=cpu" in log
    assert "WARNING server.cli listening on 0.0.0.0 without API keys (server.allow_anonymous: true)" in log
    assert f"playground http://0.0.0.0:{public.port}/playground" in log
    start = log.split("worker ready")[0].splitlines()
    print(f"start log: {len(start) + 1} lines up to 'worker ready'")


def test_harmless_filters_keep_real_warnings() -> None:
    diffusers_filter = DropHarmless(dict(HARMLESS)["diffusers.models.modeling_utils"])

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("diffusers.models.modeling_utils", logging.WARNING, __file__, 1, message,
                                 None, None)

    assert not diffusers_filter.filter(record(
        "There are modules in AutoencoderKL that should be kept in float32: []. Casting directly ..."))
    # A module that does need float32 is a real warning.
    assert diffusers_filter.filter(record(
        "There are modules in AutoencoderKL that should be kept in float32: ['decoder']. Casting ..."))
    assert diffusers_filter.filter(record("Some other warning"))


def test_root_redirects_browsers_to_the_playground(public: Server) -> None:
    browser = httpx.get(public.url + "/", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"},
                        timeout=10)
    assert browser.status_code == 307 and browser.headers["location"] == "/playground"
    followed = httpx.get(public.url + "/", headers={"accept": "text/html"}, follow_redirects=True, timeout=10)
    assert followed.status_code == 200 and "<title>Darkroom playground</title>" in followed.text


def test_root_tells_api_clients_where_to_look(public: Server) -> None:
    for accept in ("application/json", "*/*", None):
        response = httpx.get(public.url + "/", headers={"accept": accept} if accept else {}, timeout=10)
        assert response.status_code == 200
        body = response.json()
        assert body["playground"] == "/playground" and body["docs"] == "/docs"
        assert body["openapi"] == "/openapi.json" and body["models"] == "/v1/models"


def test_openapi_schema_is_public_and_describes_the_request(public: Server) -> None:
    schema = httpx.get(public.url + "/openapi.json", timeout=10).json()
    operation = schema["paths"]["/v1/images/generations"]["post"]
    assert operation["security"] == [{"bearer": []}]
    body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    fields = schema["components"]["schemas"][body]["properties"]
    assert {"prompt", "model", "n", "width", "height", "seed", "image_loras",
            "reference_images"} <= set(fields)
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    # Errors are documented in Together's shape, not FastAPI's 422 detail list (which Darkroom never sends).
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error = schema["components"]["schemas"]["Error"]["properties"]["error"]
    assert error["required"] == ["message", "type", "param", "code"]
    assert "422" not in operation["responses"] and "default" in operation["responses"]
    # Operator routes stay out of it.
    assert not {"/metrics", "/playground", "/"} & set(schema["paths"])


def test_swagger_ui_loads_nothing_from_elsewhere(public: Server) -> None:
    page = httpx.get(public.url + "/docs", timeout=10)
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "cdn." not in page.text and "https://" not in page.text
    bundle = httpx.get(public.url + "/docs/assets/swagger-ui-bundle.js", timeout=10)
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    # It generates too: the opt-in server is a working server.
    response = public.generate(prompt="a lighthouse", width=64, height=64, steps=1, model=MODEL)
    assert response.status_code == 200, response.text


def test_api_docs_can_be_turned_off(make_app: Any) -> None:
    closed = make_app({"server": {"api_docs": False}}, engine="stand-in")
    for path in ("/openapi.json", "/docs", "/docs/assets/swagger-ui.css"):
        response = closed.client.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", path
    assert "docs" not in closed.client.get("/").json()
