"""Locks that the kernel releases with the process, so a killed holder never blocks the next start."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO


def try_exclusive_lock(path: Path) -> IO[str] | None:
    """Hold an exclusive lock on `path` for as long as the returned file stays open.

    Returns None when another process holds it.
    """
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle
