"""The strict field types every request schema is built from: one rule per kind of value, for every field.

- ``Text``: a JSON string, and nothing else (no number or boolean is turned into text). It must be valid
  Unicode with no NUL: a lone surrogate (JSON allows ``"\\ud800"``; it is no character) or a NUL would reach a
  tokenizer, a URL parser, a log line or a JSON answer and fail there, in the worker or for a whole batch.
- ``Choice[Literal[...]]``: one of fixed texts, checked as ``Text`` first.
- ``Url``: ``Text`` that is not empty (an empty URL is a mistake, never "no URL": send null or leave it out).
- ``Number``: a JSON number (an integer is a number; a string or a boolean is not); finite.
- ``Integer``: a JSON integer (not ``4.0``, not ``"4"``, not ``true``).
- ``Flag``: ``true`` or ``false`` only (not ``"false"``, not ``0``).

What the official SDKs send fits these: together 1.x and 3.x and openai serialise Python ints, floats, bools
and strings to the JSON types above (together 1.x coerces its own typed arguments — ``seed``, ``n``,
``width``, ``height`` — to ints client-side). Multipart bodies (``POST /v1/images/edits``) carry only text;
server/api/multipart.py turns their numeric and boolean fields into JSON values first, as openai writes them.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, Strict

T = TypeVar("T")


def text_problem(value: str) -> str | None:
    """Why ``value`` is not acceptable text (a lone surrogate or a NUL), or None when it is."""
    if "\x00" in value:
        return f"must not contain NUL characters (at position {value.index(chr(0))})"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"is not valid Unicode: it holds a lone surrogate \\u{ord(value[exc.start]):04x} at position "
                f"{exc.start}")
    return None


def _valid_text(value: object) -> object:
    """Runs before pydantic's own string check (which refuses a surrogate inside a string with a vaguer
    message); anything but a string is left to the type's own check."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem is not None:
            raise ValueError(problem)
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty (leave the field out, or send null, for none)")
    return value


Text = Annotated[str, Strict(), BeforeValidator(_valid_text)]
Url = Annotated[str, Strict(), BeforeValidator(_valid_text), AfterValidator(_non_empty)]
# A text field with a fixed set of values: Choice[Literal["a", "b"]].
Choice = Annotated[T, BeforeValidator(_valid_text)]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Integer = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]
