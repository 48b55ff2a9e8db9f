"""What the supervisor tells the progress display, the metrics and the service, as typed values.

Frozen dataclasses matched by class, as daemon.messages is between processes: a consumer takes
what it needs and ignores the rest, and a field misspelt on one side fails in mypy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from daemon.ledger import UrlState


@dataclass(frozen=True)
class UrlQueued:
    url: str


@dataclass(frozen=True)
class UrlEnded:
    """A URL's try ended: done, skipped or failed for this run, or pending again (to be retried,
    waiting for a condition, or left by a stop)."""

    url: str
    state: UrlState
    error: str | None = None
    download_seconds: float | None = None
    process_seconds: float | None = None

    @property
    def final(self) -> bool:
        return self.state is not UrlState.PENDING


@dataclass(frozen=True)
class ClipEnded:
    url: str
    video_id: str
    start_frame: int
    end_frame: int
    path: str | None  # None for a clip not made
    frames: int
    bytes: int
    error: str | None = None  # why it was not made


@dataclass(frozen=True)
class WorkerPhase:
    """A worker moved to another phase of its URL (download, process)."""

    worker: int
    url: str
    phase: str


@dataclass(frozen=True)
class FramesWritten:
    count: int


@dataclass(frozen=True)
class WorkerRestarted:
    worker: int


@dataclass(frozen=True)
class SiteChanged:
    """A site started blocking us (blocked) or answers again (open)."""

    site: str
    blocked: bool
    reason: str = ""


@dataclass(frozen=True)
class InputProblem:
    """A line of a clip file that names no clip, said once."""

    message: str


@dataclass(frozen=True)
class FleetSnapshot:
    """The supervisor's present, read-only: what the service's status line and the metrics show."""

    queued: int  # URLs waiting for a worker (a paused site's and those waiting to be retried too)
    running: int  # URLs a worker is on
    disk_paused: str | None  # why work waits for disk space, if it does
    sites_paused: tuple[str, ...]  # sites that block us now
    draining: bool  # stopping: in-flight clips finish, nothing new starts
    urgent: bool  # stopping now
    ended: dict[str, int]  # URLs ended in this run, by state (done, skipped, failed)
    clip_errors: int  # clips that can never be made, in this run


Event = (
    UrlQueued
    | UrlEnded
    | ClipEnded
    | WorkerPhase
    | FramesWritten
    | WorkerRestarted
    | SiteChanged
    | InputProblem
)

EventSink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The sink of a supervisor nobody watches."""
