"""One source video in, one HEVC stream per clip out: decode once, run the stages, encode.

`ClipCutter.run_in_one_pass` is the pipeline: frames (a walk along the clips, daemon.walk) →
schedule (which clips show each frame, daemon.timing) → pictures (as the stages and the encoder want
them) → writers (one per clip: its stages state and its encoders, on a thread of its own when it
has one). With several lanes, clips the index keeps apart are cut in parts (`SeparateParts`), each
such pass on a lane of its own.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import av
import numpy as np
from loguru import logger

from daemon.budget import CpuBudget
from daemon.clips import Clip
from daemon.config import Settings
from daemon.encode import EncodeError, X265Encoders
from daemon.failures import Failure, Scope, from_exception, permanent
from daemon.frames import ClipEncoder, EncoderFactory, Frame, FrameSource, Picture, PictureFormat, Pictures
from daemon.messages import ClipResult
from daemon.partfile import IncompleteFile, PartFile, publish_together
from daemon.source import VideoSource
from daemon.stages.base import FrameBatch, Stage
from daemon.stages.resize import Resize
from daemon.timing import ClipTimeline, FrameSchedule
from daemon.walk import FrameWalk, close_frames

if TYPE_CHECKING:  # resize-only runs pass numpy arrays and YUV frames; only the stages need tensors
    import torch


class ProgressSink(Protocol):
    def clip_finished(self, result: ClipResult) -> None: ...

    def frames_encoded(self, count: int) -> None: ...

    def frame_decoded(self) -> None:
        """Called for every decoded frame, shown or not: the sign of life a watchdog waits for."""

    def waiting(self, seconds: float) -> None:
        """About to wait this long on purpose (for a GPU slot): not a stall."""


SourceOpener = Callable[[Path], FrameSource]


@dataclass(frozen=True)
class VideoOutcome:
    results: list[ClipResult]
    interrupted: bool  # a stop request left clips unstarted; they stay pending


@dataclass(frozen=True)
class PicturePlan:
    """How one source's frames become pictures, chosen from the stages that run on that source
    (not from their names: an upscale a large source does not need costs no RGB round trip)."""

    stages: list[Stage]  # the stages that change frames of this source
    prescale: Resize | None  # the first stage, done by the decoder's scaler while converting colours
    yuv: bool  # no stage looks at the pixels: frames go to the encoder as YUV
    width: int
    height: int

    @classmethod
    def choose(
        cls,
        stages: list[Stage],
        source: FrameSource,
        accepts: frozenset[PictureFormat],
        width: int,
        height: int,
    ) -> PicturePlan:
        running = [stage for stage in stages if stage.runs_on(source.width, source.height)]
        first = running[0] if running else None
        prescale = (
            first if isinstance(first, Resize) and PictureFormat.HOST_RGB in source.picture_formats else None
        )
        yuv = (
            prescale is not None
            and len(running) == 1
            and PictureFormat.YUV420 in source.picture_formats
            and PictureFormat.YUV420 in accepts
            and height % 4 == 0
        )
        return cls(running, prescale, yuv, width, height)

    @property
    def stages_done(self) -> bool:
        """The decoder's scaler did the only stage: pictures go to the encoder as they are."""
        return self.prescale is not None and len(self.stages) == 1

    def picture(self, frame: Frame) -> Picture:
        if self.prescale is None:
            return frame.to_rgb()
        size, window = self.prescale.plan(frame.width, frame.height)
        left, top, width, height = window
        if self.yuv and (width, height) == (self.width, self.height):  # not `pad`: borders are drawn in RGB
            return frame.to_yuv420(size, window)
        rgb = cast(np.ndarray, frame.to_rgb(size))[top : top + height, left : left + width]
        # `pad` leaves the borders; drawn here, the picture goes to the encoder without torch.
        return self.prescale.pad_array(rgb)


@dataclass
class ClipStream:
    """One stream of a clip (its picture, or its matte): the encoder and the file it writes into."""

    file: PartFile
    encoder: ClipEncoder


