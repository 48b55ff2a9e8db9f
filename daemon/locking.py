"""Locks that the kernel releases with the process, so a killed holder never blocks the next start."""

from __future__ import annotations

import fcntl
import os
import socket
import time
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


class AlreadyLocked(Exception):
    """Another run or service holds a folder; the message names the folder and the holder."""


class FolderLocks:
    """One lock per folder a run writes its results and state into, held until `close`.

    The lock file says who holds it (run or service, pid, host, since when), so a refused start
    can name the holder; it writes nothing anywhere else, the holder's logs included."""

    def __init__(self, folders: list[Path], lock_name: str, who: str) -> None:
        self._handles: list[IO[str]] = []
        holder = (
            f"{who} pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        )
        try:
            for folder in dict.fromkeys(folders):  # one lock per folder, in order, once each
                path = folder / lock_name
                handle = try_exclusive_lock(path)
                if handle is None:
                    raise AlreadyLocked(f"another run is already using {folder}: {_holder(path)} (lock {path})")
                handle.seek(0)
                handle.truncate()
                handle.write(holder + "\n")
                handle.flush()
                self._handles.append(handle)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.close()


def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"
