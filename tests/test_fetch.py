"""The guarded fetcher against a real loopback HTTP origin: good images, and every hostile case.

The origin listens on 127.0.0.1 and is reached by the name ``localhost``, which the fetcher is told to
allow (``allow_hosts``); its numeric address is *not* allowed, so redirects into 127.0.0.1 must be refused.
Private, link-local and other internal addresses are refused before any connection, so no packet ever
leaves loopback.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import threading
import time
from collections.abc import Iterator

import pytest
from PIL import Image

from server.addresses import blocked_reason
from server.config import FetchSettings
from server.fetch import FetchBusy, Fetcher, FetchError
from server.images import decode_image

from .conftest import free_port
from .image_origin import HUGE_BYTES, ImageOrigin, palette_bomb, png_bomb

FIELD = "image_url"


@pytest.fixture(scope="module")
def origin() -> Iterator[ImageOrigin]:
    with ImageOrigin(name="localhost", slow_s=4.0) as server:
        yield server


def make_fetcher(**changes: object) -> Fetcher:
    settings = {"allow_hosts": ["localhost"], "max_bytes": 1_000_000, "timeout_s": 1.0,
                "max_pixels": 4_000_000, "max_redirects": 3, **changes}
    return Fetcher(FetchSettings(**settings))


@pytest.fixture(scope="module")
def fetcher() -> Iterator[Fetcher]:
    f = make_fetcher()
    yield f
    f.close()


def refused(fetcher: Fetcher, url: str, field: str = FIELD) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetcher.fetch_image(url, field)
    error = info.value
    assert error.status == 400
    assert error.param == field
    assert error.message.startswith(f"'{field}'")
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    return error


def rgb_at(image: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return image.getpixel(xy)  # type: ignore[return-value]


# -- good images -----------------------------------------------------------------------------------


def test_fetches_and_decodes_an_image(fetcher: Fetcher, origin: ImageOrigin) -> None:
    image = fetcher.fetch_image(origin.url("/gradient.png"), FIELD)
    assert image.mode == "RGB" and image.size == (96, 64)
    assert rgb_at(image, (0, 0))[0] < 10 and rgb_at(image, (95, 0))[0] > 245


def test_content_is_sniffed_not_taken_from_headers(fetcher: Fetcher, origin: ImageOrigin) -> None:
    image = fetcher.fetch_image(origin.url("/mislabelled"), FIELD)  # PNG served as text/plain
    assert rgb_at(image, (8, 8)) == (0, 200, 0)


def test_cache_keyed_by_url(origin: ImageOrigin) -> None:
    fetcher = make_fetcher()
    url = origin.url("/checker.jpg")
    before = origin.hits.get("/checker.jpg", 0)
    first = fetcher.fetch_image(url, FIELD)
    second = fetcher.fetch_image(url, "reference_images[0]")
    assert second is first
    assert origin.hits["/checker.jpg"] == before + 1
    assert fetcher.cache.hits == 1


def test_concurrent_fetches_of_one_url_share_one_download(origin: ImageOrigin) -> None:
    fetcher = make_fetcher(timeout_s=3.0)
    url = origin.url("/gradient.png")
    before = origin.hits.get("/gradient.png", 0)
    results: list[Image.Image] = []
    threads = [threading.Thread(target=lambda: results.append(fetcher.fetch_image(url, FIELD)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(r is results[0] for r in results)
    assert origin.hits["/gradient.png"] == before + 1


def test_concurrent_downloads_are_capped() -> None:
    with ImageOrigin(name="localhost") as own:  # its own origin, so ``peak`` counts only these
        fetcher = make_fetcher(max_concurrent=1, timeout_s=5.0)
        urls = [own.url(f"/pause?{i}") for i in range(4)]  # four URLs: four downloads
        results: list[Image.Image] = []
        threads = [threading.Thread(target=lambda u=u: results.append(fetcher.fetch_image(u, FIELD)))
                   for u in urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 4 and own.hits["/pause"] == 4
        assert own.peak == 1  # the others waited for the one slot


def test_data_url(fetcher: Fetcher) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    image = fetcher.fetch_image(url, FIELD)
    assert image.size == (20, 10) and rgb_at(image, (0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("url", [
    "data:image/png;base64,not*base64!",
    "data:image/png,rawbytes",                    # not base64
    "data:text/plain;base64,aGVsbG8=",            # not an image type
    "data:image/png;base64",                      # no comma, no payload
    "data:;base64,aGVsbG8=",
])
def test_malformed_data_urls(fetcher: Fetcher, url: str) -> None:
    assert "data URL" in refused(fetcher, url).message


def test_data_url_that_is_not_an_image(fetcher: Fetcher) -> None:
    url = "data:image/png;base64," + base64.b64encode(b"hello, world").decode()
    assert "not an image" in refused(fetcher, url).message


def test_cmyk_jpeg_becomes_rgb(fetcher: Fetcher, origin: ImageOrigin) -> None:
    image = fetcher.fetch_image(origin.url("/cmyk.jpg"), FIELD)
    r, g, b = rgb_at(image, (16, 16))
    assert image.mode == "RGB" and r > 200 and g < 80 and b < 80  # C0 M100 Y100 K0 is red


def test_animated_gif_gives_its_first_frame(fetcher: Fetcher, origin: ImageOrigin) -> None:
    image = fetcher.fetch_image(origin.url("/anim.gif"), FIELD)
    r, g, b = rgb_at(image, (24, 24))
    assert image.mode == "RGB" and r > 200 and b < 80


def test_exif_orientation_is_applied(fetcher: Fetcher, origin: ImageOrigin) -> None:
    image = fetcher.fetch_image(origin.url("/rotated.jpg"), FIELD)
    assert image.size == (32, 64)  # stored 64x32, displayed rotated 90°
    top, bottom = rgb_at(image, (16, 8)), rgb_at(image, (16, 56))
    assert top[0] > 180 and top[2] < 80  # the stored left (red) half is on top
    assert bottom[2] > 180 and bottom[0] < 80


def test_transparency_is_composited_over_white(fetcher: Fetcher, origin: ImageOrigin) -> None:
    rgba = fetcher.fetch_image(origin.url("/rgba.png"), FIELD)
    assert rgb_at(rgba, (5, 5)) == (255, 0, 0) and rgb_at(rgba, (35, 5)) == (255, 255, 255)
    palette = fetcher.fetch_image(origin.url("/palette.png"), FIELD)
    assert palette.mode == "RGB"
    assert rgb_at(palette, (1, 1)) == (255, 255, 255) and rgb_at(palette, (20, 20)) == (10, 200, 10)


def test_16_bit_greyscale(fetcher: Fetcher, origin: ImageOrigin) -> None:
    image = fetcher.fetch_image(origin.url("/gray16.png"), FIELD)
    value = rgb_at(image, (3, 3))
    assert image.mode == "RGB" and value[0] == value[1] == value[2] and 140 < value[0] < 170


def test_redirect_within_allowed_hosts_is_followed(fetcher: Fetcher, origin: ImageOrigin) -> None:
    image = fetcher.fetch_image(origin.url("/redirect?to=/blue.png"), FIELD)
    assert rgb_at(image, (1, 1)) == (20, 20, 230)


# -- refused before connecting ---------------------------------------------------------------------


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://localhost/x.png", "gopher://localhost/",
                                 "javascript:alert(1)", "/relative/path.png", "localhost/x.png", ""])
def test_schemes_outside_the_allow_list(fetcher: Fetcher, url: str) -> None:
    error = refused(fetcher, url)
    assert error.code == "url_not_allowed" or "URL" in error.message


def test_scheme_allow_list_is_configurable(origin: ImageOrigin) -> None:
    fetcher = make_fetcher(allowed_schemes=["https"])
    assert "https:" in refused(fetcher, origin.url("/red.png")).message
    assert refused(fetcher, "data:image/png;base64,AAAA").code == "url_not_allowed"


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.1.2.3", "10.1.2.3", "172.16.5.4", "192.168.1.1", "169.254.169.254", "0.0.0.0",
    "100.64.0.1", "224.0.0.1", "[::1]", "[::]", "[fe80::1]", "[fc00::1]", "[::ffff:127.0.0.1]",
    "[::ffff:169.254.169.254]", "[2002:7f00:1::1]", "[64:ff9b::a9fe:a9fe]", "[ff02::1]",
    "2130706433", "0x7f000001", "127.1",  # other spellings of 127.0.0.1 (0177.0.0.1: invalid URL)
])
def test_internal_addresses_are_refused(fetcher: Fetcher, origin: ImageOrigin, host: str) -> None:
    before = dict(origin.hits)
    error = refused(fetcher, f"http://{host}:{origin.port}/red.png")
    assert error.code == "url_not_allowed" and "address" in error.message
    assert origin.hits == before  # nothing reached the origin, even where the address is its own


def test_octal_address_is_not_a_valid_url(fetcher: Fetcher, origin: ImageOrigin) -> None:
    before = dict(origin.hits)
    assert "not a valid URL" in refused(fetcher, f"http://0177.0.0.1:{origin.port}/red.png").message
    assert origin.hits == before


def test_a_name_that_resolves_to_loopback_is_refused(origin: ImageOrigin) -> None:
    fetcher = make_fetcher(allow_hosts=[])
    before = dict(origin.hits)
    error = refused(fetcher, origin.url("/red.png"))
    assert "host 'localhost' resolves to a loopback address" in error.message
    assert origin.hits == before


def test_allow_cidrs(origin: ImageOrigin) -> None:
    url = f"http://127.0.0.1:{origin.port}/red.png"
    refused(make_fetcher(allow_hosts=[]), url)
    image = make_fetcher(allow_hosts=[], allow_cidrs=["127.0.0.0/8"]).fetch_image(url, FIELD)
    assert rgb_at(image, (0, 0)) == (230, 20, 20)


@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}/red.png", "http://169.254.169.254/latest/",
                                    "http://[::1]:{port}/red.png", "http://10.0.0.1/x.png",
                                    "file:///etc/passwd"])
def test_redirects_into_internal_addresses_are_refused(
    fetcher: Fetcher, origin: ImageOrigin, target: str
) -> None:
    before = origin.hits.get("/red.png", 0)
    to = target.format(port=origin.port)
    error = refused(fetcher, origin.url(f"/redirect?to={to}"))
    assert error.code == "url_not_allowed"
    assert origin.hits.get("/red.png", 0) == before


def test_too_many_redirects(fetcher: Fetcher, origin: ImageOrigin) -> None:
    assert "redirected more than 3 times" in refused(fetcher, origin.url("/loop")).message


# -- failures at the origin ------------------------------------------------------------------------


def test_404(fetcher: Fetcher, origin: ImageOrigin) -> None:
    assert "HTTP 404" in refused(fetcher, origin.url("/missing.png")).message


def test_unreachable_port(fetcher: Fetcher) -> None:
    error = refused(fetcher, f"http://localhost:{free_port()}/x.png")
    assert "cannot connect" in error.message


def test_unresolvable_host(fetcher: Fetcher) -> None:
    assert "does not resolve" in refused(fetcher, "http://no-such-host.invalid/x.png").message


def test_slow_origin_times_out(fetcher: Fetcher, origin: ImageOrigin) -> None:
    assert "timed out" in refused(fetcher, origin.url("/slow")).message


def test_dripping_origin_times_out(fetcher: Fetcher, origin: ImageOrigin) -> None:
    assert "timed out" in refused(fetcher, origin.url("/drip")).message


@pytest.mark.parametrize("path", ["/huge", "/huge-declared"])
def test_download_is_capped(fetcher: Fetcher, origin: ImageOrigin, path: str) -> None:
    assert HUGE_BYTES > fetcher.settings.max_bytes
    assert "larger than 1000000 bytes" in refused(fetcher, origin.url(path)).message


def test_compressed_transfer_is_refused(fetcher: Fetcher, origin: ImageOrigin) -> None:
    assert "gzip" in refused(fetcher, origin.url("/gzip.png")).message


# -- hostile images --------------------------------------------------------------------------------


def test_png_bomb_is_refused_from_its_header(fetcher: Fetcher, origin: ImageOrigin) -> None:
    assert len(png_bomb()) < 1000
    error = refused(fetcher, origin.url("/bomb.png"))
    assert "pixels" in error.message and error.code == "invalid_image"


def test_pixel_cap_is_configurable() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, "PNG")
    assert decode_image(buf.getvalue(), FIELD, 60_000).size == (300, 200)
    with pytest.raises(FetchError, match="300x200 pixels; at most 59999"):
        decode_image(buf.getvalue(), FIELD, 59_999)


def test_truncated_image(fetcher: Fetcher, origin: ImageOrigin) -> None:
    assert "truncated or corrupt" in refused(fetcher, origin.url("/truncated.jpg")).message


def test_non_image_bytes(fetcher: Fetcher, origin: ImageOrigin) -> None:
    assert "not an image" in refused(fetcher, origin.url("/not-image.png")).message


def test_field_name_is_reported(fetcher: Fetcher, origin: ImageOrigin) -> None:
    error = refused(fetcher, origin.url("/missing.png"), field="reference_images[1]")
    assert error.param == "reference_images[1]"


def test_still_serves_after_the_hostile_batch(fetcher: Fetcher, origin: ImageOrigin) -> None:
    image = fetcher.fetch_image(origin.url("/blue.png"), FIELD)
    assert rgb_at(image, (0, 0)) == (20, 20, 230)


# -- the address classifier ------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address", ["192.0.2.1", "198.18.0.1", "240.0.0.1", "255.255.255.255",
                                     "2001:db8::1", "::127.0.0.1", "2001:0:4136:e378:8000:63bf:80ff:fffe"])
def test_special_purpose_addresses_are_blocked(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is not None


# -- slow origins, busy slots, decode memory (issue 12, items 1 and 2) ------------------------------


def test_a_silent_origin_is_cut_by_the_read_timeout(origin: ImageOrigin) -> None:
    # Headers and 40 bytes, then 3 s of silence, then the rest: well inside the whole-fetch deadline, but
    # a silence longer than read_timeout_s ends the download (before, it waited and succeeded).
    fetcher = make_fetcher(timeout_s=30.0, read_timeout_s=0.5)
    error = refused(fetcher, origin.url("/stall?s=3"))
    assert "timed out" in error.message and "0.5 s of silence" in error.message


def test_a_dripping_origin_is_cut_by_the_minimum_rate(origin: ImageOrigin) -> None:
    # One byte every 0.2 s never falls silent for long, so only the average rate catches it.
    fetcher = make_fetcher(timeout_s=120.0, read_timeout_s=5.0, min_bytes_per_s=100, rate_grace_s=0.5)
    assert "arrived too slowly" in refused(fetcher, origin.url("/drip")).message


def test_a_full_download_pool_answers_busy_at_once(origin: ImageOrigin) -> None:
    fetcher = make_fetcher(max_concurrent=1, slot_wait_s=0.1, timeout_s=10.0)
    before = origin.hits.get("/stall", 0)
    holder = threading.Thread(target=lambda: fetcher.fetch_bytes(origin.url("/stall?s=2"), FIELD))
    holder.start()
    try:
        deadline = time.monotonic() + 10
        while origin.hits.get("/stall", 0) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        # The one slot is held by a stalled download: a second one is refused now, not after timeout_s
        # (before, it waited for the slot and then downloaded).
        with pytest.raises(FetchBusy) as info:
            fetcher.fetch_bytes(origin.url("/red.png"), FIELD)
        assert holder.is_alive()  # refused while the other download was still stalled
        assert info.value.status == 429 and info.value.code == "fetch_busy"
        assert info.value.headers.get("Retry-After") == "1"
    finally:
        holder.join()


def _png(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **save)
    return buf.getvalue()


def test_data_urls_take_a_decode_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    import server.fetch as fetch_module

    active, peak, lock = [0], [0], threading.Lock()
    real = fetch_module.decode_image

    def counting(*args: object, **kwargs: object) -> Image.Image:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.1)
            return real(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(fetch_module, "decode_image", counting)
    fetcher = make_fetcher(max_concurrent_decodes=1, timeout_s=30.0)
    url = "data:image/png;base64," + base64.b64encode(_png(Image.new("RGB", (8, 8)))).decode()
    threads = [threading.Thread(target=fetcher.fetch_image, args=(url, FIELD)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1  # six data: URLs decoded one at a time (before: all six at once, no slot)


def test_decode_memory_is_checked_before_decoding() -> None:
    data = palette_bomb(3000)  # 9 MP: under max_pixels, but ~45 MB to decode
    assert len(data) < 20_000
    fetcher = make_fetcher(max_pixels=16_000_000, max_decode_bytes=30_000_000)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    error = refused(fetcher, url)
    assert error.code == "invalid_image" and "decoding it would take" in error.message
    assert make_fetcher(max_pixels=16_000_000, max_decode_bytes=60_000_000).fetch_image(url, FIELD).size == (
        3000, 3000)


# The peak RSS of this process alone (VmHWM; ru_maxrss would carry the parent's peak across exec).
DECODE_PEAK = r"""
import io, sys
from PIL import Image
sys.path.insert(0, sys.argv[1])
from server.images import decode_image