@dataclass
class ClipWriter:
    """One clip being written: batches of its pictures through the stages into its main stream and,
    when a matte stage makes one, its `.alpha.hevc` stream; in order, on its lane when it has one."""

    timeline: ClipTimeline
    path: Path
    plan: PicturePlan
    open_encoder: Callable[[Path], ClipEncoder]
    device: torch.device | str
    write_alpha: bool
    lane: ThreadPoolExecutor | None = None
    main: ClipStream = field(init=False)
    alpha: ClipStream | None = None
    pending: list[Picture] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # the stages' memory for this clip
    finishing: Future[ClipResult] | None = None
    failed: BaseException | None = None  # what broke a batch on the lane: the clip is not published

    def __post_init__(self) -> None:
        self.main = self._open(self.path)

    def _open(self, path: Path) -> ClipStream:
        file = PartFile(path)
        return ClipStream(file, self.open_encoder(file.part_path))

    def streams(self) -> list[ClipStream]:
        return [self.main] if self.alpha is None else [self.main, self.alpha]

    def take_pending(self) -> list[Picture]:
        pending, self.pending = self.pending, []
        return pending

    def write(self, pictures: list[Picture]) -> int:
        """One batch through the stages into the encoders; returns the frames written."""
        try:
            return self._write(pictures)
        except BaseException as exc:
            self.failed = exc
            raise

    def _write(self, pictures: list[Picture]) -> int:
        encoder = self.main.encoder
        if self.plan.stages_done:
            if isinstance(pictures[0], av.VideoFrame):
                encoder.write(cast(list[av.VideoFrame], pictures))
            else:
                encoder.write(np.stack(cast(list[np.ndarray], pictures)))
            return len(pictures)
        import torch

        stacked = stack_frames(cast("list[np.ndarray | torch.Tensor]", pictures)).to(
            self.device, non_blocking=True
        )
        batch = FrameBatch(rgb=stacked.permute(0, 3, 1, 2).float().div_(255), state=self.state)
        with torch.inference_mode():
            for stage in self.plan.stages:
                batch = stage(batch)
        if tuple(batch.rgb.shape[-2:]) != (self.plan.height, self.plan.width):
            raise RuntimeError(
                f"stages produced {tuple(batch.rgb.shape[-2:])}, not {self.plan.height}x{self.plan.width}"
            )
        encoder.write(accepted(encoder, to_uint8(batch.rgb).permute(0, 2, 3, 1)))
        if batch.alpha is not None and self.write_alpha:
            if self.alpha is None:
                self.alpha = self._open(self.path.with_name(self.path.name.replace(".hevc", ".alpha.hevc")))
            self.alpha.encoder.write(accepted(self.alpha.encoder, to_uint8(batch.alpha)[:, 0]))
        return int(batch.rgb.shape[0])

    def finish(self, video_id: str) -> ClipResult:
        """Both streams published, or neither (daemon.partfile.publish_together): a clip whose
        matte fails is made again, both streams, by the next run."""
        clip = self.timeline.clip
        expected = self.timeline.frame_count
        if self.failed is not None:
            self.abort()
            return failed_clip(clip, self._failure(self.failed, video_id))
        try:
            for stream in self.streams():
                stream.encoder.finish()
                stream.file.expect_frames(stream.encoder.frames_written, expected)
            size = publish_together([stream.file for stream in self.streams()])[0]
        except Exception as exc:  # noqa: BLE001 - a clip that cannot be finished is that clip's failure
            self.abort()
            return failed_clip(clip, self._failure(exc, video_id))
        return ClipResult(clip.start_frame, clip.end_frame, str(self.path), expected, size)

    def _failure(self, exc: BaseException, what: str) -> Failure:
        return from_exception(
            exc, Scope.CLIP, self.path.parent, what, (EncodeError, IncompleteFile, av.error.FFmpegError)
        )

    def abort(self) -> None:
        """Remove the unfinished files (the lane is stopped first, by whoever owns it)."""
        for stream in self.streams():
            stream.encoder.abort()
            stream.file.abort()


