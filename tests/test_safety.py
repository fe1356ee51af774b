"""The safety checker, end to end: 422 on a flagged prompt or image, 403 on a refused disable.

Every stage runs a real model through the production loading code: the tiny checkers (diffusers'
StableDiffusionSafetyChecker, a transformers ViT image classifier, a transformers text classifier) are
built offline with random weights, and thresholds make them flag deterministically (or never).
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import together
import yaml

from server.api.keys import bearer_token
from server.api.safety import PromptGuard, resolve_check
from server.config import ImageCheckerSpec, SafetySettings, Settings, TextClassifierSpec, load_settings
from server.engine.safety import TextClassifier, load_image_checker
from server.errors import Forbidden
from server.registry import Registry, load_manifests

from .conftest import (
    MODEL,
    REPO,
    decode_image,
    mean_abs_diff,
    openai_client,
    run_together1,
    together3,
)
from .support.inprocess import InProcessServer

GEN = "/v1/images/generations"
SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 1}
USER, TRUSTED = "user-key", "trusted-key"

VIT_STRICT, SD_STRICT, LOCKED = "test/tiny-vit-strict", "test/tiny-sd-strict", "test/tiny-locked"
VIT_FLAG_ALL = {"format": "image-classification", "source": {"builtin": "tiny-nsfw-vit"},
                "label": "nsfw", "threshold": 0.0}
SD_FLAG_ALL = {"format": "sd-safety-checker", "source": {"builtin": "tiny-sd-safety-checker"},
               "adjustment": 2.5}


# ------------------------------------------------------------------------------------------ helpers


def post(server: InProcessServer, key: str = "any", **body: Any) -> httpx.Response:
    body.setdefault("model", MODEL)
    for name, value in SMALL.items():
        body.setdefault(name, value)
    return httpx.post(server.url + GEN, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def ready(server: InProcessServer) -> dict[str, Any]:
    resp = httpx.get(server.url + "/ready", timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def counters(server: InProcessServer) -> dict[str, int]:
    return ready(server)["safety"]["counters"]


def stored_files(server: InProcessServer) -> list[Path]:
    if not server.storage_dir.exists():
        return []
    return sorted(p for p in server.storage_dir.iterdir() if p.is_file())


def assert_error(resp: httpx.Response, status: int, code: str, type_: str,
                 param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert list(body) == ["error"], body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert (err["type"], err["code"], err["param"]) == (type_, code, param), err
    assert "data" not in body and "b64_json" not in resp.text
    return err


def assert_flagged(resp: httpx.Response, stage: str) -> dict[str, Any]:
    param = "prompt" if stage == "prompt" else None
    err = assert_error(resp, 422, f"{stage}_flagged", "safety_checker_error", param)
    assert "safety checker" in err["message"]
    return err


def assert_refused_disable(resp: httpx.Response) -> dict[str, Any]:
    err = assert_error(resp, 403, "safety_checker_required", "permission_error", "disable_safety_checker")
    assert "safety checker" in err["message"]
    return err


def assert_images(resp: httpx.Response, count: int = 1) -> list[Any]:
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert len(data) == count
    return data


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)
            if after.get(k, 0) != before.get(k, 0)}


def run_together1_once(server: InProcessServer, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``client.images.generate(**call)`` with together 1.x, per call its one outcome."""
    return [attempts[0] for attempts in run_together1(server, calls)]


def t1_call(key: str = "any", **fields: Any) -> dict[str, Any]:
    """together 1.x always sends n/height/width, so set them small."""
    return {"__api_key": key, "model": MODEL, "prompt": "a red fox", "n": 1, "height": 64, "width": 64,
            "steps": 1, **fields}


def tiny_manifest(model_id: str, **changes: Any) -> dict[str, Any]:
    manifest = yaml.safe_load((REPO / "models" / "tiny-flux.yaml").read_text())
    manifest.update(id=model_id, aliases=[])
    for section, values in changes.items():
        manifest.setdefault(section, {}).update(values)
    return manifest


# ------------------------------------------------------------------------------------------ servers


@pytest.fixture(scope="module")
def guarded(make_app: Any) -> InProcessServer:
    """The default policy (checker on, disable never allowed) plus a test word list."""
    return make_app({"safety": {"prompt": {"blocklist": ["zorblax", "grim phrase"],
                                              "patterns": [r"\bforbid\w*"]}}}, listen=True)


