"""Progress for people: a live bar on a terminal, a periodic plain line when output is a file."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import TextIO

from loguru import logger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from daemon import logs
from daemon.events import ClipEnded, Event, FramesWritten, UrlEnded


class FrameRate:
    """Frames per second over a sliding window."""

    def __init__(self, window_seconds: float = 30.0) -> None:
        self.window = window_seconds
        self.samples: deque[tuple[float, int]] = deque()
        self.started = time.monotonic()

    def add(self, count: int) -> None:
        self.samples.append((time.monotonic(), count))

    def value(self) -> float:
        now = time.monotonic()
        while self.samples and now - self.samples[0][0] > self.window:
            self.samples.popleft()
        # Early on the window is only as long as the run so far.
        span = max(min(self.window, now - self.started), 1.0)
        return sum(count for _, count in self.samples) / span


class ProgressView:
    def __init__(self, total_urls: int, interval_seconds: float, stream: TextIO = sys.stderr) -> None:
        self.total = total_urls
        self.finished = 0
        self.clips = 0
        self.rate = FrameRate()
        self.interval = interval_seconds
        self._last_line = time.monotonic()
        self.live = stream.isatty()
        self._progress: Progress | None = None
        if self.live:
            self.console = Console(file=stream)
            self._progress = Progress(
                TextColumn("URLs"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("clips {task.fields[clips]}"),
                TextColumn("{task.fields[fps]:.1f} frames/s"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task("urls", total=total_urls, clips=0, fps=0.0)
            self._progress.start()
            logs.route_console_through(self.console)

    def on_event(self, event: Event) -> None:
        match event:
            case UrlEnded() if event.final:
                self.finished += 1
            case ClipEnded(error=None):
                self.clips += 1
            case FramesWritten(count=count):
                self.rate.add(count)
        self.refresh()

    def refresh(self) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, completed=self.finished, clips=self.clips, fps=self.rate.value()
            )
        elif time.monotonic() - self._last_line >= self.interval:
            self._last_line = time.monotonic()
            logger.info(
                f"progress: {self.finished}/{self.total} URLs, {self.clips} clips, "
                f"{self.rate.value():.1f} frames/s"
            )

    def tick(self) -> bool:
        """Called from the supervisor's loop, so the display moves between events too."""
        self.refresh()
        return True

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            logs.route_console_through(None)