class Lanes:
    """Threads for clips written side by side, each with a single-threaded encoder (PyAV lets go of
    the GIL while libx265 works), `count` of them at most; and the pictures queued for them.

    A clip keeps the lane it starts on, and its batches and its finish run there in order. A new
    clip takes an idle lane, else a new one while there are fewer than `count`, else the lane with
    the least left to do, queued behind what that lane is finishing: no clip is encoded on the
    decoding thread, so the decoder never stops to encode, and no more encoders hold pictures than
    there are lanes (plus clips that overlap in time).

    The decoding thread runs ahead, into the next clip so that a second lane gets work, until
    `buffer_bytes` of pictures are queued: memory is bounded by that, whatever the video's length."""

    def __init__(self, count: int, buffer_bytes: int, on_written: Callable[[int], None]) -> None:
        self._count = count if count > 1 else 0
        self._lanes: dict[ThreadPoolExecutor, int] = {}  # each lane, with its clips still receiving frames
        self._buffer_bytes = buffer_bytes
        self._on_written = on_written
        # Oldest first: each batch with its size in bytes and its lane.
        self._queued: deque[tuple[Future[int], int, ThreadPoolExecutor]] = deque()
        self._queued_bytes = 0

    @property
    def side_by_side(self) -> bool:
        """Whether clips may be written on several threads at once."""
        return bool(self._count)

    def take(self) -> ThreadPoolExecutor | None:
        """The lane for a new clip; None (written on the decoding thread) when there are no lanes."""
        if not self._count:
            return None
        left: dict[ThreadPoolExecutor, int] = dict.fromkeys(self._lanes, 0)  # bytes queued, not written
        for future, size, lane in self._queued:
            if not future.done():
                left[lane] += size
        least = min(self._lanes, key=lambda lane: (self._lanes[lane], left[lane]), default=None)
        if least is None or ((self._lanes[least] or left[least]) and len(self._lanes) < self._count):
            least = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-lane")
            self._lanes[least] = 0
        self._lanes[least] += 1
        return least

    def received_all(self, writer: ClipWriter) -> None:
        """The writer's clip has all its frames: its lane may take a new clip after it."""
        if writer.lane is not None and self._lanes.get(writer.lane, 0) > 0:
            self._lanes[writer.lane] -= 1

    def stop(self) -> None:
        """Stop every lane (what is queued on them is dropped) and wait for their threads."""
        for lane in self._lanes:
            lane.shutdown(wait=True, cancel_futures=True)
        self._lanes.clear()

    def write(self, writer: ClipWriter, pictures: list[Picture]) -> None:
        if writer.lane is None:
            self._on_written(writer.write(pictures))
            return
        size = sum(picture_bytes(picture) for picture in pictures)
        self._queued.append((writer.lane.submit(writer.write, pictures), size, writer.lane))
        self._queued_bytes += size
        self.drain(self._buffer_bytes)  # backpressure: the decoder waits while the buffer is full

    def drain(self, down_to_bytes: int | None) -> None:
        """Count the batches the lanes wrote; with `down_to_bytes`, wait for the oldest until no
        more than that is queued. A lane's failure is raised here."""
        while self._queued:
            future, size, _ = self._queued[0]
            if not future.done() and (down_to_bytes is None or self._queued_bytes <= down_to_bytes):
                return
            self._queued.popleft()
            self._queued_bytes -= size
            self._on_written(future.result())

    def forget_queued(self) -> None:
        self._queued.clear()
        self._queued_bytes = 0


