"""A safetensors file's header, read strictly, and its float values checked for NaN and infinity; no torch.

The `format <https://github.com/huggingface/safetensors#format>`_: an 8-byte little-endian length, then that
many bytes of JSON, ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the tensors' bytes back to back in offset order. Anything else a header can hold (offsets that are
strings, null, floats, 5000-digit numbers, deep nesting, duplicate names, overlapping or missing bytes, more
objects than a limit) is a ``FormatError``, never another exception. Used for LoRA files
(server/lora_format.py), by both processes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Bytes per element of each safetensors dtype a LoRA may hold (sub-byte dtypes are no LoRA's).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}
# A float is NaN or infinite when its exponent bits are all ones (IEEE 754; bfloat16 likewise): per float
# dtype, the unsigned integer of its width and the exponent mask. float8 e4m3 (fn) has no infinity and one
# NaN pattern per sign, whose bits under 0x7F are all ones.
NON_FINITE_BITS = {
    "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000), "F8_E5M2": ("u1", 0x7C), "F8_E4M3": ("u1", 0x7F),
}
_MAX_DIM = 2**53  # larger shape entries or offsets are no real file's


class FormatError(ValueError):
    """A LoRA file is malformed or holds weights that cannot be applied; ``message`` says which, without the
    file's name (the caller adds it). ``code``: ``invalid_lora_file`` (malformed) or ``unsupported_lora``."""

    def __init__(self, message: str, code: str = "invalid_lora_file") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# -- the header ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section (after the header)
    end: int


@dataclass
class Header:
    """A checked safetensors header: ``length`` bytes of JSON after the 8-byte prefix, then ``data_bytes``."""

    length: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    # every tensor name classified (server/lora_format.py ``Inventory``), once ``check_header`` has run
    inventory: Any = None

    @property
    def data_bytes(self) -> int:
        return max((t.end for t in self.tensors.values()), default=0)

    @property
    def file_bytes(self) -> int:
        return 8 + self.length + self.data_bytes


NOT_SAFETENSORS = "is not a safetensors file"


@dataclass(frozen=True)
class Limits:
    """What a header may cost to read: its length in bytes, its JSON objects (one per tensor, plus
    ``__metadata__``: bounds the memory its parse takes, about 1 KB an object), and the file size it declares
    (None: any)."""

    header_bytes: int = 16_000_000
    tensors: int = 20_000
    file_bytes: int | None = None


def header_length(prefix: bytes, max_header_bytes: int) -> int:
    """The header length an 8-byte prefix declares; ``FormatError`` unless 2 <= length <= max_header_bytes."""
    if len(prefix) < 8:
        raise FormatError(NOT_SAFETENSORS)
    length = int.from_bytes(prefix[:8], "little")
    if length < 2:
        raise FormatError(NOT_SAFETENSORS)
    if length > max_header_bytes:
        raise FormatError(f"{NOT_SAFETENSORS} (its first 8 bytes declare a header of {length} bytes; at most "
                          f"{max_header_bytes} are read)")
    return length


def _too_many(max_tensors: int) -> FormatError:
    return FormatError(f"has more tensors than the {max_tensors} this server reads in one LoRA")


class _Objects:
    """json ``object_pairs_hook``: refuses duplicate names, and stops the parse after as many objects as
    ``max_tensors`` tensors take (one each, the top level and ``__metadata__``)."""

    def __init__(self, max_tensors: int) -> None:
        self.max_tensors = max_tensors
        self.left = max_tensors + 2

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        self.left -= 1
        if self.left < 0:
            raise _too_many(self.max_tensors)
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise FormatError(f"{NOT_SAFETENSORS}: its header names '{cut(key)}' twice")
            out[key] = value
        return out


def _count(value: Any) -> int | None:
    """A JSON integer in a sane range, else None (floats, bools, strings, null and huge numbers are not)."""
    if type(value) is int and 0 <= value <= _MAX_DIM:
        return value
    return None


