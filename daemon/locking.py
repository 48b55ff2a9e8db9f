"""Locks that the kernel releases with the process, so a killed holder never blocks the next start."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

from daemon.folders import LOCK_NAME, RunPaths


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
                    raise AlreadyLocked(
                        f"another run is already using {folder}: {_holder(path)} (lock {path})"
                    )
                self._handles.append(handle)
                # Who holds it, for a refused start to name; the lock itself is the flock, so a
                # full disk that cannot take these few bytes does not stop the run.
                with contextlib.suppress(OSError):
                    os.ftruncate(handle.fileno(), 0)
                    os.write(handle.fileno(), f"{holder}\n".encode())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            with contextlib.suppress(OSError):
                handle.close()


def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def held_here(path: Path) -> bool:
    """Whether the lock file at `path` names a holder alive on this machine (for readers, which
    never take the lock themselves: a reader holding it for a moment would refuse a run's start)."""
    words = _holder(path).split()
    try:
        pid = int(words[words.index("pid") + 1])
        host = words[words.index("on") + 1]
        if host != socket.gethostname():
            return True  # another machine's: it cannot be checked from here, so trust it
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


class AlreadyRunning(Exception):
    """Another run or the service holds the output (or state) folder; the message names it."""


def lock_run(paths: RunPaths, who: str) -> FolderLocks:
    """The output folder's lock (and the state folder's, where that is elsewhere), held by one run
    or service at a time whatever run.state_dir says. Raises AlreadyRunning naming the holder."""
    paths.output_dir.mkdir(parents=True, exist_ok=True)
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        return FolderLocks([paths.output_dir, paths.state_dir], LOCK_NAME, who)
    except AlreadyLocked as exc:
        raise AlreadyRunning(str(exc)) from None
