"""The documentation: the MkDocs site builds with --strict and every link and anchor checked (a broken one
fails the build), README.md stays a short start page whose examples run as written against the app on a loopback port,
and docs/api.md names every field the server sends and every error code it answers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from .conftest import MODEL, REPO, TOGETHER1_PYTHON
from .support.inprocess import InProcessServer

DOCS = REPO / "docs"
README = REPO / "README.md"
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=root, capture_output=True, text=True, timeout=300, env=ENV)


def test_site_builds_with_every_link_checked(tmp_path: Path) -> None:
    result = build(REPO, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    site = tmp_path / "site"
    home = (site / "index.html").read_text()
    assert "Quick start" in home and "Calling it" in home  # the home page is README.md
    assert 'href="api/"' in home or 'href="api/index.html"' in home  # README's docs/api.md link, rewritten
    for page in ("api", "playground", "models", "loras", "safety", "scaling", "operations", "benchmarks",
                 "architecture"):
        assert (site / page / "index.html").is_file(), page
    # The site loads nothing from the internet (no web fonts, no CDN scripts or styles).
    for html in site.rglob("*.html"):
        text = html.read_text()
        assert not re.search(r'<(script|link)[^>]+(src|href)="https?://', text), html
        assert "fonts.googleapis" not in text, html


def copy_sources(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(DOCS, root / "docs")
    (root / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "mkdocs_readme.py", root / "scripts")
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(REPO / name, root / name)
    return root


@pytest.mark.parametrize(("file", "link", "complaint"), [
    ("docs/api.md", "[a page](no-such-page.md)", "no-such-page.md"),
    ("docs/api.md", "[an anchor](models.md#no-such-section)", "no-such-section"),
    ("docs/models.md", "[here](#nowhere)", "nowhere"),
    ("README.md", "[docs](docs/missing.md)", "missing.md"),
])
def test_a_broken_link_fails_the_build(tmp_path: Path, file: str, link: str, complaint: str) -> None:
    root = copy_sources(tmp_path)
    with (root / file).open("a") as f:
        f.write(f"\n{link}\n")
    result = build(root, tmp_path / "site")
    assert result.returncode != 0 and complaint in result.stderr, result.stderr


def test_readme_is_a_short_start_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert "http://127.0.0.1:8000/playground" in text and "make serve" in text and "make test" in text
    # Every docs page is reachable from it.
    for page in sorted(DOCS.glob("*.md")):
        assert f"(docs/{page.name})" in text, page.name


# -- the README's examples, run as written ---------------------------------------------------------------


def readme_blocks() -> list[tuple[str, str]]:
    section = README.read_text().split("## Calling it", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def open_server(make_app: Any) -> InProcessServer:
    return make_app(listen=True)


def test_readme_has_one_example_per_client() -> None:
    blocks = readme_blocks()
    codes = [code for _, code in blocks]
    assert len(blocks) == 4
    assert "from together import Together" in codes[0]
    assert "import together\n" in codes[1] and "/v1" in codes[1]
    assert "from openai import OpenAI" in codes[2]
    assert codes[3].startswith("curl ")
    for code in codes:
        assert "b64decode" in code  # each shows how to get the image bytes out


@pytest.mark.parametrize("which", ["together 3.x", "together 1.x", "openai", "curl"])
def test_readme_example_runs(open_server: InProcessServer, tmp_path: Path, which: str) -> None:
    index = ["together 3.x", "together 1.x", "openai", "curl"].index(which)
    kind, code = readme_blocks()[index]
    code = code.replace("http://127.0.0.1:8000", open_server.url)
    if kind == "bash":
        command = ["bash", "-o", "pipefail", "-c", code]
    elif which == "together 1.x":
        if not TOGETHER1_PYTHON.exists():
            pytest.fail(f"{TOGETHER1_PYTHON} is missing: run `make test`, which installs together 1.x there")
        command = [str(TOGETHER1_PYTHON), "-c", code]
    else:
        command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TOGETHER_NO_BANNER": "1"})
    assert result.returncode == 0, result.stderr
    (saved,) = [p for p in tmp_path.iterdir() if p.name.startswith("lighthouse.")]
    image = Image.open(saved)
    assert image.size == (512, 512) and image.format.lower() == saved.suffix[1:].replace("jpg", "jpeg")


# -- docs/api.md against what the server sends -----------------------------------------------------------


def field_paths(value: Any, prefix: str = "") -> set[str]:
    """``a.b`` for nested objects; list items are described by their own fields."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}{key}"
            paths.add(path)
            if isinstance(item, dict):
                paths |= field_paths(item, f"{path}.")
    return paths


def test_api_reference_names_every_response_field(open_server: InProcessServer) -> None:
    api = (DOCS / "api.md").read_text()
    sent: set[str] = set()
    items: set[str] = set()
    for response_format in ("base64", "url"):
        response = open_server.generate(prompt="a lighthouse", width=64, height=64, steps=1, n=2,
                                        response_format=response_format)
        assert response.status_code == 200, response.text
        body = response.json()
        sent |= field_paths(body)
        for item in body["data"]:
            items |= set(item)
    assert {"stages.storage_s", "stages.image_encode_s", "batch.jobs"} <= sent
    for path in sorted(sent):
        assert f"`{path}`" in api, f"docs/api.md does not describe the response field {path}"
    for field in sorted(items):
        assert f"| `{field}` |" in api, f"docs/api.md does not describe data[].{field}"
    card = httpx.get(f"{open_server.url}/v1/models/{MODEL}", timeout=10).json()
    for field in card:
        assert f"`{field}`" in api, f"docs/api.md does not describe the model card's {field}"
    for group in ("capabilities", "defaults", "limits"):
        for field in card[group]:
            assert f"`{field}`" in api, f"docs/api.md does not describe {group}.{field}"
    ready = httpx.get(f"{open_server.url}/ready", timeout=10).json()
    for field in ready:
        assert f'"{field}"' in api, f"docs/api.md does not describe /ready's {field}"


def test_api_reference_names_every_error_code() -> None:
    api = (DOCS / "api.md").read_text()
    codes: set[str] = set()
    for source in (REPO / "server").rglob("*.py"):
        codes |= set(re.findall(r'\bcode\s*=\s*"([a-z_]+)"', source.read_text()))
        codes |= set(re.findall(r'\("[a-z_]+_error", "([a-z_]+)"\)', source.read_text()))
    assert {"invalid_api_key", "queue_full", "prompt_flagged", "method_not_allowed"} <= codes
    missing = sorted(c for c in codes if f"`{c}`" not in api)
    assert not missing, f"docs/api.md does not list the error codes {missing}"
