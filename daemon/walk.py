"""Walking a source along a clip schedule: decode what the clips need, seek across gaps, never loop.

The rules that make every walk end:
- a seek is made only when the index puts a keyframe more than the seek threshold after the last
  decoded frame, so each seek lands strictly further on than the walk has been (never where the
  last one did);
- if a seek lands after the moment asked for (a wrong index), decoding restarts from the
  beginning once, and the walk makes no further seeks: from then on it decodes straight through.
Each decoded frame therefore lies after the previous one, but for at most one restart.

Between clips nothing is shown, so the decoder may drop frames that no other frame needs (the
B-frames of most streams): it does so while the next clip is further away than the margin below,
and never just after a seek, so every frame that could be on screen when a clip starts is
decoded in full.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

from daemon.frames import Frame, FrameSource
from daemon.timing import FrameSchedule

# Frames a decoder may hold between taking a packet and handing out its picture: frame threads
# (FFmpeg uses at most 16) plus B-frame reordering. Skipping stops this many frames (and at least
# a second) before a clip, so no frame that could be on screen at its start was decoded skipping.
SKIP_MARGIN_SECONDS = Fraction(1)
SKIP_MARGIN_FRAMES = 32


@dataclass(frozen=True)
class Shown:
    """A decoded frame and the end of its time on screen (the next frame's time, or its duration)."""

    frame: Frame
    end_seconds: Fraction
    # The first frame after a (re)start: unserved moments before it are its own (only ever the
    # moments before a stream's first frame).
    first: bool


class FrameWalk:
    """Yields the frames a schedule needs, each with its end time; iterate once."""

    def __init__(
        self,
        source: FrameSource,
        schedule: FrameSchedule,
        seek_threshold_seconds: Fraction,
        should_stop: Callable[[], bool] = lambda: False,
        on_decoded: Callable[[], None] = lambda: None,
    ) -> None:
        self.source = source
        self.schedule = schedule
        self.seek_threshold_seconds = seek_threshold_seconds
        self.should_stop = should_stop
        self.on_decoded = on_decoded
        self.interrupted = False  # a stop request ended the walk with clips still to start
        self.end_seconds = Fraction(0)  # where the last frame shown leaves the screen
        self.seeks = 0
        self.restarts = 0
        self._landings: dict[Fraction, Fraction | None] = {}  # seek target -> where it would land
        self._sought: set[Fraction] = set()  # each target is sought once at most
        self._skipping = False
        self._margin = max(SKIP_MARGIN_SECONDS, SKIP_MARGIN_FRAMES * source.nominal_frame_seconds)

    def __iter__(self) -> Iterator[Shown]:
        upcoming = self.schedule.next_start_seconds() or Fraction(0)
        frames = self._open(upcoming if self._worth_seeking(None, upcoming) else Fraction(0))
        self._skip(upcoming > self._margin)
        previous: Frame | None = None
        previous_first = True
        try:
            while True:
                current = next(frames, None)
                if previous is not None:
                    if current is not None:
                        end = current.pts_seconds
                    else:
                        end = previous.pts_seconds + (
                            previous.duration_seconds or self.source.nominal_frame_seconds
                        )
                    self.end_seconds = end
                    yield Shown(previous, end, previous_first)
                    previous_first = False
                if current is None:
                    return
                self.on_decoded()
                previous = current
                if self.schedule.active():
                    continue
                if self.should_stop():
                    self.interrupted = True
                    return
                next_start = self.schedule.next_start_seconds()
                if next_start is None:
                    return
                if self._worth_seeking(current.pts_seconds, next_start):
                    # Safe to drop `current` unshown: a keyframe lies after it and at or before
                    # `next_start`, so its time on screen ends before any clip needs it.
                    close_frames(frames)
                    # Frames just after the landing may be on screen at the clip's start: they
                    # are decoded whole; skipping resumes from the next frame's distance.
                    self._skip(False)
                    frames = self._open(next_start)
                    previous, previous_first = None, True
                    continue
                self._skip(next_start - current.pts_seconds > self._margin)
        finally:
            close_frames(frames)
            self._skip(False)

    def _skip(self, skip: bool) -> None:
        if skip != self._skipping:
            self._skipping = skip
            self.source.skip_unreferenced(skip)

    def _worth_seeking(self, position: Fraction | None, target: Fraction) -> bool:
        """Seek only forward, only when it skips more than the threshold of decoding, and never
        again after a restart."""
        start = position if position is not None else Fraction(0)
        if self.restarts or target in self._sought or target - start <= self.seek_threshold_seconds:
            return False
        if target not in self._landings:  # asked once per target: the answer does not change
            self._landings[target] = self.source.keyframe_seconds(target)
        landing = self._landings[target]
        return landing is not None and landing <= target and landing - start > self.seek_threshold_seconds

    def _open(self, from_seconds: Fraction) -> Iterator[Frame]:
        """Frames from the one on screen at `from_seconds`; from the start if the index misled."""
        if from_seconds <= 0:
            return iter(self.source.frames(Fraction(0)))
        self.seeks += 1
        self._sought.add(from_seconds)
        frames = iter(self.source.frames(from_seconds))
        first = next(frames, None)
        if first is not None and first.pts_seconds <= from_seconds:
            return _chain(first, frames)
        close_frames(frames)
        self.restarts += 1
        return iter(self.source.frames(Fraction(0)))


def _chain(first: Frame, rest: Iterator[Frame]) -> Iterator[Frame]:
    try:
        yield first
        yield from rest
    finally:
        close_frames(rest)


def close_frames(frames: Iterator[object]) -> None:
    """Ends a generator of frames now (its decoder state is let go of), not when it is collected."""
    close = getattr(frames, "close", None)
    if close is not None:
        close()
