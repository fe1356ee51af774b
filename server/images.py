"""Image bytes in and out, and the few geometric operations on them: pure Pillow, no torch, no network.

Both processes import it: the API decodes the images a request names (``decode_image``, through the guarded
fetcher) and sizes them for their use (``fit_cover``, ``fit_within``, ``fit_area``); the engine sets Kontext
inputs side by side (``stitch``); the worker encodes finished images (``encode_image``).
"""

from __future__ import annotations

import io
import struct

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FetchError

# Formats a client may send; decoders for anything else (TIFF, PSD, EPS, ...) are never reached.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # JPEG covers MPO (phone photos)


# -- decoding -----------------------------------------------------------------------------------------


def decode_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Bytes → an RGB image, refusing non-images, unknown formats, bombs and corrupt files."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise FetchError(f"'{field}' is too large an image; at most {max_pixels} pixels are accepted",
                         param=field, code="invalid_image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
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
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)  # animated GIF/WebP/PNG: the first frame
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return _to_rgb(image)
    except Image.DecompressionBombError:
        raise FetchError(f"'{field}' is too large an image; at most {max_pixels} pixels are accepted",
                         param=field, code="invalid_image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, ZeroDivisionError):
        raise FetchError(
            f"'{field}' could not be decoded: the image is truncated or corrupt",
            param=field, code="invalid_image",
        ) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode → RGB; transparency is composited over white."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        image.mode in ("RGB", "L") and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB") if image.mode != "RGB" else image


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
