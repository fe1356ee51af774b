"""Advisory file locks (``flock``) that hold between threads and between processes sharing a folder.

Used by the LoRA disk cache (server/loras.py): a file in use is pinned with a shared lock that eviction must
take exclusively, and a download holds an exclusive lock so processes sharing the folder fetch a file once.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path


def locked(path: Path, *, exclusive: bool, wait_s: float | None, create: bool = True) -> int | None:
    """An open descriptor of ``path`` holding ``flock`` (shared or exclusive), or None if that was not had
    within ``wait_s`` seconds (0: one try; None: wait as long as it takes), or if ``create`` is false and
    the file does not exist. Close the descriptor to release.

    flock locks belong to an open file, so they hold between threads of one process as between processes.
    Whoever removes a lock file does it while holding it exclusively; a waiter that then gets the removed
    file's lock sees that the path no longer names it and tries again on the new one.
    """
    deadline = None if wait_s is None else time.monotonic() + wait_s
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    while True:
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return None
        try:
            got = _flock(fd, mode, deadline)
            if got and _names(path, fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if not got:
            return None


def _flock(fd: int, mode: int, deadline: float | None) -> bool:
    if deadline is None:
        fcntl.flock(fd, mode)
        return True
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the open file ``fd``."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