@pytest.fixture(scope="module")
def strict(make_app: Any, tmp_path_factory: pytest.TempPathFactory) -> InProcessServer:
    """Models whose manifests name flag-everything checkers of both formats; disabling per API key."""
    models = tmp_path_factory.mktemp("models")
    for manifest in (
        tiny_manifest(VIT_STRICT, safety={"image_checker": VIT_FLAG_ALL}),
        tiny_manifest(SD_STRICT, safety={"image_checker": SD_FLAG_ALL}),
        tiny_manifest(LOCKED, safety={"image_checker": VIT_FLAG_ALL},
                      capabilities={"safety_checker_optional": False}),
    ):
        (models / f"{manifest['id'].split('/')[1]}.yaml").write_text(yaml.safe_dump(manifest))
    return make_app({
        "models_dir": str(models), "models": [VIT_STRICT, SD_STRICT, LOCKED],
        "server": {"api_keys": [USER, TRUSTED]},
        "safety": {"allow_disable": "per_key", "disable_keys": [TRUSTED]},
    }, listen=True)


@pytest.fixture(scope="module")
def permissive(make_app: Any) -> InProcessServer:
    """Anyone may disable; otherwise a text classifier and the image checker (config) flag everything."""
    return make_app({"safety": {
        "allow_disable": "always",
        "prompt": {"classifier": {"source": {"builtin": "tiny-text-classifier"}, "label": "nsfw",
                                  "threshold": 0.0}},
        "image_checker": VIT_FLAG_ALL,
    }}, listen=True)


@pytest.fixture(scope="module")
def listed(make_app: Any) -> InProcessServer:
    """The default word and pattern lists, in-process with the stand-in engine."""
    return make_app({"server": {"default_response_format": "base64"}}, engine="stand-in")


# ----------------------------------------------------------------------------------- default policy


def test_default_config_runs_the_checker() -> None:
    settings = Settings()
    assert settings.safety.enabled and settings.safety.allow_disable == "never"
    assert settings.safety.prompt.blocklist and settings.safety.prompt.patterns
    registry = Registry.from_settings(settings.models_dir, settings.models)
    checker = registry.default.safety.image_checker
    assert checker is not None and checker.format == "sd-safety-checker"
    assert load_settings(REPO / "configs" / "default.yaml").safety == settings.safety
    manifests = load_manifests(REPO / "models")
    for model_id in (MODEL, "black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev"):
        assert manifests[model_id].safety.image_checker is not None, model_id


