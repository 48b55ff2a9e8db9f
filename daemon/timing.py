"""Which source frame each output frame shows.

Output frame k of clip [s, e) shows the source frame on screen at s/clip_fps + k/fps seconds: the
last frame whose presentation time is at or before that moment. Faster sources lose frames, slower
ones repeat them, and variable frame rates come out right because only timestamps are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from daemon.clips import Clip


@dataclass
class ClipTimeline:
    clip: Clip
    start_seconds: Fraction
    frame_count: int
    fps: Fraction
    next_index: int = 0

    def seconds_of(self, index: int) -> Fraction:
        return self.start_seconds + Fraction(index) / self.fps

    @property
    def end_seconds(self) -> Fraction:
        """The moment the last output frame is sampled; the source must reach past it."""
        return self.seconds_of(self.frame_count - 1)

    @property
    def started(self) -> bool:
        return self.next_index > 0

    @property
    def finished(self) -> bool:
        return self.next_index >= self.frame_count


class FrameSchedule:
    """Hands out output frame slots as consecutive source frame intervals go by."""

    def __init__(self, clips: list[Clip], clip_fps: Fraction, fps: Fraction) -> None:
        self.timelines = [
            ClipTimeline(
                clip=clip,
                start_seconds=clip.start_seconds(clip_fps),
                frame_count=clip.frame_count(clip_fps, fps),
                fps=fps,
            )
            for clip in sorted(clips)
        ]

    def take(self, start: Fraction, end: Fraction, first: bool) -> list[tuple[ClipTimeline, int]]:
        """Slots shown by a source frame displayed over [start, end), as (clip, repeat count).

        `first` marks the first frame decoded after a (re)start: moments before it that are still
        unserved belong to it, which only happens before the stream's very first frame.
        """
        shown: list[tuple[ClipTimeline, int]] = []
        for timeline in self.timelines:
            if timeline.finished or timeline.start_seconds >= end:
                continue
            count = 0
            while not timeline.finished and timeline.seconds_of(timeline.next_index) < end:
                if timeline.seconds_of(timeline.next_index) < start and not first:
                    raise AssertionError("a source frame interval was skipped")
                timeline.next_index += 1
                count += 1
            if count:
                shown.append((timeline, count))
        return shown

    def active(self) -> list[ClipTimeline]:
        return [t for t in self.timelines if t.started and not t.finished]

    def unfinished(self) -> list[ClipTimeline]:
        return [t for t in self.timelines if not t.finished]

    def next_start_seconds(self) -> Fraction | None:
        waiting = [t.start_seconds for t in self.timelines if not t.started]
        return min(waiting) if waiting else None
