"""Logging set-up: ``server.log_format: text`` (human-readable lines) or ``json`` (one object per line).

A log call may pass structured fields with ``extra={"fields": {...}}``: the JSON format puts them at the top
level of the line's object (the worker's ``job done`` line carries id, model, size, steps, n, batch and
stage timings this way); the text format prints the message alone, which already reads ``key=value``.

A few library lines that are known to be harmless are dropped, each matched by its logger and message
(``HARMLESS``); every other warning of those libraries still shows.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# (logger, message pattern) of lines that say nothing actionable on a normal start:
# - transformers 5 (transformers/utils/import_utils.py): without torchvision, `XImageProcessor` resolves to
#   the PIL `XImageProcessorPil` (transformers' backward-compatible backend; Darkroom's image safety checkers
#   and the Redux prior's SigLIP take PIL images anyway).
# - diffusers 0.42 (diffusers/models/modeling_utils.py, ModelMixin.to): "modules that should be kept in
#   float32: []" when the list is empty, i.e. no module needs float32. A non-empty list still shows.
HARMLESS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("transformers.utils.import_utils",
     re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\); "
                r"falling back to `\w+ImageProcessorPil`")),
    ("diffusers.models.modeling_utils",
     re.compile(r"There are modules in \w+ that should be kept in float32: \[\]\.")),
)


class DropHarmless(logging.Filter):
    """A logger filter dropping the records whose message matches ``pattern`` (and only those)."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "message", **fields, "exception"?} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for name, value in fields.items():
                entry.setdefault(name, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # On the emitting loggers themselves: the libraries print through their own handlers, not the root's.
    for name, pattern in HARMLESS:
        emitter = logging.getLogger(name)
        if not any(isinstance(f, DropHarmless) and f.pattern is pattern for f in emitter.filters):
            emitter.addFilter(DropHarmless(pattern))
