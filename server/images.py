"""Image bytes in and out, and the few geometric operations on them: pure Pillow, no torch, no network.

Both processes import it: the API decodes the images a request names (``decode_image``, through the guarded
fetcher) and sizes them for their use (``fit_cover``, ``fit_within``, ``fit_area``); the engine sets Kontext
inputs side by side (``stitch``); the worker encodes finished images (``encode_image``).
"""

from __future__ import annotations

import io
import logging
import struct

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FetchError

log = logging.getLogger(__name__)

# Formats a client may send; decoders for anything else (TIFF, PSD, EPS, ...) are never reached.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # JPEG covers MPO (phone photos)


# -- decoding -----------------------------------------------------------------------------------------

# Bytes per pixel as Pillow stores a mode (it keeps RGB in 32 bits, like RGBA); modes not named take 4.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# Rows of an image with transparency are composited over white a band of about this many pixels at a time.
_BAND_PIXELS = 1 << 20


def stored_bytes(mode: str, width: int, height: int) -> int:
    """Bytes Pillow holds for a ``width`` x ``height`` image of ``mode``."""
    return width * height * _STORED_BYTES.get(mode, 4)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        image.mode in ("P", "RGB", "L") and "transparency" in image.info
    )


def decode_cost(image: Image.Image) -> int:
    """Peak bytes decoding an opened (not yet loaded) image into RGB takes: the decoded pixels, each copy
    ``_to_rgb`` makes on the way (the RGB result; 16-bit greyscale passes through 32-bit and 8-bit copies;
    transparency is composited a band at a time, so only the band's copies add), and one more copy of the
    decoded pixels when EXIF orientation turns them."""
    width, height = image.size
    cost = stored_bytes(image.mode, width, height)
    if image.mode != "RGB":
        cost += stored_bytes("RGB", width, height)
    if image.mode.startswith("I;16") or image.mode == "I":
        cost += stored_bytes("I", width, height) + stored_bytes("L", width, height)
    if _has_alpha(image):
        cost += 3 * stored_bytes("RGBA", width, min(height, max(1, _BAND_PIXELS // width)))
    if image.getexif().get(0x0112, 1) not in (0, 1):  # rotated or mirrored: a second copy
        cost += stored_bytes(image.mode, width, height)
    return cost


def decode_image(data: bytes, field: str, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Bytes → an RGB image, refusing non-images, unknown formats, bombs and corrupt files.

    From the header alone, before any pixel is decoded: at most ``max_pixels`` pixels, and (``max_bytes``)
    at most that much memory to decode and convert (``decode_cost``). Anything Pillow raises on hostile bytes
    becomes a ``FetchError`` (400) naming ``field``.
    """
    try:
        return _decode(data, field, max_pixels, max_bytes)
    except FetchError:
        raise
    except Image.DecompressionBombError:
        raise FetchError(f"'{field}' is too large an image; at most {max_pixels} pixels are accepted",
                         param=field, code="invalid_image") from None
    except Exception as exc:  # noqa: BLE001 - a parser of client bytes: whatever it raises is a bad image
        log.info("image refused field=%s error=%s", field, type(exc).__name__)
        raise FetchError(
            f"'{field}' could not be decoded: the image is truncated or corrupt",
            param=field, code="invalid_image",
        ) from None


def _decode(data: bytes, field: str, max_pixels: int, max_bytes: int | None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, EOFError):
        raise FetchError(
            f"'{field}' is not an image in a supported format ({', '.join(IMAGE_FORMATS)})",
            param=field, code="invalid_image",
        ) from None
    width, height = image.size
    # From the header alone: nothing has been decoded yet.
    if width < 1 or height < 1 or width * height > max_pixels:
        image.close()
        raise FetchError(
            f"'{field}' is {width}x{height} pixels; at most {max_pixels} pixels are accepted",
            param=field, code="invalid_image",
        )
    if max_bytes is not None:
        cost = decode_cost(image)
        if cost > max_bytes:
            image.close()
            raise FetchError(
                f"'{field}' is a {width}x{height} {image.mode} image; decoding it would take "
                f"{cost / 1e6:.0f} MB, at most {max_bytes / 1e6:.0f} MB are allowed",
                param=field, code="invalid_image",
            )
    if getattr(image, "is_animated", False):
        image.seek(0)  # animated GIF/WebP/PNG: the first frame
    image.load()
    image = ImageOps.exif_transpose(image) or image
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode → RGB; transparency is composited over white."""
    if _has_alpha(image):
        return _over_white(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB") if image.mode != "RGB" else image


def _over_white(image: Image.Image) -> Image.Image:
    """An image with alpha (or a transparent colour) composited over white, as RGB: a band of rows at a time,
    so the only full-size copy besides the source is the result (no RGBA copy, no RGBA background)."""
    out = Image.new("RGB", image.size, (255, 255, 255))
    band = max(1, _BAND_PIXELS // image.width)
    for top in range(0, image.height, band):
        box = (0, top, image.width, min(image.height, top + band))
        piece = image.crop(box).convert("RGBA")
        # paste with a mask blends: out = out * (1 - alpha) + piece * alpha, i.e. "over" white.
        out.paste(piece.convert("RGB"), box[:2], piece.getchannel("A"))
    return out


# -- sizing ---------------------------------------------------------------------------------------------


def fit_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover ``width`` x ``height``, then crop the centre to exactly that size."""
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    resized = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w - width) // 2, (h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def fit_within(image: Image.Image, side: int) -> Image.Image:
    if max(image.size) <= side:
        return image
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def fit_area(image: Image.Image, max_pixels: int, multiple: int = 1) -> Image.Image:
    """Scale down (aspect ratio kept) to at most ``max_pixels`` pixels, then crop the centre so each side is a
    multiple of ``multiple`` (FLUX.2 references: 16, a token per 16 x 16 pixels). Never scales up."""
    if image.width * image.height > max_pixels:
        scale = (max_pixels / (image.width * image.height)) ** 0.5
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    width, height = image.width // multiple * multiple, image.height // multiple * multiple
    if (width, height) == image.size or not (width and height):
        return image
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def round_to_multiple(value: float, multiple: int) -> int:
    """``value`` to the nearest multiple of ``multiple``, at least ``multiple``."""
    return max(multiple, int(round(value / multiple)) * multiple)


def resize_to(image: Image.Image, width: int, height: int) -> Image.Image:
    """Exactly ``width`` x ``height``, no crop (the aspect ratio changes if the shapes differ)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)


def scale_to_area(image: Image.Image, area: int, multiple: int = 16) -> Image.Image:
    """Scaled up or down to about ``area`` pixels, aspect ratio kept (sides to the nearest ``multiple``); no
    crop (Kontext's input image at a requested size)."""
    scale = (area / (image.width * image.height)) ** 0.5
    return resize_to(image, round_to_multiple(image.width * scale, multiple),
                     round_to_multiple(image.height * scale, multiple))


def fit_height(image: Image.Image, height: int, multiple: int = 16) -> Image.Image:
    """Scaled to ``height``, the width by the aspect ratio (to the nearest ``multiple``); no crop."""
    return resize_to(image, round_to_multiple(image.width * height / image.height, multiple), height)


def stitch(images: list[Image.Image]) -> Image.Image:
    """Images of one height side by side, left to right (Kontext's input plus references)."""
    if len(images) == 1:
        return images[0]
    canvas = Image.new("RGB", (sum(i.width for i in images), images[0].height))
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width
    return canvas


# -- encoding -------------------------------------------------------------------------------------------


def encode_image(image: Image.Image, fmt: str, jpeg_quality: int = 90) -> bytes:
    """Real JPEG / PNG / WebP bytes for a decoded image."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=jpeg_quality)
    elif fmt == "png":
        image.save(buffer, format="PNG")
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=jpeg_quality)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buffer.getvalue()