def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

data = sys.stdin.buffer.read()
Image.open(io.BytesIO(data)).load()  # Pillow's decoders and tables paged in before measuring
before = peak()
image = decode_image(data, "image_url", 1 << 30)
print(image.mode, image.size[0], image.size[1], peak() - before)
"""


def test_transparency_is_composited_without_full_size_rgba_copies() -> None:
    import subprocess
    import sys

    from .conftest import REPO

    side = 3000  # 9 MP; the source takes 1 byte a pixel, the RGB result 4 (as Pillow stores it)
    proc = subprocess.run([sys.executable, "-c", DECODE_PEAK, str(REPO)], input=palette_bomb(side),
                          capture_output=True, timeout=120, check=True)
    mode, width, height, grown = proc.stdout.decode().split()
    assert (mode, int(width), int(height)) == ("RGB", side, side)
    # Source + result + one band, plus slack for the allocator; the old path took ~17 bytes a pixel
    # (an RGBA copy, an RGBA background, their composite, then RGB).
    assert int(grown) < side * side * (1 + 4) + 40_000_000, int(grown) / (side * side)


def test_default_pixel_cap_fits_the_largest_output() -> None:
    from server.config import LimitSettings

    # Four times the largest output a request may ask for, no more (a 12 MP phone photo still fits).
    assert 12_000_000 < FetchSettings().max_pixels <= 4 * LimitSettings().max_pixels
