"""Stored images behind signed, expiring URLs, and their encoding.

The server tests serve the app on a loopback port (in-process) with a known signing key, so a test can sign a
URL itself (for a key that does not exist, or a fresh expiry) exactly as the server would.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from server.api.storage import LocalStorage
from server.config import StorageSettings
from server.errors import Forbidden, NotFound
from server.images import encode_image

from .conftest import MODEL
from .support import launch
from .support.inprocess import InProcessServer

API_KEY = "storage-test-key"
SIGNING_KEY = "storage-test-signing-key"
ONE_THREAD = {"engine": {"cpu_threads": 1}}
FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp")}


def generate(server: InProcessServer, **body: Any) -> httpx.Response:
    body = {"model": MODEL, "prompt": "a stored image", "width": 96, "height": 64, "steps": 1, **body}
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"})


def url_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    assert item["type"] == "url" and "b64_json" not in item
    return item["url"]


def key_of(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[-1]


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    return parts._replace(query=urlencode({**query_of(url), **changes})).geturl()


def assert_error(response: httpx.Response, status: int, *codes: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] in codes
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] is None or isinstance(body["error"]["param"], str)


def signer(directory: Path, **settings: Any) -> LocalStorage:
    """A LocalStorage that signs URLs with the test servers' key."""
    return LocalStorage(StorageSettings(directory=directory, signing_key=SIGNING_KEY, **settings))


wait_until = functools.partial(launch.wait_until, timeout_s=30.0)


# --- through the server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url_server(make_app: Any) -> Iterator[InProcessServer]:
    config = {
        **ONE_THREAD,
        "server": {"api_keys": [API_KEY], "default_response_format": "url"},
        "storage": {"signing_key": SIGNING_KEY},
    }
    server = make_app(config, listen=True)
    # What a deployment keeps beside its image folder, as `darkroom serve` runs in tests: its config (with
    # the signing key) and its log. The path-traversal tests aim at them.
    (server.storage_dir.parent / "config.yaml").write_text(yaml.safe_dump(config))
    (server.storage_dir.parent / "server.log").write_text("root:x:0:0:root:/root:/bin/bash\n")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def short_lived_server(make_app: Any) -> Iterator[InProcessServer]:
    """URLs valid for 1 s; files kept 2 s, swept every 0.5 s."""
    server = make_app({
        **ONE_THREAD,
        "server": {"api_keys": [API_KEY]},
        "storage": {"signing_key": SIGNING_KEY, "url_ttl_s": 1, "retention_s": 2, "cleanup_interval_s": 0.5},
    }, listen=True)
    yield server
    server.stop()


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_url_response_serves_the_image_without_an_api_key(url_server: InProcessServer, fmt: str) -> None:
    response = generate(url_server, seed=21, output_format=fmt, response_format="url")
    url = url_of(response)
    assert url.startswith(f"{url_server.url}/v1/files/")
    assert set(query_of(url)) == {"expires", "signature"}

    fetched = httpx.get(url, timeout=30)  # no Authorization header: the signature is the credential
    assert fetched.status_code == 200, fetched.text
    pil_format, media_type = FORMATS[fmt]
    assert fetched.headers["content-type"] == media_type
    image = Image.open(io.BytesIO(fetched.content))
    image.load()
    assert image.format == pil_format and image.size == (96, 64)

    # What the URL serves is byte for byte what base64 carries for the same seed.
    inline = generate(url_server, seed=21, output_format=fmt, response_format="base64")
    assert inline.status_code == 200, inline.text
    assert base64.b64decode(inline.json()["data"][0]["b64_json"]) == fetched.content


def test_default_response_format_is_a_url_and_each_image_gets_its_own(url_server: InProcessServer) -> None:
    response = generate(url_server, seed=3, n=2)
    urls = [item["url"] for item in response.json()["data"]]
    assert len(set(urls)) == 2
    contents = [httpx.get(u, timeout=30).content for u in urls]
    assert contents[0] != contents[1]
    assert all(Image.open(io.BytesIO(c)).format == "JPEG" for c in contents)


