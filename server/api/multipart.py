"""A bounded ``multipart/form-data`` reader (``POST /v1/images/edits``), on python-multipart's push parser.

Starlette's ``request.form()`` bounds text fields but not file parts, part headers or the whole body; this
reader bounds all of them (``uploads:`` settings) while the body streams in, and keeps everything in memory
(never more than ``uploads.max_bytes``):

- the whole body: ``max_bytes`` (the declared ``Content-Length`` first, then counted) → 413;
- parts: at most ``max_parts`` → 400; each part's headers at most ``max_header_bytes`` → 400;
- one file: at most ``max_file_bytes`` (``fetch.max_bytes``, the limit of a fetched image) → 413 naming it;
  one text field: at most ``max_field_bytes`` → 413 naming it;
- names and text values must be UTF-8 (→ 400 naming the field); every malformed body is a 400.

``form_fields`` then turns the text fields into the JSON values openai meant: its multipart encoder
(``_qs.py``) writes numbers with ``str()``, booleans as ``true``/``false``, None as an empty string, lists
as repeated ``name[]`` and dicts as ``name[key]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..config import UploadSettings
from ..errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from ..fetch import declared_length

# Parts that are files whatever their Content-Disposition says: RFC 7578 §4.2 makes ``filename`` optional
# (curl -F 'image=<photo.png' sends none), and python-multipart drops an RFC 8187 ``filename*``.
FILE_FIELDS = ("image", "image[]", "mask")


@dataclass
class Part:
    """One part: a text field (``filename`` None) or a file, with its bytes."""

    name: str
    filename: str | None = None
    content_type: str | None = None
    data: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_parts: int
    max_file_bytes: int
    max_field_bytes: int
    max_header_bytes: int

    @classmethod
    def of(cls, uploads: UploadSettings, max_file_bytes: int) -> Limits:
        return cls(uploads.max_bytes, uploads.max_parts, max_file_bytes, uploads.max_field_bytes,
                   uploads.max_header_bytes)


def _decode(raw: bytes, what: str, param: str | None) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{what} is not valid UTF-8", param=param) from None
    if "\x00" in text:
        raise InvalidRequest(f"{what} must not contain NUL characters", param=param)
    return text


class _Reader:
    """The parser's callbacks: builds ``parts`` under ``limits``."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.parts: list[Part] = []
        self.current: Part | None = None
        self._header_bytes = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}

    def on_part_begin(self) -> None:
        if len(self.parts) >= self.limits.max_parts:
            raise InvalidRequest(f"the form has more than {self.limits.max_parts} parts")
        self._header_bytes = 0
        self._headers = {}

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            raise InvalidRequest(
                f"a form part's headers are longer than {self.limits.max_header_bytes} bytes")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise InvalidRequest("every form part needs 'Content-Disposition: form-data; name=...'")
        name = _decode(options[b"name"], "a form field name", None)
        filename = options.get(b"filename", b"" if name in FILE_FIELDS else None)
        ctype = self._headers.get(b"content-type")
        self.current = Part(
            name=name,
            filename=None if filename is None else _decode(filename, f"the file name of '{name}'", name),
            content_type=None if ctype is None else ctype.decode("latin-1").strip().lower(),
        )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.current
        assert part is not None
        part.data += data[start:end]
        most = self.limits.max_file_bytes if part.filename is not None else self.limits.max_field_bytes
        if len(part.data) > most:
            what = "file" if part.filename is not None else "field"
            raise PayloadTooLarge(f"the {what} '{part.name}' is larger than {most} bytes", param=part.name)

    def on_part_end(self) -> None:
        assert self.current is not None
        self.parts.append(self.current)
        self.current = None


def _boundary(request: Request) -> bytes:
    media, options = parse_options_header(request.headers.get("content-type", ""))
    if media != b"multipart/form-data":
        shown = ascii(media.decode("latin-1"))[1:-1][:100] or "none"
        raise UnsupportedMediaType(
            f"this endpoint takes 'Content-Type: multipart/form-data' (got {shown}), as openai's "
            "images.edit sends it")
    boundary = options.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 200:
        raise InvalidRequest("the multipart body has no usable boundary")
    return boundary


async def read_multipart(request: Request, limits: Limits) -> list[Part]:
    """Every part of a ``multipart/form-data`` body, under ``limits`` (see the module docstring)."""
    boundary = _boundary(request)
    declared = declared_length(request.headers)
    if declared is not None and declared > limits.max_bytes:
        raise PayloadTooLarge(f"request body is larger than {limits.max_bytes} bytes")
    reader = _Reader(limits)
    callbacks: Any = {name: getattr(reader, name) for name in (
        "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value",
        "on_header_end", "on_headers_finished")}
    try:
        parser = MultipartParser(boundary, callbacks, max_header_size=limits.max_header_bytes)
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_bytes:
                raise PayloadTooLarge(f"request body is larger than {limits.max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise InvalidRequest("the multipart body is malformed") from None
    if reader.current is not None or not reader.parts:
        raise InvalidRequest("the multipart body is truncated or empty")
    return reader.parts


# -- text fields → JSON values ------------------------------------------------------------------------

INTEGERS = frozenset({"n", "steps", "seed", "width", "height", "output_compression", "partial_images",
                      "frame_count", "frame_duration_ms"})
NUMBERS = frozenset({"guidance_scale", "scale"})
FLAGS = frozenset({"disable_safety_checker", "stream"})
_INTEGER = re.compile(r"-?[0-9]{1,30}")
_NUMBER = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?([eE][-+]?[0-9]{1,3})?")
_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")


def _scalar(name: str, text: str) -> Any:
    """A field's text as the JSON value openai serialised; unknown shapes stay text (the schema refuses)."""
    if name in INTEGERS and _INTEGER.fullmatch(text):
        return int(text)
    if name in NUMBERS and _NUMBER.fullmatch(text):
        return float(text)
    if name in FLAGS and text in ("true", "false"):
        return text == "true"
    return text


def _container(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.setdefault(name, kind())
    if not isinstance(value, kind):
        raise InvalidRequest(f"the field '{name}' mixes shapes", param=name)
    return value


def form_fields(parts: list[Part]) -> dict[str, Any]:
    """The text parts as a JSON-like body: ``name`` → value, ``name[]`` → list, ``name[][key]`` → list
    of objects (a repeated key starts the next object), ``name[key]`` → object. Empty values are openai's None
    and are left out."""
    body: dict[str, Any] = {}
    for part in parts:
        if part.filename is not None:
            continue
        text = _decode(bytes(part.data), f"the field '{part.name}'", part.name)
        match = _KEY.fullmatch(part.name)
        if match is None:
            raise InvalidRequest(f"the form field name {ascii(part.name)} is malformed")
        name, keys = match[1], re.findall(r"\[([^\[\]]*)\]", match[2])
        if text == "" and not keys:
            continue
        if not keys:
            if name in body:
                raise InvalidRequest(f"the field '{name}' is given twice", param=name)
            body[name] = _scalar(name, text)
        elif keys == [""]:
            _container(body, name, list).append(text)
        elif keys[0] == "" and len(keys) == 2:
            items = _container(body, name, list)
            if items and not isinstance(items[-1], dict):
                raise InvalidRequest(f"the field '{name}' mixes shapes", param=name)
            if not items or keys[1] in items[-1]:
                items.append({})
            items[-1][keys[1]] = _scalar(keys[1], text)
        elif len(keys) == 1:
            _container(body, name, dict)[keys[0]] = text
        else:
            raise InvalidRequest(f"the form field name {ascii(part.name)} is nested too deep", param=name)
    return body
