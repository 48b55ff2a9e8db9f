"""Everything that crosses between the supervisor and a worker, in one place.

Plain frozen dataclasses: they pickle through a pipe and through Ray alike, and the receiving side
matches on their classes, so a field misspelt on one side fails in mypy, not at 3 a.m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from daemon.failures import Failure


@dataclass(frozen=True)
class Task:
    """One URL for a worker: what to fetch and which of its clips are still to make."""

    url: str
    video_id: str
    clips: tuple[tuple[int, int], ...]  # (start_frame, end_frame) pairs
    local: bool  # a file on this machine, processed in place and never deleted


@dataclass(frozen=True)
class WorkerPaths:
    output_dir: str
    temp_dir: str  # this worker's own folder, emptied after every URL
    log_dir: str
    slot_dir: str  # the run's processing slots on this machine (daemon.lockslots)


@dataclass(frozen=True)
class ClipResult:
    """What became of one clip."""

    start_frame: int
    end_frame: int
    path: str | None
    frames: int
    bytes: int
    failure: Failure | None = None  # why the clip was not made; None for a clip written

    @property
    def error(self) -> str | None:
        return self.failure.reason if self.failure else None


@dataclass(frozen=True)
class OutputFormat:
    """Picture size and rate of every clip of a run, recorded per clip for the manifest."""

    width: int
    height: int
    fps: float


# --- supervisor to worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class Assign:
    task: Task


@dataclass(frozen=True)
class Stop:
    """Finish the clips in progress, then exit."""


@dataclass(frozen=True)
class SpareConnection:
    """No URL waits and a worker idles: the download in flight may fetch its back part on a
    second connection (daemon.backpart)."""


ToWorker = Assign | Stop | SpareConnection


# --- worker to supervisor ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """Idle and asking for a URL."""

    node: str = ""  # the machine it runs on


@dataclass(frozen=True)
class Heartbeat:
    """Work moved; `waiting_seconds` announces a deliberate wait (a retry back-off, a GPU slot)."""

    url: str
    waiting_seconds: float = 0.0
    download_bytes_left: int | None = None  # while its download runs, where its size is known


@dataclass(frozen=True)
class PhaseChanged:
    url: str
    phase: str  # "download" or "process"


@dataclass(frozen=True)
class FramesEncoded:
    """Frames written since the last such message: live progress only."""

    count: int


@dataclass(frozen=True)
class SourceProbed:
    url: str
    codec: str
    width: int
    height: int
    fps: float | None


@dataclass(frozen=True)
class ClipFinished:
    url: str
    video_id: str
    result: ClipResult
    sha256: str | None = None  # of a clip written; None for a clip that failed
    output: OutputFormat | None = None


@dataclass(frozen=True)
class UrlFinished:
    url: str
    state: str  # "done", "failed", or "interrupted" (a stop left clips to make)
    failure: Failure | None = None  # with "failed": what went wrong, its scope and kind
    download_seconds: float | None = None
    process_seconds: float | None = None

    @property
    def error(self) -> str | None:
        return self.failure.reason if self.failure else None


FromWorker = Ready | Heartbeat | PhaseChanged | FramesEncoded | SourceProbed | ClipFinished | UrlFinished


class WorkerChannel(Protocol):
    """A worker's end of its line to the supervisor: a pipe here, an actor's mailbox under Ray."""

    def send(self, message: FromWorker) -> None: ...

    def recv(self) -> ToWorker: ...

    def poll(self) -> bool:
        """Whether a message is waiting, without waiting for one."""