def test_tampered_urls_are_refused(url_server: InProcessServer) -> None:
    url = url_of(generate(url_server, seed=5, response_format="url"))
    assert httpx.get(url, timeout=30).status_code == 200
    query = query_of(url)

    signature = query["signature"]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    assert_error(httpx.get(with_query(url, signature=flipped), timeout=30), 403, "invalid_signature")
    later = str(int(query["expires"]) + 3600)
    assert_error(httpx.get(with_query(url, expires=later), timeout=30), 403, "invalid_signature")

    # The signature covers the key: the same query on another stored image is refused too.
    other = url_of(generate(url_server, seed=6, response_format="url"))
    swapped = other.split("?")[0] + "?" + urlsplit(url).query
    assert_error(httpx.get(swapped, timeout=30), 403, "invalid_signature")

    # Missing parameters are a 400, in the error shape.
    assert_error(httpx.get(url.split("?")[0], timeout=30), 400, "invalid_request")


def test_validly_signed_url_for_a_missing_file_is_404(url_server: InProcessServer, tmp_path: Path) -> None:
    path = signer(tmp_path).signed_path("0123456789abcdef0123456789abcdef.png")
    assert_error(httpx.get(url_server.url + path, timeout=30), 404, "file_not_found")


@pytest.mark.parametrize("key", [
    "..%2F..%2Fetc%2Fpasswd",
    "..%2Fconfig.yaml",
    "..%2Fserver.log",
    "%2E%2E%2Fconfig.yaml",
    "..%5Cconfig.yaml",
])
def test_path_traversal_keys_are_404(url_server: InProcessServer, tmp_path: Path, key: str) -> None:
    # config.yaml and server.log really exist one level above the storage directory.
    assert (url_server.storage_dir.parent / "config.yaml").is_file()
    # Sign the decoded key, so only the key check can stop the request.
    signed = signer(tmp_path).signed_path(unquote(key))
    query = signed.split("?", 1)[1]
    response = httpx.get(f"{url_server.url}/v1/files/{key}?{query}", timeout=30)
    # Refused by the route (no "/" in a key) or by the key check, never served from outside.
    assert_error(response, 404, "not_found", "file_not_found")
    config = (url_server.storage_dir.parent / "config.yaml").read_bytes()
    assert config not in response.content and b"root:" not in response.content


def test_expired_url_is_403(short_lived_server: InProcessServer) -> None:
    url = url_of(generate(short_lived_server, seed=7, response_format="url"))
    expires = int(query_of(url)["expires"])
    # Wait until the URL's expiry has passed (it was issued with a 1 s lifetime).
    wait_until(lambda: time.time() > expires + 0.2, "the URL to expire", timeout_s=10)
    assert_error(httpx.get(url, timeout=30), 403, "url_expired")


def test_stored_files_are_removed_after_retention(short_lived_server: InProcessServer, tmp_path: Path) -> None:
    server = short_lived_server
    url = url_of(generate(server, seed=8, output_format="png", response_format="url"))
    key = key_of(url)
    stored = server.storage_dir / key
    assert stored.is_file()  # kept 2 s; checked right after the response
    assert stored.suffix == ".png"

    wait_until(lambda: not stored.exists(), "the sweep to delete the stored file")
    # A freshly signed URL (URLs here live only 1 s) tells "removed" apart from "expired": 404.
    fresh = signer(tmp_path, url_ttl_s=3600).signed_path(key)
    assert_error(httpx.get(server.url + fresh, timeout=30), 404, "file_not_found")
    assert not any(p.name.endswith(".tmp") for p in server.storage_dir.iterdir())


def test_freshly_signed_url_serves_an_existing_file(short_lived_server: InProcessServer, tmp_path: Path) -> None:
    """The control for the test above: the same re-signing gives 200 while the file is there."""
    server = short_lived_server
    url = url_of(generate(server, seed=9, output_format="png", response_format="url"))
    fresh = signer(tmp_path, url_ttl_s=3600).signed_path(key_of(url))
    response = httpx.get(server.url + fresh, timeout=30)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).format == "PNG"


# --- LocalStorage and encode_image directly -------------------------------------------------------


