"""What can go wrong, in one vocabulary: every failure has a scope and a kind.

The scope says what the failure belongs to: one clip, one URL, a whole site, a folder's disk, or
the run. The kind says what follows from it:

- PERMANENT: this item can never succeed (a clip past the end of its source, a removed video). It
  is written down as failed and not tried again (until --retry-failed).
- TRANSIENT: it may succeed later (a dropped connection, an encoder error). The URL is tried again
  after a delay, in this run and on the next, within an attempt budget.
- CONDITION: a state of something larger than the item (a full disk, a site that blocks us). No
  item is charged: work that needs it waits until it clears, and the item is made again then.

Only the worker sees exceptions; it turns them into a `Failure` here, and the supervisor's policy
decides what to do from the scope and kind alone.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class Scope(StrEnum):
    CLIP = "clip"
    URL = "url"
    SITE = "site"
    DISK = "disk"
    RUN = "run"


class Kind(StrEnum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    CONDITION = "condition"


# A file system that is full (or a quota that is): a state of the folder, not of the item written.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class Failure:
    scope: Scope
    kind: Kind
    reason: str  # one line, naming the URL, file or folder
    where: str = ""  # the folder of a disk condition, the site of a site condition
    retry_after_seconds: float = 0.0  # the least wait the other side asked for (Retry-After)
    bug: bool = False  # an exception our own code did not expect: a smaller retry budget
    http_status: int = 0  # the site's answer, where that says more than the kind (403: see sites)
    # A full disk: the bytes free on it when the write failed, measured there and then (the
    # report may reach the supervisor after someone has made room).
    free_bytes: int | None = None

    @property
    def permanent(self) -> bool:
        return self.kind is Kind.PERMANENT

    @property
    def condition(self) -> bool:
        return self.kind is Kind.CONDITION

    def __str__(self) -> str:
        return self.reason


def permanent(scope: Scope, reason: str) -> Failure:
    return Failure(scope, Kind.PERMANENT, reason)


def transient(scope: Scope, reason: str, retry_after_seconds: float = 0.0) -> Failure:
    return Failure(scope, Kind.TRANSIENT, reason, retry_after_seconds=retry_after_seconds)


def disk_full(folder: Path | str, reason: str) -> Failure:
    return Failure(
        Scope.DISK, Kind.CONDITION, reason, where=str(folder), free_bytes=_free_bytes(Path(folder))
    )


def _free_bytes(folder: Path) -> int | None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def site_blocked(site: str, reason: str, retry_after_seconds: float = 0.0) -> Failure:
    """The site refuses us as a whole (429, a bot check): its URLs wait, none is charged."""
    return Failure(Scope.SITE, Kind.CONDITION, reason, where=site, retry_after_seconds=retry_after_seconds)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or what it was raised from, says the file system is full."""
    seen: BaseException | None = exc
    for _ in range(5):  # an encoder's error may wrap the OSError that caused it
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def from_exception(
    exc: BaseException,
    scope: Scope,
    folder: Path,
    what: str,
    expected: tuple[type[BaseException], ...] = (),
) -> Failure:
    """An exception met while writing into `folder` (a clip's encoder, a download): a full disk is
    that folder's condition; running out of memory, other I/O errors and the `expected` errors of
    the caller's own components may pass (transient); any other exception is a bug in our code
    (transient, with a small budget)."""
    if is_disk_full(exc):
        return disk_full(folder, f"{what}: no space left in {folder}")
    if isinstance(exc, (OSError, *expected)):
        return transient(scope, f"{what}: {exc}")
    if isinstance(exc, MemoryError):
        return transient(scope, f"{what}: out of memory")
    return Failure(scope, Kind.TRANSIENT, f"internal: {what}: {type(exc).__name__}: {exc}", bug=True)
