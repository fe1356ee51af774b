"""What kind of failure a pipeline call raised, so the worker answers it by its kind (without importing
torch).

- ``oom``: the device ran out of memory (``torch.OutOfMemoryError``, alias ``torch.cuda.OutOfMemoryError``;
  older builds raise a ``RuntimeError`` saying "CUDA out of memory"; on the CPU, ``MemoryError`` or the
  allocator's "can't allocate memory"). The worker frees the cache, splits the
  batch and retries at half size; a request that does not fit alone is a 400 ``too_large_for_device``.
- ``sticky``: the CUDA context is broken for good (an illegal address, an uncorrectable ECC error, a
  device-side assert, a launch failure): every later call on that device fails too. The worker is marked not
  ready; a worker process (server/worker/children.py) exits so its parent starts a fresh one.
- ``other``: anything else (a bad input reaching a tokenizer, a bug). A batch of several jobs is re-run one
  job at a time, so only the job that raises it fails.

Torch raises ``torch.AcceleratorError`` (torch >= 2.8) or a ``RuntimeError`` whose message carries the CUDA
error string (``c10/cuda/CUDAException.h``); those strings are matched here.
"""

from __future__ import annotations

import enum


class Fault(enum.Enum):
    OOM = "oom"
    STICKY = "sticky"
    OTHER = "other"


# CUDA error strings (cudaGetErrorString) after which the context cannot be used again.
_STICKY = (
    "illegal memory access",
    "an illegal instruction",
    "misaligned address",
    "uncorrectable ecc error",
    "device-side assert triggered",
    "unspecified launch failure",
    "hardware stack error",
    "cuda error: launch failed",
    "gpu has fallen off the bus",
)


def classify(exc: BaseException) -> Fault:
    """The kind of ``exc``, raised by a pipeline call."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    message = str(exc).lower()
    if names & {"OutOfMemoryError", "MemoryError"} or "out of memory" in message \
            or "can't allocate memory" in message:  # the CPU allocator's words
        return Fault.OOM
    if any(text in message for text in _STICKY):
        return Fault.STICKY
    return Fault.OTHER
