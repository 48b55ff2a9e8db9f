"""A source's clips cut in parts: clips the index keeps apart go to decoders of their own, each on
a lane, so that no pictures need queueing between clips far apart."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from fractions import Fraction
from typing import Any

from loguru import logger

from daemon.clips import Clip
from daemon.cutting import CutJob, CutterParts, ProgressSink, VideoOutcome
from daemon.frames import FrameSource
from daemon.messages import ClipResult
from daemon.timing import ClipTimeline, FrameSchedule
from daemon.walk import close_frames


def separate(cutter: CutterParts, job: CutJob) -> list[list[Clip]]:
    """The job's clips in parts that lanes can decode on their own, longest first; or one part when
    decoding them apart would leave a lane idle for long (see `separate_parts`)."""
    clips = job.clips
    timelines = FrameSchedule(clips, cutter.clip_fps, cutter.fps).timelines
    with cutter.open(job.source_path) as source:
        found = separate_parts(timelines, source.keyframe_seconds)
        if len(found) > 1 and not lands_in_time(source, found[1][0].start_seconds(cutter.clip_fps)):
            # A wrong index: each part's walk would restart from the beginning of the video.
            return [clips]
    return balanced(grouped(found, PARTS_PER_LANE * cutter.lanes), cutter.lanes) or [clips]


def separate_parts(
    timelines: list[ClipTimeline], keyframe_seconds: Callable[[Fraction], Fraction | None]
) -> list[list[Clip]]:
    """Clips (in time order) cut into parts wherever the index puts the keyframe a decoder would
    start the next clip from after the end of every clip before it: decoders that each walk one
    part then decode almost no frame twice (a decoder reads a few frames past its part's end
    before it knows it is done), and need no pictures queued between them."""
    parts: list[list[Clip]] = []
    reach: Fraction | None = None  # the latest moment a clip so far needs
    for timeline in timelines:
        start = timeline.start_seconds
        # A clip that starts before `reach` shares frames with an earlier one: no index lookup.
        landing = None if reach is None or start <= reach else keyframe_seconds(start)
        if reach is None or (landing is not None and reach < landing <= start):
            parts.append([])
        parts[-1].append(timeline.clip)
        end = timeline.end_seconds
        reach = end if reach is None else max(reach, end)
    return parts


def lands_in_time(source: FrameSource, seconds: Fraction) -> bool:
    """Whether a real seek to `seconds` lands at or before it, as the index promises (the check
    FrameWalk makes after each seek)."""
    frames = iter(source.frames(seconds))
    try:
        first = next(frames, None)
    finally:
        close_frames(frames)
    return first is not None and first.pts_seconds <= seconds


# Parts a lane may get on average: enough to even the lanes out at the end, few enough that opening
# a decoder and decoding the lead-in from a keyframe stay small next to the clips themselves.
PARTS_PER_LANE = 4

# How much longer than an even share of the frames the busiest lane may be given.
BALANCE_SLACK = 1.1


def grouped(parts: list[list[Clip]], most: int) -> list[list[Clip]]:
    """Neighbouring parts joined into at most `most` groups of about the same number of frames;
    a group's one decoder seeks across the gaps inside it."""
    if len(parts) <= most:
        return parts
    share = sum(part_frames(part) for part in parts) / most
    groups: list[list[Clip]] = [[] for _ in range(most)]
    before = 0  # frames in the parts so far
    for part in parts:
        frames = part_frames(part)
        groups[min(most - 1, int((before + frames / 2) / share))].extend(part)
        before += frames
    return [group for group in groups if group]


def balanced(parts: list[list[Clip]], lanes: int) -> list[list[Clip]] | None:
    """The parts longest first (each goes to the first lane that is free, so the lanes end close
    together), or None when even then one lane would have more than its share of the frames
    (by BALANCE_SLACK): one part holding most of the clips is better cut by one decoder feeding
    every lane."""
    if len(parts) < 2:
        return None
    ordered = sorted(parts, key=part_frames, reverse=True)
    loads = [0] * lanes
    for part in ordered:
        loads[loads.index(min(loads))] += part_frames(part)
    return ordered if max(loads) <= BALANCE_SLACK * sum(loads) / lanes else None


def part_frames(part: list[Clip]) -> int:
    return sum(clip.end_frame - clip.start_frame for clip in part)