class OpenClips:
    """The clips of one source being written, from their first frame until they are reported."""

    def __init__(self, cutter: ClipCutter, video_id: str, output_dir: Path, sink: ProgressSink) -> None:
        self.cutter = cutter
        self.video_id = video_id
        self.output_dir = output_dir
        self.sink = sink
        self.results: list[ClipResult] = []
        self.writers: dict[Clip, ClipWriter] = {}  # clips still receiving frames
        self.finishing: list[ClipWriter] = []  # clips whose lane is finishing them, in order
        self.lanes = Lanes(cutter.lane_count, cutter.buffer_bytes, sink.frames_encoded)

    def report(self, result: ClipResult) -> None:
        self.results.append(result)
        self.sink.clip_finished(result)

    def show(self, plan: PicturePlan, frame: Frame, slots: list[tuple[ClipTimeline, int]]) -> None:
        """The frame into every clip it is shown in, `count` times each; full batches are written."""
        writers = [(self._writer(plan, timeline), count) for timeline, count in slots]
        # Converted once, however many clips and repeats show it; but a YUV frame goes to the
        # encoder itself (which stamps it), so clips on different threads each get their own.
        picture = plan.picture(frame)
        for index, (writer, count) in enumerate(writers):
            if index and isinstance(picture, av.VideoFrame) and self.lanes.side_by_side:
                picture = plan.picture(frame)
            for _ in range(count):
                writer.pending.append(picture)
                if len(writer.pending) >= self.cutter.batch_size:
                    self.lanes.write(writer, writer.take_pending())
            if writer.timeline.finished:
                self._finish(writer)

    def _writer(self, plan: PicturePlan, timeline: ClipTimeline) -> ClipWriter:
        writer = self.writers.get(timeline.clip)
        if writer is None:
            cutter = self.cutter
            writer = self.writers[timeline.clip] = ClipWriter(
                timeline,
                self.output_dir / self.video_id / timeline.clip.file_name(self.video_id),
                plan,
                lambda path: cutter.encoders(path, cutter.width, cutter.height, cutter.fps),
                cutter.device,
                cutter.write_alpha,
                lane=self.lanes.take(),
            )
        return writer

    def _finish(self, writer: ClipWriter) -> None:
        if writer.pending:
            self.lanes.write(writer, writer.take_pending())
        del self.writers[writer.timeline.clip]
        self.lanes.received_all(writer)
        if writer.lane is None:
            self.report(writer.finish(self.video_id))
        else:
            writer.finishing = writer.lane.submit(writer.finish, self.video_id)
            self.finishing.append(writer)

    def collect(self, wait: bool = False) -> None:
        """Counts the lanes' written batches and reports their finished clips, on this thread (the
        sink's pipe is not for several threads); a lane's failure is raised here."""
        self.lanes.drain(0 if wait else None)
        for writer in list(self.finishing):
            finishing = writer.finishing
            if finishing is not None and (wait or finishing.done()):
                # Out of the list before anything can raise: a clip is reported once at most.
                self.finishing.remove(writer)
                self.report(finishing.result())  # waits for the lane's task

    def abort(self) -> None:
        """Something failed: every unfinished clip's files go; clips a lane finished are kept."""
        self.lanes.stop()  # nothing runs on a lane from here on
        self.lanes.forget_queued()
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()
        for writer in self.finishing:
            finished = writer.finishing
            if finished is not None and not finished.cancelled() and finished.exception() is None:
                self.report(finished.result())
            else:
                writer.abort()
        self.finishing.clear()

    def end(self, schedule: FrameSchedule, walk: FrameWalk) -> None:
        """After the last frame: a clip left unfinished ran past the end of the source, unless a
        stop request came before it started (it stays pending)."""
        for timeline in schedule.unfinished():
            writer = self.writers.pop(timeline.clip, None)
            if writer is not None:  # its lane is idle: every batch was waited for
                writer.abort()
            if walk.interrupted and not timeline.started:
                continue
            clip = timeline.clip
            self.report(
                failed_clip(
                    clip,
                    permanent(
                        Scope.CLIP,
                        f"{self.video_id} clip {clip.start_frame} {clip.end_frame}: runs past the end of "
                        f"the source (video ends at {float(walk.end_seconds):.3f}s, clip needs "
                        f"{float(timeline.end_seconds):.3f}s)",
                    ),
                )
            )


