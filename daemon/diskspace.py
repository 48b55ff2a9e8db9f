"""Free-space floors: downloads wait while the temp or output file system is nearly full."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

MB = 1024 * 1024

# (path) -> free bytes; shutil.disk_usage in production.
FreeBytes = Callable[[Path], int]

# A folder that filled up is used again once this much more is free than when it filled (or a
# twentieth of its file system, when that is less): room for at least a clip or two, so one freed
# megabyte does not start a download that cannot be written.
HOLD_MARGIN_BYTES = 64 * MB
HOLD_MARGIN_MIN_BYTES = 256 * 1024


def free_bytes(path: Path) -> int:
    """Free bytes (for an unprivileged user) on the file system that holds `path` or would hold it."""
    probe = path
    # The folder may not exist yet (temp folders are made per worker); its nearest parent tells.
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


@dataclass(frozen=True)
class Floor:
    name: str  # "temp" or "output", for the log line
    path: Path
    min_free_mb: float


@dataclass(frozen=True)
class Hold:
    """A folder whose file system filled up (ENOSPC) while we wrote into it, whatever the floors say."""

    path: Path
    reason: str
    resume_free_bytes: int  # work resumes once this much is free


def hold_for(path: Path, reason: str, free_bytes_then: int | None = None) -> Hold:
    """A hold on `path`, released once its file system has a margin more free than when the write
    failed (`free_bytes_then`, measured by the writer; now, when it could not say)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    margin = max(HOLD_MARGIN_MIN_BYTES, min(HOLD_MARGIN_BYTES, usage.total // 20))
    free_then = usage.free if free_bytes_then is None else free_bytes_then
    return Hold(path, reason, free_then + margin)


class DiskGate:
    """Says whether a download may start now; logs once when it starts waiting and once when it stops.

    While below a floor, the file systems are looked at again only every `recheck_seconds`, so a
    worker asking for work every fraction of a second costs nothing.
    """

    def __init__(self, floors: list[Floor], recheck_seconds: float, free: FreeBytes = free_bytes) -> None:
        self.floors = [floor for floor in floors if floor.min_free_mb > 0]
        self.recheck_seconds = recheck_seconds
        self._free = free
        self.reason: str | None = None  # why downloads wait now; None when they do not
        self._checked_at = float("-inf")
        self.holds: dict[Path, Hold] = {}

    def hold(self, hold: Hold) -> None:
        """Work waits until the held folder has room again (a write there failed: disk full)."""
        self.holds[hold.path] = hold
        self._checked_at = float("-inf")  # say so at the next look, not a recheck period later

    def _low(self) -> str | None:
        problems = []
        for path, hold in list(self.holds.items()):
            try:
                free = self._free(path)
            except OSError:
                free = 0
            if free >= hold.resume_free_bytes:
                del self.holds[path]
                logger.info(f"{path}: {free / MB:.1f} MB free again; work that writes there resumes")
            else:
                problems.append(
                    f"{hold.reason}; waiting for {hold.resume_free_bytes / MB:.1f} MB free "
                    f"(now {free / MB:.1f} MB)"
                )
        for floor in self.floors:
            try:
                free_mb = self._free(floor.path) / MB
            except OSError as exc:
                problems.append(f"cannot read free space of {floor.name} folder {floor.path}: {exc}")
                continue
            if free_mb < floor.min_free_mb:
                problems.append(
                    f"{floor.name} folder {floor.path} has {free_mb:.0f} MB free, "
                    f"below the floor of {floor.min_free_mb:g} MB"
                )
        return "; ".join(problems) or None

    def blocked(self) -> str | None:
        """The reason downloads must wait, or None when one may start."""
        if not self.floors and not self.holds:
            self.reason = None
            return None
        now = time.monotonic()
        if self.reason is not None and now - self._checked_at < self.recheck_seconds:
            return self.reason
        self._checked_at = now
        reason = self._low()
        if reason and self.reason is None:
            logger.warning(f"downloads paused: {reason}; waiting for free space")
        elif reason is None and self.reason is not None:
            logger.info("downloads resumed: free space is above the floors again")
        self.reason = reason
        return reason
