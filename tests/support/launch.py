"""Starting and stopping Darkroom processes (and a redis-server) on loopback ports, for the test suite and the
benchmarks.

Both run the real ``python -m server ...`` commands as subprocesses; these are the few steps they share.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

REDIS_SERVER = shutil.which("redis-server")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = 60.0,
               interval_s: float = 0.05) -> Any:
    """Poll ``condition`` every ``interval_s`` seconds until it returns something true, and return that;
    fail the test naming ``what`` after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)
    return value


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


class RedisProcess:
    """A throw-away ``redis-server`` on a free loopback port: no persistence, its files in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on PATH")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + timeout_s
        while not self._pings(client):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")
            time.sleep(0.05)
        return self

    @staticmethod
    def _pings(client: Any) -> bool:
        import redis

        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def client(self) -> Any:
        """A ``redis.Redis`` client of this server."""
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class SilentRedis:
    """A TCP listener on loopback that accepts connections, reads what they send, and never answers."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._swallow, args=(conn,), daemon=True).start()

    @staticmethod
    def _swallow(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for conn in self._conns:
            conn.close()