def test_clean_request_passes_both_stages(guarded: InProcessServer) -> None:
    before = counters(guarded)
    files = stored_files(guarded)
    [item] = assert_images(post(guarded, prompt="a lighthouse at dusk", seed=3, response_format="url",
                                output_format="png"))
    image = httpx.get(item["url"], timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert len(stored_files(guarded)) == len(files) + 1
    assert delta(before, counters(guarded)) == {"prompts_checked": 1, "images_checked": 1}
    assert ready(guarded)["safety"]["enabled"] is True


@pytest.mark.parametrize("prompt", [
    "a zorblax at dawn", "A ZORBLAX, at dawn", "the Grim   Phrase in fog", "forbidden fruit", "Forbid it",
])
def test_flagged_prompt_is_422_before_any_gpu_work(guarded: InProcessServer, prompt: str) -> None:
    before = ready(guarded)
    files = stored_files(guarded)
    err = assert_flagged(post(guarded, prompt=prompt, n=2, response_format="url"), "prompt")
    assert "prompt" in err["message"]
    after = ready(guarded)
    # Nothing reached the worker: no pipeline call, no image checked, nothing queued or stored.
    assert after["pipeline_calls"] == before["pipeline_calls"]
    assert delta(before["safety"]["counters"], after["safety"]["counters"]) == {
        "prompts_checked": 1, "prompts_flagged": 1}
    assert after["queue_depth"] == 0
    assert stored_files(guarded) == files


@pytest.mark.parametrize("fields", [
    {"prompt": "zorblaxes in a row"},  # whole words only
    {"prompt": "a lighthouse", "negative_prompt": "zorblax, blur"},  # negative prompts are not checked
    {"prompt": "a lighthouse", "disable_safety_checker": False},
], ids=["not a whole word", "negative prompt", "disable false"])
def test_unflagged_prompts_generate(guarded: InProcessServer, fields: dict[str, Any]) -> None:
    before = ready(guarded)["pipeline_calls"]
    assert_images(post(guarded, seed=1, response_format="base64", **fields))
    assert ready(guarded)["pipeline_calls"] == before + 1


@pytest.mark.parametrize("prompt", [
    "csam", "\uff43\uff53\uff41\uff4d", "c\u200bsam", "c\u00adsam", "child_porn",  # reported
    "\ufeffCSAM", "c\u2060s\u200da\u034fm", "a Child-Porn still", "CHILD__PORN", "child.\u3000porn",
    "c\u0301sam", "\U0001d41c\U0001d42c\U0001d41a\U0001d426", "kids_nsfw", "nsfw\uff3fkids",
], ids=ascii)
def test_word_list_matches_the_normalised_prompt(listed: InProcessServer, prompt: str) -> None:
    calls = len(listed.engines[0].calls)
    resp = listed.client.post(GEN, json={"model": MODEL, "prompt": prompt, **SMALL})
    assert_flagged(resp, "prompt")
    assert len(listed.engines[0].calls) == calls


@pytest.mark.parametrize("prompt", ["csams at dusk", "a lighthouse_at dusk", "kids flying a kite"], ids=ascii)
def test_normalising_keeps_whole_words(listed: InProcessServer, prompt: str) -> None:
    assert_images(listed.client.post(GEN, json={"model": MODEL, "prompt": prompt, **SMALL}))


def test_disable_is_refused_by_default(guarded: InProcessServer) -> None:
    before = ready(guarded)
    err = assert_refused_disable(post(guarded, prompt="a lighthouse", disable_safety_checker=True))
    assert "does not allow" in err["message"]
    after = ready(guarded)
    assert after["pipeline_calls"] == before["pipeline_calls"]
    assert delta(before["safety"]["counters"], after["safety"]["counters"]) == {"disable_refused": 1}


def test_sdks_raise_422_and_403_classes_on_the_prompt_stage(guarded: InProcessServer) -> None:
    flagged = post(guarded, prompt="a zorblax").json()["error"]
    with pytest.raises(together.UnprocessableEntityError) as t3:
        together3(guarded).images.generate(model=MODEL, prompt="a zorblax", **SMALL)
    assert t3.value.status_code == 422 and flagged["message"] in str(t3.value)
    with pytest.raises(openai.UnprocessableEntityError) as oa:
        openai_client(guarded).images.generate(model=MODEL, prompt="a zorblax", size="64x64",
                                               extra_body={"steps": 1})
    assert oa.value.status_code == 422 and oa.value.body["code"] == "prompt_flagged"

    with pytest.raises(together.PermissionDeniedError) as t3:
        together3(guarded).images.generate(model=MODEL, prompt="a fox", disable_safety_checker=True,
                                           **SMALL)
    assert t3.value.status_code == 403
    with pytest.raises(openai.PermissionDeniedError) as oa:
        openai_client(guarded).images.generate(model=MODEL, prompt="a fox", size="64x64",
                                               extra_body={"steps": 1, "disable_safety_checker": True})
    assert oa.value.body["code"] == "safety_checker_required"

    prompt_flag, refused, ok = run_together1_once(guarded, [
        t1_call(prompt="a zorblax"), t1_call(disable_safety_checker=True), t1_call(),
    ])
    assert (prompt_flag["ok"], prompt_flag["cls"]) == (False, "InvalidRequestError")
    assert prompt_flag["status"] == 422
    assert flagged["message"] in prompt_flag["message"]
    assert (refused["ok"], refused["cls"], refused["status"]) == (False, "InvalidRequestError", 403)
    assert ok == {"ok": True, "images": 1}


# --------------------------------------------------------------------------------------- image stage


@pytest.mark.parametrize("model", [VIT_STRICT, SD_STRICT], ids=["image-classification", "sd-safety-checker"])
def test_flagged_image_is_422_and_nothing_is_stored(strict: InProcessServer, model: str) -> None:
    before = ready(strict)
    files = stored_files(strict)
    resp = post(strict, USER, model=model, prompt="a lighthouse", n=2, response_format="url")
    assert_flagged(resp, "image")
    after = ready(strict)
    assert after["pipeline_calls"] == before["pipeline_calls"] + 1  # it was generated, then refused
    assert delta(before["safety"]["counters"], after["safety"]["counters"]) == {
        "prompts_checked": 1, "images_checked": 2, "images_flagged": 2, "requests_flagged_image": 1}
    assert stored_files(strict) == files

    # The same request from a key that may disable the checker is stored and served.
    [item] = assert_images(post(strict, TRUSTED, model=model, prompt="a lighthouse", response_format="url",
                                disable_safety_checker=True))
    assert httpx.get(item["url"], timeout=30).status_code == 200
    assert len(stored_files(strict)) == len(files) + 1


def test_disable_per_api_key(strict: InProcessServer) -> None:
    err = assert_refused_disable(post(strict, USER, model=VIT_STRICT, prompt="a fox",
                                      disable_safety_checker=True))
    assert "API key" in err["message"]
    before = counters(strict)
    assert_images(post(strict, TRUSTED, model=VIT_STRICT, prompt="a fox", n=2, response_format="base64",
                       disable_safety_checker=True), 2)
    # Honored: neither stage ran for it.
    assert delta(before, counters(strict)) == {"disable_honored": 1}


def test_manifest_can_forbid_disabling(strict: InProcessServer) -> None:
    card = httpx.get(f"{strict.url}/v1/models", headers={"Authorization": f"Bearer {USER}"},
                     timeout=30).json()
    optional = {m["id"]: m["capabilities"]["safety_checker_optional"] for m in card["data"]}
    assert optional == {VIT_STRICT: True, SD_STRICT: True, LOCKED: False}
    err = assert_refused_disable(post(strict, TRUSTED, model=LOCKED, prompt="a fox",
                                      disable_safety_checker=True))
    assert LOCKED in err["message"]


def test_sdks_raise_422_on_the_image_stage(strict: InProcessServer) -> None:
    raw = post(strict, USER, model=SD_STRICT, prompt="a fox").json()["error"]
    with pytest.raises(together.UnprocessableEntityError) as t3:
        together3(strict, USER).images.generate(model=SD_STRICT, prompt="a fox", response_format="url",
                                                **SMALL)
    assert t3.value.status_code == 422 and raw["message"] in str(t3.value)
    with pytest.raises(openai.UnprocessableEntityError) as oa:
        openai_client(strict, USER).images.generate(model=VIT_STRICT, prompt="a fox", size="64x64",
                                                    extra_body={"steps": 1})
    assert oa.value.body["code"] == "image_flagged" and oa.value.body["type"] == "safety_checker_error"
    with pytest.raises(together.PermissionDeniedError):
        together3(strict, USER).images.generate(model=VIT_STRICT, prompt="a fox",
                                                disable_safety_checker=True, **SMALL)
    image_flag, refused, honored = run_together1_once(strict, [
        t1_call(USER, model=VIT_STRICT),
        t1_call(USER, model=VIT_STRICT, disable_safety_checker=True),
        t1_call(TRUSTED, model=SD_STRICT, disable_safety_checker=True, response_format="base64"),
    ])
    assert (image_flag["ok"], image_flag["cls"], image_flag["status"]) == (False, "InvalidRequestError", 422)
    assert "safety checker flagged" in image_flag["message"]
    assert (refused["ok"], refused["cls"], refused["status"]) == (False, "InvalidRequestError", 403)
    assert honored == {"ok": True, "images": 1}


# ---------------------------------------------------------------------- text classifier, "always"


def test_prompt_classifier_flags_before_any_gpu_work(permissive: InProcessServer) -> None:
    before = ready(permissive)
    assert before["safety"]["prompt_stage"] == "ready"
    err = assert_flagged(post(permissive, prompt="a quiet harbour"), "prompt")
    assert "classifier" in err["message"]
    after = ready(permissive)
    assert after["pipeline_calls"] == before["pipeline_calls"]
    assert delta(before["safety"]["counters"], after["safety"]["counters"]) == {
        "prompts_checked": 1, "prompts_flagged": 1}


def test_disable_always_allowed_skips_both_stages(permissive: InProcessServer) -> None:
    before = ready(permissive)
    data = assert_images(post(permissive, prompt="a quiet harbour", response_format="base64",
                              disable_safety_checker=True))
    assert decode_image(data[0]["b64_json"]).size == (64, 64)
    response = together3(permissive).images.generate(
        model=MODEL, prompt="a quiet harbour", disable_safety_checker=True, response_format="base64", **SMALL)
    assert len(response.data) == 1
    after = ready(permissive)
    assert after["pipeline_calls"] == before["pipeline_calls"] + 2
    assert delta(before["safety"]["counters"], after["safety"]["counters"]) == {"disable_honored": 2}


# ---------------------------------------------------------------------- one flagged job in a batch


PROMPT = "a harbour at night"


def _one_flagging_spec(fmt: str, images: list[Any], cache: Path) -> dict[str, Any] | None:
    """A spec of format ``fmt`` that flags exactly one of two images, from the checker's own scores."""
    if fmt == "image-classification":
        base = {"format": fmt, "source": {"builtin": "tiny-nsfw-vit"}, "label": "nsfw"}
        scores = load_image_checker(ImageCheckerSpec(**base, threshold=0.5), cache, "cpu").scores(images)
        spec = {**base, "threshold": round(float(scores.mean()), 6)}
    else:
        base = {"format": fmt, "source": {"builtin": "tiny-sd-safety-checker"}}
        scores = load_image_checker(ImageCheckerSpec(**base), cache, "cpu").scores(images)
        spec = {**base, "adjustment": round(-float(scores.mean()), 6)}
    if abs(float(scores[0] - scores[1])) < 0.004:
        return None  # too close to split reliably: try other seeds
    verdicts = load_image_checker(ImageCheckerSpec(**spec), cache, "cpu").check(images)
    return spec if sum(v.flagged for v in verdicts) == 1 else None


@pytest.mark.parametrize("fmt", ["image-classification", "sd-safety-checker"])
def test_one_flagged_job_does_not_fail_its_batch(guarded: InProcessServer, make_app: Any, tiny_cache: Path,
                                                 fmt: str) -> None:
    # Measure: a request for seeds s and s+1 runs the same pipeline call as two batched jobs would.
    for seed in (10, 20, 30, 40, 50):
        resp = post(guarded, prompt=PROMPT, seed=seed, n=2, output_format="png", response_format="base64")
        images = [decode_image(item["b64_json"]) for item in assert_images(resp, 2)]
        spec = _one_flagging_spec(fmt, images, tiny_cache)
        if spec is not None:
            break
    else:
        pytest.fail("no seed pair whose checker scores differ enough")
    flagged_index = [v.flagged for v in load_image_checker(ImageCheckerSpec(**spec), tiny_cache, "cpu")
                     .check(images)].index(True)

    server = make_app({"safety": {"image_checker": spec},
                          "scheduler": {"batch_window_ms": 30000, "max_batch_images": 2,
                                        "adaptive_window": False}}, listen=True)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(post, server, prompt=PROMPT, seed=seed + i, output_format="png",
                               response_format="base64") for i in range(2)]
        responses = [f.result() for f in futures]

    assert_flagged(responses[flagged_index], "image")
    good = responses[1 - flagged_index]
    [item] = assert_images(good)
    assert good.json()["batch"]["jobs"] == 2  # it shared its batch with the flagged job
    assert item["seed"] == seed + 1 - flagged_index
    # The image that passed is the one measured (same pipeline call, so equal up to float noise).
    assert mean_abs_diff(decode_image(item["b64_json"]), images[1 - flagged_index]) < 0.5
    assert counters(server) == {"prompts_checked": 2, "images_checked": 2, "images_flagged": 1,
                                "requests_flagged_image": 1}