def test_local_storage_sign_and_open(tmp_path: Path) -> None:
    storage = signer(tmp_path / "images", url_ttl_s=60)
    key = storage.put(b"not really an image", "png")
    assert (tmp_path / "images" / key).read_bytes() == b"not really an image"

    now = 1_700_000_000.0
    path = storage.signed_path(key, now=now)
    assert path.startswith(f"/v1/files/{key}?")
    query = query_of(path)
    expires, signature = int(query["expires"]), query["signature"]
    assert expires == int(now) + 60

    assert storage.open(key, expires, signature, now=now) == tmp_path / "images" / key
    assert storage.open(key, expires, signature, now=expires) == tmp_path / "images" / key
    with pytest.raises(Forbidden) as expired:
        storage.open(key, expires, signature, now=expires + 1)
    assert expired.value.code == "url_expired" and expired.value.status == 403
    with pytest.raises(Forbidden) as tampered:
        storage.open(key, expires + 1, signature, now=now)
    assert tampered.value.code == "invalid_signature"
    with pytest.raises(Forbidden):
        storage.open(key, expires, signature[:-1] + ("0" if signature[-1] != "0" else "1"), now=now)

    missing = "f" * 32 + ".png"
    missing_query = query_of(storage.signed_path(missing, now=now))
    with pytest.raises(NotFound) as gone:
        storage.open(missing, int(missing_query["expires"]), missing_query["signature"], now=now)
    assert gone.value.code == "file_not_found" and gone.value.status == 404

    # Another key signs differently; a key made per process (no signing_key) too.
    other = LocalStorage(StorageSettings(directory=tmp_path / "images", signing_key="another key"))
    with pytest.raises(Forbidden):
        other.open(key, expires, signature, now=now)
    assert query_of(LocalStorage(StorageSettings(directory=tmp_path / "x")).signed_path(key, now=now)) != query


@pytest.mark.parametrize("key", [
    "../config.yaml", "../../etc/passwd", "/etc/passwd", "..", ".", "", "x.png",
    "0123456789abcdef0123456789abcdef.gif", "0123456789ABCDEF0123456789ABCDEF.png",
    "0123456789abcdef0123456789abcdef.png/../../secret",
])
def test_local_storage_refuses_keys_that_are_not_its_own(tmp_path: Path, key: str) -> None:
    storage = signer(tmp_path / "images")
    (tmp_path / "config.yaml").write_text("secret")
    query = query_of(storage.signed_path(key))
    with pytest.raises(NotFound):
        storage.open(key, int(query["expires"]), query["signature"])


def test_local_storage_cleanup_uses_retention(tmp_path: Path) -> None:
    storage = signer(tmp_path, retention_s=100)
    now = 1_800_000_000.0
    ages = {"old": 500, "just-past": 101, "at-limit": 100, "young": 10}
    keys = {}
    for name, age in ages.items():
        key = storage.put(name.encode(), "jpeg")
        os.utime(tmp_path / key, (now - age, now - age))
        keys[name] = key

    assert storage.cleanup(now=now) == 2
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {keys["at-limit"], keys["young"]}
    assert storage.cleanup(now=now) == 0
    # Later, the rest ages out too.
    assert storage.cleanup(now=now + 1000) == 2
    assert list(tmp_path.iterdir()) == []
    assert storage.cleanup(now=now + 2000) == 0


def _gradient(mode: str) -> Image.Image:
    y, x = np.mgrid[0:48, 0:80]
    rgb = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    return image.convert(mode)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_encode_image_gives_real_files(fmt: str, mode: str) -> None:
    source = _gradient(mode)
    data = encode_image(source, fmt)
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    assert decoded.format == FORMATS[fmt][0]
    assert decoded.size == (80, 48)
    diff = np.abs(np.asarray(decoded.convert("RGB"), np.int16) - np.asarray(source.convert("RGB"), np.int16))
    if fmt == "png":
        assert diff.max() == 0  # lossless
    else:
        assert diff.mean() < 8  # lossy, but the same picture


def test_encode_image_refuses_unknown_formats() -> None:
    with pytest.raises(ValueError):
        encode_image(_gradient("RGB"), "gif")
