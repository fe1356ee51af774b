"""The playground page end to end in headless Chromium (Debian's package, driven by Playwright; browsers are
never downloaded): type a prompt, click Generate, the images appear at the requested size. A screenshot goes
to test-artifacts/."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from .conftest import MODEL, REPO, Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
KEY = "sk-playground-0123456789"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def site(make_server: Any) -> Server:
    return make_server({"auth": {"keys": [{"name": "playground", "key": KEY, "requests_per_minute": 100}]}})


@pytest.fixture(scope="module")
def browser() -> Any:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield chromium
        chromium.close()


def test_page_is_self_contained(site: Server) -> None:
    response = httpx.get(f"{site.url}/playground", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "<script" in html and "/v1/images/generations" in html
    # Nothing from anywhere else: no CDN scripts, styles, fonts or images.
    assert "src=\"http" not in html and "href=\"http" not in html and "@import" not in html


def test_prompt_click_image(site: Server, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    try:
        page.goto(f"{site.url}/playground")
        page.fill("#api_key", KEY)
        page.dispatch_event("#api_key", "change")
        page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
        page.fill("#prompt", "a lighthouse at dusk")
        page.fill("#negative_prompt", "blurry")
        page.fill("#width", "96")
        page.fill("#height", "64")
        page.fill("#steps", "1")
        page.fill("#seed", "42")
        page.fill("#n", "2")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#images img').length === 2 && "
                               "[...document.querySelectorAll('#images img')].every(i => i.complete && i.naturalWidth > 0)",
                               timeout=60_000)
        sizes = page.eval_on_selector_all("#images img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
        assert sizes == [[96, 64], [96, 64]]
        sources = page.eval_on_selector_all("#images img", "imgs => imgs.map(i => i.src)")
        for src in sources:
            header, data = src.split(",", 1)
            assert header == "data:image/png;base64"
            image = Image.open(io.BytesIO(base64.b64decode(data)))
            assert image.format == "PNG" and image.size == (96, 64)
        captions = page.eval_on_selector_all("#images figcaption", "cs => cs.map(c => c.textContent)")
        assert captions == ["seed 42", "seed 43"]
        timings = page.inner_text("#timings")
        for stage in ("queue", "inference", "denoise", "vae_decode", "round trip"):
            assert stage in timings
        status = page.inner_text("#status")
        assert "2 image(s)" in status and "requests left" in status
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "playground.png"
        page.screenshot(path=str(shot), full_page=True)
        assert Image.open(shot).size[0] >= 1280

        # A wrong key shows the server's error instead of images.
        page.fill("#api_key", "sk-wrong")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').className === 'error'")
        assert "401" in page.inner_text("#status")
    finally:
        page.close()
    assert requested and all(url.startswith(site.url) or url.startswith("data:") for url in requested), requested
    assert not [e for e in console_errors if "401" not in e], console_errors