# ------------------------------------------------------------------------------- policy, unit level


def _manifest(optional: bool = True) -> Any:
    manifest = Registry.from_settings(REPO / "models", [MODEL]).default
    return manifest.model_copy(update={"capabilities": manifest.capabilities.model_copy(
        update={"safety_checker_optional": optional})})


@pytest.mark.parametrize(("policy", "key", "optional", "disable", "expected"), [
    ({}, None, True, None, True),
    ({}, None, True, False, True),
    ({}, None, True, True, Forbidden),
    ({"allow_disable": "always"}, None, True, True, False),
    ({"allow_disable": "always"}, None, False, True, Forbidden),
    ({"allow_disable": "always"}, None, False, False, True),
    ({"allow_disable": "per_key", "disable_keys": ["k1"]}, "k1", True, True, False),
    ({"allow_disable": "per_key", "disable_keys": ["k1"]}, "k2", True, True, Forbidden),
    ({"allow_disable": "per_key", "disable_keys": ["k1"]}, None, True, True, Forbidden),
    ({"enabled": False}, None, False, True, False),
    ({"enabled": False}, None, True, None, False),
])
def test_resolve_check(policy: dict[str, Any], key: str | None, optional: bool, disable: bool | None,
                       expected: Any) -> None:
    safety = SafetySettings(**policy)
    if expected is Forbidden:
        with pytest.raises(Forbidden) as exc:
            resolve_check(safety, _manifest(optional), disable, key)
        assert exc.value.status == 403 and exc.value.param == "disable_safety_checker"
    else:
        assert resolve_check(safety, _manifest(optional), disable, key) is expected


