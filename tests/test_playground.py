"""The playground page end to end in headless Chromium (Debian's package, driven by Playwright; browsers are
never downloaded): limits from /v1/models, the size picker, LoRA and reference-image lists, images with a
download link, the stage timings, the history kept in localStorage, and "copy as code": the curl, together
and openai snippets it shows, run as they are, give the same image bytes as the page got. Also the Swagger UI
at /docs. A screenshot goes to test-artifacts/."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from .conftest import MODEL, REPO
from .support.inprocess import InProcessServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
KEY = "sk-playground-0123456789"
REDUX = "darkroom/tiny-flux-redux"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def site(make_app: Any, tmp_path_factory: pytest.TempPathFactory) -> InProcessServer:
    from .support.tiny_loras import lora_file_bytes, tiny_flux_lora

    loras = tmp_path_factory.mktemp("loras")
    registered = {}
    for name, seed in (("style-a", 1), ("style-b", 2)):
        (loras / f"{name}.safetensors").write_bytes(lora_file_bytes(tiny_flux_lora(seed)))
        registered[name] = str(loras / f"{name}.safetensors")
    return make_app({"auth": {"keys": [{"name": "playground", "key": KEY, "requests_per_minute": 100}]},
                        "loras": {"registered": registered},
                        "models": [MODEL, REDUX]}, listen=True)


@pytest.fixture(scope="module")
def browser() -> Any:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def context(browser: Any) -> Any:
    """One browser profile for the module: localStorage (key, history) persists across its pages."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    yield ctx
    ctx.close()


class Page:
    """A playground page that records every URL it requests and every console error."""

    def __init__(self, context: Any, url: str) -> None:
        self.page = context.new_page()
        self.requested: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requested.append(request.url))
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        self.page.goto(url)

    def close(self, origin: str) -> None:
        self.page.close()
        assert all(u.startswith(origin) or u.startswith("data:") for u in self.requested), self.requested
        assert not [e for e in self.errors if "401" not in e], self.errors


@pytest.fixture
def page(context: Any, site: InProcessServer) -> Any:
    p = Page(context, f"{site.url}/playground")
    p.page.fill("#api_key", KEY)
    p.page.dispatch_event("#api_key", "change")
    p.page.wait_for_selector(f"#model option[value='{REDUX}']", state="attached")
    yield p.page
    p.close(site.url)


def generate(page: Any, count: int) -> list[bytes]:
    """Click Generate; the bytes of the ``count`` images the page shows."""
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('#images img').length === {count} && "
                           "[...document.querySelectorAll('#images img')]"
                           ".every(i => i.complete && i.naturalWidth > 0) && "
                           "!document.getElementById('generate').disabled", timeout=60_000)
    sources = page.eval_on_selector_all("#images img", "imgs => imgs.map(i => i.src)")
    return [base64.b64decode(src.split(",", 1)[1]) for src in sources]


def sent_body(page: Any) -> dict[str, Any]:
    """The JSON body in the curl snippet (between ``-d '`` and the closing quote)."""
    return json.loads(page.inner_text("#code_curl").split(" -d '", 1)[1].split("'\n", 1)[0])


def card(site: InProcessServer, model: str) -> dict[str, Any]:
    models = httpx.get(f"{site.url}/v1/models", headers={"authorization": f"Bearer {KEY}"}, timeout=10).json()
    return next(m for m in models["data"] if m["id"] == model)