class ClipCutter:
    """Cuts every clip of one source in a single forward pass over its frames."""

    def __init__(
        self,
        settings: Settings,
        stages: list[Stage],
        device: torch.device | str,
        encoders: EncoderFactory | None = None,
        open_source: SourceOpener | None = None,
        lanes: int | None = None,
        budget: CpuBudget | None = None,
    ) -> None:
        self.settings = settings
        self.budget = budget or CpuBudget.of_process(settings)
        self.stages = stages
        self.device = device
        self.width = settings.output.width
        self.height = settings.output.height
        self.fps = settings.fps
        self.batch_size = settings.decode.batch_size
        self.buffer_bytes = int(settings.decode.buffer_mb * 2**20)
        # Clips written at once, each on its own thread: only for the CPU's encoder, since NVENC has
        # its own engine.
        self.lane_count = lanes or (self.budget.lanes if encoders is None and str(device) == "cpu" else 1)
        self.encoders = encoders or X265Encoders(
            settings.encode, self.budget.encoder_threads(self.lane_count)
        )
        self.open_source = open_source or self._cpu_source
        # Parts each open a decoder of their own: only where that decoder is PyAV's.
        self.cuts_in_parts = open_source is None and self.lane_count > 1
        # The matte, when a matte stage makes one, goes to its own `.alpha.hevc` stream.
        self.write_alpha = "matte" in settings.stages and settings.matte.alpha_stream

    def _cpu_source(self, path: Path) -> FrameSource:
        return VideoSource(path, threads=self.budget.decoder_threads)

    def run(
        self,
        source_path: Path,
        video_id: str,
        clips: list[Clip],
        output_dir: Path,
        sink: ProgressSink,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> VideoOutcome:
        if self.cuts_in_parts:
            parts = self._separate_parts(source_path, clips)
            if len(parts) > 1:
                return SeparateParts(self, parts).run(source_path, video_id, output_dir, sink, should_stop)
        return self.run_in_one_pass(source_path, video_id, clips, output_dir, sink, should_stop)

    def _separate_parts(self, source_path: Path, clips: list[Clip]) -> list[list[Clip]]:
        """The clips in parts that lanes can decode on their own, longest first; or one part when
        decoding them apart would leave a lane idle for long (see `separate_parts`)."""
        timelines = FrameSchedule(clips, self.settings.clip_fps, self.fps).timelines
        with self.open_source(source_path) as source:
            parts = separate_parts(timelines, source.keyframe_seconds)
            clip_fps = self.settings.clip_fps
            if len(parts) > 1 and not lands_in_time(source, parts[1][0].start_seconds(clip_fps)):
                # A wrong index: each part's walk would restart from the beginning of the video.
                return [clips]
        return balanced(grouped(parts, PARTS_PER_LANE * self.lane_count), self.lane_count) or [clips]

    def run_in_one_pass(
        self,
        source_path: Path,
        video_id: str,
        clips: list[Clip],
        output_dir: Path,
        sink: ProgressSink,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> VideoOutcome:
        """One decoder along every clip; clips go to lanes, with the pictures queued for them."""
        schedule = FrameSchedule(clips, self.settings.clip_fps, self.fps)
        open_clips = OpenClips(self, video_id, output_dir, sink)
        try:
            with self.open_source(source_path) as source:
                plan = PicturePlan.choose(self.stages, source, self.encoders.accepts, self.width, self.height)
                threshold = Fraction(self.settings.decode.seek_threshold_seconds)
                walk = FrameWalk(source, schedule, threshold, should_stop, on_decoded=sink.frame_decoded)
                for shown in walk:
                    open_clips.collect()
                    slots = schedule.take(shown.frame.pts_seconds, shown.end_seconds, shown.first)
                    if slots:
                        open_clips.show(plan, shown.frame, slots)
            open_clips.collect(wait=True)
        except BaseException:
            open_clips.abort()
            raise
        open_clips.lanes.stop()
        open_clips.end(schedule, walk)
        return VideoOutcome(results=open_clips.results, interrupted=walk.interrupted)


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

    def __init__(self, cutter: ClipCutter, parts: list[list[Clip]]) -> None:
        self.parts = parts
        self.lanes = cutter.lane_count
        threads = cutter.budget.part_decoder_threads(cutter.lane_count)
        # One lane each, the part's own: its clips are encoded on its thread as it decodes them.
        self.cutter = ClipCutter(
            cutter.settings,
            cutter.stages,
            cutter.device,
            encoders=cutter.encoders,
            open_source=lambda path: VideoSource(path, threads=threads),
            lanes=1,
            budget=cutter.budget,
        )

    def run(
        self,
        source_path: Path,
        video_id: str,
        output_dir: Path,
        sink: ProgressSink,
        should_stop: Callable[[], bool],
    ) -> VideoOutcome:
        stop, abort = threading.Event(), threading.Event()
        relay = Relay(abort)
        cutter = self.cutter

        def cut(part: list[Clip]) -> VideoOutcome:
            if stop.is_set():  # not started: its clips stay pending
                return VideoOutcome(results=[], interrupted=True)
            try:
                return cutter.run_in_one_pass(source_path, video_id, part, output_dir, relay, stop.is_set)
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


def failed_clip(clip: Clip, failure: Failure) -> ClipResult:
    """A clip not made, and why: nothing written, no file."""
    return ClipResult(clip.start_frame, clip.end_frame, None, 0, 0, failure=failure)


def picture_bytes(picture: Picture) -> int:
    if isinstance(picture, av.VideoFrame):
        return sum(plane.buffer_size for plane in picture.planes)
    if isinstance(picture, np.ndarray):
        return int(picture.nbytes)
    return int(picture.numel() * picture.element_size())


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    import torch

    return images.clamp(0, 1).mul(255).round_().to(torch.uint8)


def stack_frames(frames: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
    """(N, H, W, 3) uint8; frames NVDEC left on the device stay there."""
    import torch

    if isinstance(frames[0], torch.Tensor):
        return torch.stack([torch.as_tensor(frame) for frame in frames])
    return torch.from_numpy(np.stack(frames))


def accepted(encoder: ClipEncoder, images: torch.Tensor) -> Pictures:
    """Device tensors for an encoder that reads them in place (NVENC), host arrays for the rest."""
    if images.device.type != "cpu" and PictureFormat.DEVICE_RGB in encoder.accepts:
        return images
    return cast(np.ndarray, images.cpu().numpy())