def test_per_key_needs_keys_and_patterns_must_compile() -> None:
    with pytest.raises(ValueError, match="disable_keys"):
        SafetySettings(allow_disable="per_key")
    with pytest.raises(ValueError, match="regular expression"):
        SafetySettings(prompt={"patterns": ["(unclosed"]})
    with pytest.raises(ValueError, match="source"):
        ImageCheckerSpec(format="image-classification")
    assert bearer_token("Bearer abc ") == "abc" and bearer_token("Basic abc") is None


@pytest.mark.parametrize(("prompt", "flagged"), [
    ("nsfw picture of kids", True),
    ("Lolicon style", True),
    ("kids flying a kite on a beach", False),
    ("a naked tree in winter", False),
])
def test_default_prompt_lists(tmp_path: Path, prompt: str, flagged: bool) -> None:
    guard = PromptGuard(SafetySettings(), tmp_path)
    if flagged:
        with pytest.raises(Exception, match="flagged the prompt"):
            guard.check(prompt)
    else:
        guard.check(prompt)


def test_text_classifier_thresholds(tiny_cache: Path) -> None:
    spec = {"source": {"builtin": "tiny-text-classifier"}, "label": "NSFW"}  # labels match in any case
    never = TextClassifier(TextClassifierSpec(**spec, threshold=1.01), tiny_cache)
    always = TextClassifier(TextClassifierSpec(**spec, threshold=0.0), tiny_cache)
    for prompt in ("a lighthouse", "a harbour at night"):
        assert never.flags(prompt)[0] is False
        assert always.flags(prompt)[0] is True
        assert 0.0 < never.score(prompt) < 1.0
    with pytest.raises(ValueError, match="no label"):
        TextClassifier(TextClassifierSpec(source=spec["source"], label="toxic"), tiny_cache)