class PartAborted(Exception):
    """The cut was abandoned on the cutter's thread: a part's walk ends where it is."""


class Relay:
    """The progress sink of the part threads: what they report is kept and handed to the real sink
    on the cutting thread (the worker's pipe is not for several threads)."""

    def __init__(self, abort: threading.Event) -> None:
        self._events: queue.SimpleQueue[tuple[str, tuple[Any, ...]]] = queue.SimpleQueue()
        self._abort = abort
        self._decoded = False  # a frame decoded since the last forward: one sign of life for all

    def clip_finished(self, result: ClipResult) -> None:
        self._events.put(("clip_finished", (result,)))

    def frames_encoded(self, count: int) -> None:
        self._events.put(("frames_encoded", (count,)))

    def frame_decoded(self) -> None:
        if self._abort.is_set():
            raise PartAborted  # the part's unfinished clips are removed on its way out
        self._decoded = True

    def waiting(self, seconds: float) -> None:
        self._events.put(("waiting", (seconds,)))

    def forward(self, sink: ProgressSink) -> None:
        """Everything reported so far, to `sink`, in order."""
        if self._decoded:
            self._decoded = False
            sink.frame_decoded()
        for name, args in self._drain():
            getattr(sink, name)(*args)

    def forward_finished(self, sink: ProgressSink) -> None:
        """After a failure: only the clips published, each on its own, so that one the sink fails
        to take does not hide the others (or the failure being raised)."""
        for name, args in self._drain():
            if name == "clip_finished":
                try:
                    sink.clip_finished(*args)
                except Exception as exc:  # noqa: BLE001 - the error being raised matters more
                    logger.error(f"could not report {args[0].path}: {type(exc).__name__}: {exc}")

    def _drain(self) -> Iterator[tuple[str, tuple[Any, ...]]]:
        while True:
            try:
                yield self._events.get_nowait()
            except queue.Empty:
                return


class SeparateParts:
    """Parts of one source's clips cut side by side, each by a decoder and encoders of its own on
    a lane: clips far apart need no pictures queued for a second lane (a single decoder must hold
    the rest of one clip in memory before it can reach the next), so memory does not grow with
    the clips' length."""

    def __init__(
        self, parts: list[list[Clip]], lanes: int, cut_part: Callable[[CutJob], VideoOutcome]
    ) -> None:
        self.parts = parts
        self.lanes = lanes
        # One pass over one part, on the part's thread: its clips are encoded there as it decodes
        # them (CutterParts.for_one_part).
        self.cut_part = cut_part

    def run(self, job: CutJob) -> VideoOutcome:
        stop, abort = threading.Event(), threading.Event()
        relay = Relay(abort)
        sink, should_stop, video_id = job.sink, job.should_stop, job.video_id

        def cut(part: list[Clip]) -> VideoOutcome:
            if stop.is_set():  # not started: its clips stay pending
                return VideoOutcome(results=[], interrupted=True)
            try:
                # Each part is one lane already: it takes no more.
                one = replace(job, clips=part, sink=relay, should_stop=stop.is_set, lanes_now=None)
                return self.cut_part(one)
            except BaseException:
                # The other parts stop the way they do on a stop request: the clips in progress
                # are finished and kept, the parts not started stay pending; the error is raised.
                stop.set()
                raise

        pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="clip-lane")  # no thread until a submit
        try:
            futures = [pool.submit(cut, part) for part in self.parts]
            pending: set[Future[VideoOutcome]] = set(futures)
            while pending:
                _, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                relay.forward(sink)
                if should_stop():
                    stop.set()
        except BaseException:
            # A signal or a failing sink on this thread: every part ends at its next frame.
            stop.set()
            abort.set()
            pool.shutdown(wait=True)
            relay.forward_finished(sink)
            raise
        pool.shutdown(wait=True)
        relay.forward(sink)
        failures = [exc for future in futures if (exc := future.exception()) is not None]
        for extra in failures[1:]:
            logger.error(f"{video_id}: another part failed as well: {type(extra).__name__}: {extra}")
        if failures:
            raise failures[0]
        outcomes = [future.result() for future in futures]
        return VideoOutcome(
            results=[result for outcome in outcomes for result in outcome.results],
            interrupted=any(outcome.interrupted for outcome in outcomes),
        )
