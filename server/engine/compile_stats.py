"""What torch.compile built in this process, and what it built after the worker became ready.

dynamo counts every graph it produces (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``, the
count ``TORCH_LOGS=recompiles`` explains); the count is process-wide, which is also the scope of compiled
code and of dynamo's recompile limit. A graph built after ``/ready`` means a request paid for a compile
(seconds to minutes on a GPU) because the warm-up did not cover its shape: ``recompiles_after_ready``
should stay 0, and is exported on ``/ready`` and ``/metrics``. Each such compile is also logged when it
starts (``compile after ready``), with torch's own reason under ``TORCH_LOGS=recompiles``.

``settings.fail_on_recompile`` (``engine.fail_on_recompile``) makes a compile after warm-up an error
instead (``torch.compiler.set_stance("fail_on_recompile")``): the request fails with a message naming
the cause rather than stalling its batch.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

RECOMPILE_REFUSED = "Detected recompile when torch.compile stance is 'fail_on_recompile'"


def graphs_compiled() -> int:
    """Graphs dynamo has produced in this process so far (0 if torch.compile never ran)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileCounter:
    """Graph counts of one worker's engine: at ready, and since."""

    def __init__(self) -> None:
        self._at_ready: int | None = None
        self._lock = threading.Lock()
        self.stance = "default"

    def mark_ready(self, fail_on_recompile: bool, compiled: bool) -> None:
        """Record the count at the end of warm-up; from now on every new graph is a recompile.

        With ``fail_on_recompile`` (and a compiled model) the process's compile stance becomes
        ``fail_on_recompile``, logged on one line with what it means for requests.
        """
        import torch
        from torch._dynamo.callback import on_compile_start

        with self._lock:
            first = self._at_ready is None
            self._at_ready = graphs_compiled()
        if first:
            on_compile_start(self._compile_started)
        if fail_on_recompile and compiled:
            torch.compiler.set_stance("fail_on_recompile")
            self.stance = "fail_on_recompile"
            log.info("compile stance after warm-up: fail_on_recompile (a request whose shape the warm-up did "
                     "not compile fails instead of compiling) graphs=%d", self._at_ready)

    def _compile_started(self, args: Any) -> None:
        if self._at_ready is not None:
            log.warning("compile after ready: a request brought a shape the warm-up did not compile "
                        "(compile_id=%s; TORCH_LOGS=recompiles gives the reason)",
                        getattr(args, "compile_id", "?"))

    def snapshot(self) -> dict[str, Any]:
        """``graphs`` (this process), ``recompiles_after_ready`` (0 before ready) and the ``stance``."""
        graphs = graphs_compiled()
        at_ready = self._at_ready
        return {"graphs": graphs, "recompiles_after_ready": 0 if at_ready is None else graphs - at_ready,
                "stance": self.stance}