def parse_header(raw: bytes, max_tensors: int = Limits.tensors) -> Header:
    """A safetensors header (the JSON after the 8-byte prefix), checked as the safetensors library checks it.

    Raises only ``FormatError``: for invalid UTF-8 or JSON, nesting too deep for the parser, numbers Python
    will not convert, a top level that is not an object, a tensor without a known dtype, a shape of
    non-negative integers and two integer offsets, a byte size that does not match its shape, tensors whose
    bytes overlap or leave gaps, ``__metadata__`` that is not string to string, or no tensors at all.
    """
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_Objects(max_tensors))
    except FormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError, OverflowError):
        # ValueError covers JSONDecodeError and integers over Python's digit limit.
        raise FormatError(f"{NOT_SAFETENSORS}: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise FormatError(f"{NOT_SAFETENSORS}: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{NOT_SAFETENSORS}: its __metadata__ is not a map of strings to strings")
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        tensors[name] = _entry(name, info)
    if not tensors:
        raise FormatError("is a safetensors file without tensors")
    if len(tensors) > max_tensors:
        raise _too_many(max_tensors)
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            raise FormatError(f"{NOT_SAFETENSORS}: the bytes of tensor '{cut(name)}' overlap another's or "
                              "leave a gap")
        position = entry.end
    return Header(length=len(raw), tensors=tensors, metadata=dict(metadata))


def _entry(name: str, info: Any) -> TensorEntry:
    bad = FormatError(f"{NOT_SAFETENSORS}: tensor '{cut(name)}' has no valid dtype, shape and data_offsets")
    if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
        raise bad
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BYTES or not isinstance(shape, list) or not isinstance(offsets, list) \
            or len(offsets) != 2 or len(shape) > 8:
        raise bad
    dims = [_count(d) for d in shape]
    begin, end = _count(offsets[0]), _count(offsets[1])
    if any(d is None for d in dims) or begin is None or end is None or end < begin:
        raise bad
    if math.prod(dims) * DTYPE_BYTES[dtype] != end - begin:  # type: ignore[arg-type]
        raise FormatError(f"{NOT_SAFETENSORS}: tensor '{cut(name)}' has {end - begin} bytes for shape "
                          f"{shape} of {dtype}")
    return TensorEntry(dtype, tuple(dims), begin, end)  # type: ignore[arg-type]


# -- the values ------------------------------------------------------------------------------------------


def has_non_finite(data: Any, dtype: str) -> bool:
    """Whether a buffer of ``dtype`` elements (a safetensors float dtype) holds a NaN or an infinity."""
    view, mask = NON_FINITE_BITS[dtype]
    bits = np.frombuffer(data, dtype=view)
    return bits.size > 0 and int(np.bitwise_and(bits, mask).max()) == mask


def check_finite(path: Path, header: Header, chunk_bytes: int = 1 << 23) -> None:
    """``FormatError`` naming the float tensors of a file that hold NaN or infinite values. Reads the file a
    chunk at a time (memory: one chunk), from bit patterns (no torch; ~0.1 s per 300 MB here)."""
    bad = []
    with path.open("rb") as fh:
        for name, entry in header.tensors.items():
            if entry.dtype not in NON_FINITE_BITS:
                continue
            size = np.dtype(NON_FINITE_BITS[entry.dtype][0]).itemsize
            fh.seek(8 + header.length + entry.begin)
            left = entry.end - entry.begin
            while left > 0:
                data = fh.read(min(chunk_bytes - chunk_bytes % size, left))
                if not data:
                    break
                left -= len(data)
                if has_non_finite(data, entry.dtype):
                    bad.append(name)
                    break
    if bad:
        raise FormatError(non_finite_message(bad))


def non_finite_message(names: list[str], when: str = "") -> str:
    shown = ", ".join(cut(n, 80) for n in sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
    return f"has {len(names)} weights with NaN or infinite values{when} ({shown})"


def cut(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