class RecordingChecker:
    """Flags the images whose top-left pixel is pure red; records every call."""

    name = "recording"

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[int] = []
        self.error = error

    def check(self, images: Any) -> list[Any]:
        from server.engine.safety import Verdict

        self.calls.append(len(images))
        if self.error is not None:
            raise self.error
        return [Verdict(im.getpixel((0, 0)) == (255, 0, 0), 0.0) for im in images]


def test_screen_batch_one_call_per_batch_and_per_job_outcomes() -> None:
    from PIL import Image

    from server.engine.safety import screen_batch
    from server.errors import InternalError, SafetyFlagged
    from server.metrics import SafetyCounters
    from server.params import GenerationParams

    def job(n: int, check: bool = True) -> GenerationParams:
        return GenerationParams(model=MODEL, prompt="p", width=8, height=8, steps=1, guidance_scale=1.0,
                                seeds=tuple(range(n)), check_safety=check)

    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    batch = [job(2), job(1), job(1, check=False), job(1)]
    outputs = [[blue, red], [blue], [red], [blue]]
    checker, counts = RecordingChecker(), SafetyCounters()
    refusals = screen_batch(checker, batch, outputs, counts)
    assert checker.calls == [4]  # one call; the unchecked job's image is not in it
    assert isinstance(refusals[0], SafetyFlagged) and refusals[0].code == "image_flagged"
    assert "1 of the 2" in refusals[0].message
    assert refusals[1:] == [None, None, None]
    assert counts.snapshot() == {"images_checked": 4, "images_flagged": 1, "requests_flagged_image": 1}

    failing = RecordingChecker(RuntimeError("out of memory"))
    refusals = screen_batch(failing, batch, outputs, SafetyCounters())
    assert [type(r) for r in refusals] == [InternalError, InternalError, type(None), InternalError]
    assert screen_batch(None, batch, outputs, SafetyCounters()) == [None] * 4