def test_page_is_self_contained(site: InProcessServer) -> None:
    response = httpx.get(f"{site.url}/playground", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "<script" in html and "/v1/images/generations" in html
    # Nothing from anywhere else: no CDN scripts, styles, fonts or images.
    assert "src=\"http" not in html and "href=\"http" not in html and "@import" not in html


def test_limits_sizes_and_the_tiny_models_note(site: InProcessServer, page: Any) -> None:
    tiny = card(site, MODEL)
    page.select_option("#model", MODEL)
    # The note: the tiny model's noise is intended (its manifest's description, from /v1/models).
    assert "noise, on purpose" in page.inner_text("#model_note")
    # n is limited by the model (4), not a fixed 8: 5 is out of range and the form does not submit.
    assert page.get_attribute("#n", "max") == str(tiny["limits"]["max_n"]) == "4"
    page.fill("#prompt", "x")
    page.fill("#n", "5")
    assert page.eval_on_selector("#n", "e => e.validity.rangeOverflow")
    page.click("#generate")
    assert page.inner_text("#status") != "Generating…" and page.locator("#images img").count() == 0
    # Every size offered, for every aspect ratio, is one the server accepts for this model.
    limits = tiny["limits"]
    for aspect in page.eval_on_selector_all("#aspect option", "os => os.map(o => o.value)"):
        page.select_option("#aspect", aspect)
        sizes = page.eval_on_selector_all("#size option", "os => os.map(o => o.value)")
        assert sizes, aspect
        for size in sizes:
            w, h = (int(v) for v in size.split("x"))
            assert w % limits["size_multiple"] == 0 and h % limits["size_multiple"] == 0, size
            assert limits["min_size"] <= w <= limits["max_width"], size
            assert limits["min_size"] <= h <= limits["max_height"], size
            assert w * h <= limits["max_pixels"], size
    page.select_option("#aspect", "1:1")
    assert "64x64" in page.eval_on_selector_all("#size option", "os => os.map(o => o.value)")
    assert "1024x1024" in page.eval_on_selector_all("#size option", "os => os.map(o => o.value)")


def test_generate_download_timings_and_copy_as_code(site: InProcessServer, page: Any, tmp_path: Path) -> None:
    page.select_option("#model", MODEL)
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#negative_prompt", "blurry")
    page.select_option("#aspect", "3:2")
    page.select_option("#size", "96x64")
    page.fill("#steps", "1")
    page.fill("#seed", "42")
    page.fill("#n", "2")
    # Two LoRAs (names the operator registered), each with its scale.
    for path, scale in (("style-a", "0.8"), ("style-b", "0.5")):
        page.click("#add_lora")
        page.locator("#loras .lora_path").last.fill(path)
        page.locator("#loras .lora_scale").last.fill(scale)
    images = generate(page, 2)
    for data in images:
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size == (96, 64)
    assert images[0] != images[1]
    captions = page.eval_on_selector_all("#images figcaption span", "cs => cs.map(c => c.textContent)")
    assert captions == ["seed 42", "seed 43"]
    # A download link per image, holding that image.
    links = page.eval_on_selector_all("#images a.download", "as => as.map(a => [a.download, a.href])")
    assert [name for name, _ in links] == ["darkroom-42.png", "darkroom-43.png"]
    assert [base64.b64decode(href.split(",", 1)[1]) for _, href in links] == images
    # Each stage once: the response's timings.encode_s (= stages.image_encode_s) is not shown twice.
    stages = page.eval_on_selector_all("#timings tbody td:first-child", "tds => tds.map(t => t.textContent)")
    assert len(stages) == len(set(stages))
    assert {"queue", "text_encode", "denoise", "vae_decode", "safety", "image_encode", "inference (total)",
            "round trip (browser)"} <= set(stages)
    assert "encode" not in stages
    status = page.inner_text("#status")
    assert "2 image(s)" in status and "requests left" in status
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    assert Image.open(ARTIFACTS / "playground.png").size[0] >= 1400

    # Copy as code: each snippet, run as shown, gives the bytes the page got.
    env = {**os.environ, "DARKROOM_API_KEY": KEY}
    curl = page.inner_text("#code_curl")
    assert "$DARKROOM_API_KEY" in curl and KEY not in curl  # the key itself is never shown
    sent = sent_body(page)
    assert sent["image_loras"] == [{"path": "style-a", "scale": 0.8}, {"path": "style-b", "scale": 0.5}]
    assert (sent["width"], sent["height"], sent["seed"], sent["n"]) == (96, 64, 42, 2)
    result = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert [base64.b64decode(d["b64_json"]) for d in json.loads(result.stdout)["data"]] == images
    for client in ("together", "openai"):
        page.click(f"[data-lang={client}]")
        code = page.inner_text(f"#code_{client}")
        assert page.is_visible(f"#code_{client}") and not page.is_visible("#code_curl")
        folder = tmp_path / client
        folder.mkdir()
        result = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True,
                                timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        assert [(folder / f"darkroom-{i}.png").read_bytes() for i in range(2)] == images, client
    page.click("[data-lang=curl]")


def test_history_restores_a_request(site: InProcessServer, page: Any, context: Any) -> None:
    # The previous test's request is in this browser's history (localStorage), with a thumbnail.
    entries = page.locator("#history .history-entry")
    assert entries.count() >= 1
    assert page.eval_on_selector("#history .history-entry img", "i => i.src.startsWith('data:image/jpeg')")
    page.fill("#prompt", "something else")
    page.fill("#seed", "7")
    page.select_option("#aspect", "1:1")
    page.locator("#loras .remove").first.click() if page.locator("#loras .remove").count() else None
    entries.first.click()
    assert page.input_value("#prompt") == "a lighthouse at dusk"
    assert page.input_value("#seed") == "42" and page.input_value("#n") == "2"
    assert page.input_value("#size") == "96x64" and page.input_value("#aspect") == "3:2"
    assert page.input_value("#negative_prompt") == "blurry"
    paths = page.eval_on_selector_all("#loras .lora_path", "is => is.map(i => i.value)")
    assert paths == ["style-a", "style-b"]
    # Restored exactly: the same request gives the same images as the first time.
    again = generate(page, 2)
    stored = json.loads(page.evaluate("localStorage.getItem('darkroom.history')"))
    assert stored[0]["body"] == stored[1]["body"] and stored[0]["seeds"] == [42, 43]
    assert len(again) == 2


def test_reference_image_list(site: InProcessServer, page: Any) -> None:
    redux = card(site, REDUX)
    page.select_option("#model", REDUX)
    assert page.is_visible("#references_row") and not page.is_visible("#lora_inputs")  # no LoRAs on it
    urls = []
    for color in ("red", "blue"):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buffer, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        page.click("#add_reference")
        page.locator("#references .reference_url").last.fill(urls[-1])
    page.fill("#prompt", "a lighthouse")
    page.select_option("#aspect", "1:1")
    page.select_option("#size", "64x64")
    page.fill("#steps", "1")
    page.fill("#seed", "5")
    page.fill("#n", "1")
    assert sent_body(page)["reference_images"] == urls
    (image,) = generate(page, 1)
    assert Image.open(io.BytesIO(image)).size == (64, 64)
    # At most the model's max_reference_images entries.
    while not page.is_disabled("#add_reference"):
        page.click("#add_reference")
    assert page.locator("#references .entry").count() == redux["limits"]["max_reference_images"]


def test_wrong_key_shows_the_error(site: InProcessServer, page: Any) -> None:
    page.select_option("#model", MODEL)
    page.fill("#prompt", "x")
    page.select_option("#size", page.eval_on_selector("#size option", "o => o.value"))
    page.fill("#api_key", "sk-wrong")
    # Leaving the key field fires its change event on this click: the model list reloads with the wrong
    # key while the POST runs. Whichever answers last, the status line keeps the generation's 401 and the
    # key's hint says why the list did not load (CI saw the list's answer overwrite the error).
    with page.expect_response(lambda r: r.url.endswith("/v1/models")) as models_answer:
        page.click("#generate")
    assert models_answer.value.status == 401
    page.wait_for_function("document.getElementById('status').className === 'error'")
    page.wait_for_selector("#key_hint:not([hidden])")
    assert "401" in page.inner_text("#status")
    assert "API key" in page.inner_text("#key_hint")
    page.wait_for_load_state("networkidle")
    assert page.eval_on_selector("#status", "e => e.className") == "error"
    page.fill("#api_key", KEY)


def test_root_and_swagger_ui_in_the_browser(site: InProcessServer, context: Any) -> None:
    # A browser opening the server's root lands on the playground.
    p = Page(context, f"{site.url}/")
    assert p.page.url == f"{site.url}/playground"
    p.close(site.url)
    # The API docs are public (the schema is not a secret), the API behind them is not.
    assert httpx.get(f"{site.url}/openapi.json", timeout=10).status_code == 200
    assert httpx.get(f"{site.url}/v1/models", timeout=10).status_code == 401
    p = Page(context, f"{site.url}/docs")
    p.page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "Darkroom" in p.page.inner_text(".swagger-ui .info .title")
    p.page.wait_for_selector(".opblock-summary-path[data-path='/v1/images/generations']")
    assert p.page.locator(".swagger-ui .authorize").count() == 1  # the bearer key goes in here
    p.page.screenshot(path=str(ARTIFACTS / "swagger-ui.png"), full_page=False)
    p.close(site.url)
