"""Starting and stopping Darkroom processes on loopback ports, for the test suite and the benchmarks.

Both run the real ``python -m server ...`` commands as subprocesses; these are the few steps they share.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Sequence

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_ready(
    url: str, procs: Sequence[subprocess.Popen[bytes]], timeout_s: float, logs: Callable[[], str]
) -> None:
    """Poll ``url`` (a ``/ready``) until it answers 200; raise with the logs if a process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        exited = [p for p in procs if p.poll() is not None]
        if exited:
            raise RuntimeError(f"process exited with {exited[0].returncode} before {url} was ready:\n{logs()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s}s:\n{logs()}")


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    """SIGTERM (the graceful path), then SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
