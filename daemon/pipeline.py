"""One source video in, one vstream per clip out: decode once, stages in memory, encode."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

import av
import numpy as np

from daemon.clips import Clip
from daemon.config import Settings
from daemon.encode import ClipEncoder, EncodeError, X265Encoder
from daemon.source import SourceFrame, VideoSource
from daemon.stages import FrameBatch, Stage
from daemon.stages.resize import Resize
from daemon.timing import ClipTimeline, FrameSchedule
from daemon.walk import FrameWalk, SeekableSource, Shown

if TYPE_CHECKING:  # resize-only runs pass numpy arrays and YUV frames; only the stages need tensors
    import torch


@dataclass(frozen=True)
class ClipResult:
    """What became of one clip; plain data, sent from worker to supervisor."""

    start_frame: int
    end_frame: int
    path: str | None
    frames: int
    bytes: int
    error: str | None = None


class ProgressSink(Protocol):
    def clip_finished(self, result: ClipResult) -> None: ...

    def frames_written(self, count: int) -> None: ...

    def frame_decoded(self) -> None:
        """Called for every decoded frame, shown or not: the sign of life a watchdog waits for."""

    def waiting(self, seconds: float) -> None:
        """About to wait this long on purpose (for a GPU slot): not a stall."""


EncoderFactory = Callable[[Path, int, int, Fraction], ClipEncoder]
# A decoded picture on its way to a clip: RGB on the host or a device, or YUV ready to encode.
Picture: TypeAlias = "np.ndarray | torch.Tensor | av.VideoFrame"


class ShownFrame(Protocol):
    """A decoded frame, from the CPU decoder (SourceFrame) or NVDEC (daemon.gpu.nvcodec)."""

    seconds: Fraction
    duration_seconds: Fraction | None

    def to_rgb(self) -> np.ndarray | torch.Tensor:
        """(height, width, 3) uint8 RGB, as a host array or a tensor already on a device."""


class FrameSource(SeekableSource[ShownFrame], Protocol):
    """A decoder the cutter opens per source: what a walk needs, plus the picture size."""

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    def __enter__(self) -> FrameSource: ...

    def __exit__(self, *exc: object) -> None: ...


SourceFactory = Callable[[Path], FrameSource]


@dataclass
class _ClipWork:
    timeline: ClipTimeline
    path: Path
    encoder: ClipEncoder
    pending: list[Picture] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    extra_encoders: dict[str, ClipEncoder] = field(default_factory=dict)
    # The clip's own thread, when it has one: its batches go through the stages and into its
    # encoders there, in order, while the decoding thread moves on.
    lane: ThreadPoolExecutor | None = None
    finishing: Future[ClipResult] | None = None
    failed: bool = False  # a batch failed on the lane: the clip must not be published

    def encoders(self) -> list[ClipEncoder]:
        return [self.encoder, *self.extra_encoders.values()]


@dataclass(frozen=True)
class VideoOutcome:
    results: list[ClipResult]
    interrupted: bool  # a stop request left clips unstarted; they stay pending


class ClipCutter:
    """Cuts every clip of one source in a single forward pass over its frames."""

    def __init__(
        self,
        settings: Settings,
        stages: list[Stage],
        device: torch.device | str,
        encoder_factory: EncoderFactory | None = None,
        source_factory: SourceFactory | None = None,
    ) -> None:
        self.settings = settings
        self.stages = stages
        self.device = device
        self.width = settings.output.width
        self.height = settings.output.height
        self.fps = settings.fps
        self.batch_size = settings.decode.batch_size
        self._encoder_factory = encoder_factory or self._x265
        self._source_factory = source_factory or self._cpu_source
        # The matte, when a matte stage makes one, goes to its own `.alpha.hevc` stream.
        self.write_alpha = "matte" in settings.stages and settings.matte.alpha_stream
        self._plan(stages)
        self._sink: ProgressSink | None = None
        # Clips written at once, each on its own thread with a single-threaded libx265 (PyAV lets
        # go of the GIL while x265 works). Only for the CPU's encoder: NVENC has its own engine.
        lanes = lane_count(settings) if encoder_factory is None and str(device) == "cpu" else 1
        self._lanes = threading.BoundedSemaphore(lanes) if lanes > 1 else None
        self._finishing: list[_ClipWork] = []  # clips whose lane is finishing them
        # Batches handed to lanes and not yet written, oldest first, with their size in bytes. The
        # decoding thread runs ahead (into the next clip, so that a second lane gets work) until
        # decode.buffer_mb is queued; memory is bounded by that, whatever the video's length.
        self._queued: deque[tuple[Future[int], int]] = deque()
        self._queued_bytes = 0
        self._buffer_bytes = int(settings.decode.buffer_mb * 2**20)
        self._report: Callable[[ClipResult], None] = lambda result: None

    def _x265(self, path: Path, width: int, height: int, fps: Fraction) -> ClipEncoder:
        return X265Encoder(path, width, height, fps, self.settings.encode, single_threaded=bool(self._lanes))

    def _cpu_source(self, path: Path) -> FrameSource:
        return VideoSource(path, threads=self.settings.decode.threads)

    def run(
        self,
        source_path: Path,
        video_id: str,
        clips: list[Clip],
        output_dir: Path,
        sink: ProgressSink,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> VideoOutcome:
        schedule = FrameSchedule(clips, self.settings.clip_fps, self.fps)
        self._sink = sink
        work: dict[Clip, _ClipWork] = {}
        results: list[ClipResult] = []

        def report(result: ClipResult) -> None:
            results.append(result)
            sink.clip_finished(result)

        self._report = report
        self._finishing = []
        self._queued.clear()
        self._queued_bytes = 0

        try:
            with self._source_factory(source_path) as source:
                self._plan([stage for stage in self.stages if stage.runs_on(source.width, source.height)])
                walk = FrameWalk(
                    source,
                    schedule,
                    Fraction(self.settings.decode.seek_threshold_seconds),
                    should_stop,
                    on_decoded=sink.frame_decoded,
                )
                for shown in walk:
                    self._show(shown, schedule, work, video_id, output_dir)
                interrupted, last_end = walk.interrupted, walk.end_seconds
            self._collect(wait=True)
        except BaseException:
            self._queued.clear()
            for item in work.values():
                self._abort(item)
            for item in self._finishing:  # clips a lane finished are kept and reported
                self._release_lane(item)
                finished = item.finishing
                if finished is not None and not finished.cancelled() and finished.exception() is None:
                    report(finished.result())
                else:
                    self._abort(item)
            self._finishing.clear()
            raise

        for timeline in schedule.unfinished():
            unfinished = work.pop(timeline.clip, None)
            if unfinished is not None:
                self._abort(unfinished)
            if interrupted and not timeline.started:
                continue
            clip = timeline.clip
            report(
                ClipResult(
                    clip.start_frame,
                    clip.end_frame,
                    None,
                    0,
                    0,
                    error=(
                        f"{video_id} clip {clip.start_frame} {clip.end_frame}: runs past the end of the "
                        f"source (video ends at {float(last_end):.3f}s, clip needs "
                        f"{float(timeline.end_seconds):.3f}s)"
                    ),
                )
            )
        return VideoOutcome(results=results, interrupted=interrupted)

    def _show(
        self,
        shown: Shown[ShownFrame],
        schedule: FrameSchedule,
        work: dict[Clip, _ClipWork],
        video_id: str,
        output_dir: Path,
    ) -> None:
        self._collect(wait=False)
        source_frame = shown.frame
        slots = schedule.take(source_frame.seconds, shown.end_seconds, shown.first)
        if not slots:
            return
        items: list[tuple[_ClipWork, int]] = []
        for timeline, count in slots:
            item = work.get(timeline.clip)
            if item is None:
                path = output_dir / video_id / timeline.clip.file_name(video_id)
                encoder = self._encoder_factory(path, self.width, self.height, self.fps)
                item = work[timeline.clip] = _ClipWork(timeline, path, encoder, lane=self._take_lane())
            items.append((item, count))
        # Converted once, however many clips and repeats show it; but a YUV frame goes to the
        # encoder itself (which stamps it), so clips on different threads each get their own.
        picture = self._convert(source_frame)
        for index, (item, count) in enumerate(items):
            if index and isinstance(picture, av.VideoFrame) and self._lanes is not None:
                picture = self._convert(source_frame)
            timeline = item.timeline
            for _ in range(count):
                item.pending.append(picture)
                if len(item.pending) >= self.batch_size:
                    self._flush(item)
            if timeline.finished:
                self._flush(item)
                del work[timeline.clip]
                if item.lane is None:
                    self._report(self._finish(item, video_id))
                else:
                    item.finishing = item.lane.submit(self._finish, item, video_id)
                    self._finishing.append(item)

    def _plan(self, running: list[Stage]) -> None:
        """Fast paths from the stages that will run on this source, not from their names."""
        self._running = running
        # When resizing comes first, the CPU decoder's scaler does it while converting colours.
        self._prescale = running[0] if running and isinstance(running[0], Resize) else None
        # With nothing but a resize to run, decoded frames go to the encoder as they are.
        self._passthrough = [stage.name for stage in running] == ["resize"]

    def _take_lane(self) -> ThreadPoolExecutor | None:
        """A thread for a new clip while the budget lasts; past it the clip is written inline."""
        if self._lanes is None or not self._lanes.acquire(blocking=False):
            return None
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-lane")

    def _release_lane(self, item: _ClipWork) -> None:
        if item.lane is not None and self._lanes is not None:
            item.lane.shutdown(wait=True, cancel_futures=True)
            item.lane = None
            self._lanes.release()

    def _collect(self, wait: bool) -> None:
        """Counts the lanes' written batches and reports their finished clips, on this thread
        (the sink's pipe is not for several threads); a lane's failure is raised here."""
        self._drain(0 if wait else None)
        for item in list(self._finishing):
            if item.finishing is not None and (wait or item.finishing.done()):
                # Out of the list before anything can raise: a clip is reported once at most.
                self._finishing.remove(item)
                try:
                    result = item.finishing.result()  # waits for the lane's last task
                finally:
                    self._release_lane(item)
                self._report(result)

    def _drain(self, down_to_bytes: int | None) -> None:
        """Count the batches the lanes wrote; with `down_to_bytes`, wait for the oldest until no
        more than that is queued."""
        while self._queued:
            future, size = self._queued[0]
            if not future.done() and (down_to_bytes is None or self._queued_bytes <= down_to_bytes):
                return
            self._queued.popleft()
            self._queued_bytes -= size
            self._count(future.result())

    def _abort(self, item: _ClipWork) -> None:
        """Stop the clip's lane (what is queued is dropped), then remove its unfinished files."""
        self._release_lane(item)
        for encoder in item.encoders():
            encoder.abort()

    def _convert(self, source_frame: ShownFrame) -> Picture:
        """The frame as the next step wants it: YUV for the encoder when nothing else looks at it."""
        if (
            self._passthrough
            and self._prescale is not None
            and isinstance(source_frame, SourceFrame)
            # Only when every clip is sure to get libx265: a picture goes to all clips showing it.
            and self._encoder_factory == self._x265
            and self.height % 4 == 0
        ):
            frame = source_frame.frame
            size, window = self._prescale.plan(frame.width, frame.height)
            if window[2:] == (self.width, self.height):  # not `pad`: its borders are drawn in RGB
                return source_frame.to_yuv420(size, window)
        return self._to_rgb(source_frame)

    def _to_rgb(self, source_frame: ShownFrame) -> np.ndarray | torch.Tensor:
        if self._prescale is None or not isinstance(source_frame, SourceFrame):
            return source_frame.to_rgb()
        frame = source_frame.frame
        size, (left, top, width, height) = self._prescale.plan(frame.width, frame.height)
        picture = source_frame.to_rgb(size)[top : top + height, left : left + width]
        # `pad` leaves the borders; drawn here, the frame goes to the encoder without torch.
        return self._prescale.pad_array(picture)

    def _flush(self, item: _ClipWork) -> None:
        pending, item.pending = item.pending, []
        if not pending:
            return
        if item.lane is None:
            self._count(self._write(item, pending))
            return
        size = sum(picture_bytes(picture) for picture in pending)
        self._queued.append((item.lane.submit(self._write, item, pending), size))
        self._queued_bytes += size
        self._drain(self._buffer_bytes)  # backpressure: the decoder waits while the buffer is full

    def _write(self, item: _ClipWork, pending: list[Picture]) -> int:
        """One batch through the stages into the clip's encoders; returns the frames written."""
        try:
            return self._write_batch(item, pending)
        except BaseException:
            item.failed = True
            raise

    def _write_batch(self, item: _ClipWork, pending: list[Picture]) -> int:
        if isinstance(pending[0], av.VideoFrame):
            assert isinstance(item.encoder, X265Encoder)
            item.encoder.write_video_frames(cast(list[av.VideoFrame], pending))
            return len(pending)
        pictures = cast("list[np.ndarray | torch.Tensor]", pending)
        if (
            self._passthrough
            and not getattr(item.encoder, "takes_device_tensors", False)
            and all(isinstance(f, np.ndarray) and f.shape[:2] == (self.height, self.width) for f in pictures)
        ):
            item.encoder.write(np.stack(cast(list[np.ndarray], pictures)))
            return len(pictures)
        import torch

        stacked = stack_frames(pictures).to(self.device, non_blocking=True)
        batch = FrameBatch(rgb=stacked.permute(0, 3, 1, 2).float().div_(255), state=item.state)
        with torch.inference_mode():
            for stage in self._running:
                batch = stage(batch)
        if tuple(batch.rgb.shape[-2:]) != (self.height, self.width):
            raise RuntimeError(
                f"stages produced {tuple(batch.rgb.shape[-2:])}, not {self.height}x{self.width}"
            )
        item.encoder.write(encoder_input(item.encoder, to_uint8(batch.rgb).permute(0, 2, 3, 1)))
        if batch.alpha is not None and self.write_alpha:
            alpha_encoder = item.extra_encoders.get("alpha")
            if alpha_encoder is None:
                alpha_path = item.path.with_name(item.path.name.replace(".hevc", ".alpha.hevc"))
                alpha_encoder = self._encoder_factory(alpha_path, self.width, self.height, self.fps)
                item.extra_encoders["alpha"] = alpha_encoder
            alpha_encoder.write(encoder_input(alpha_encoder, to_uint8(batch.alpha)[:, 0]))
        return int(batch.rgb.shape[0])

    def _count(self, frames: int) -> None:
        if self._sink is not None:
            self._sink.frames_written(frames)

    def _finish(self, item: _ClipWork, video_id: str) -> ClipResult:
        clip = item.timeline.clip
        expected = item.timeline.frame_count
        if item.failed:
            for encoder in item.encoders():
                encoder.abort()
            error = f"{video_id}: a batch of this clip failed to encode"
            return ClipResult(clip.start_frame, clip.end_frame, None, 0, 0, error=error)
        # The main stream first: a clip whose main stream failed must not leave its matte behind,
        # and one whose matte failed is removed whole, so the next run makes both again.
        try:
            size = item.encoder.finish(expected)
        except (EncodeError, OSError, av.error.FFmpegError) as exc:
            for encoder in item.encoders():
                encoder.abort()
            return ClipResult(clip.start_frame, clip.end_frame, None, 0, 0, error=f"{video_id}: {exc}")
        try:
            for extra in item.extra_encoders.values():
                extra.finish(expected)
        except (EncodeError, OSError, av.error.FFmpegError) as exc:
            for extra in item.extra_encoders.values():
                extra.abort()
                extra.path.unlink(missing_ok=True)
            item.path.unlink(missing_ok=True)
            return ClipResult(clip.start_frame, clip.end_frame, None, 0, 0, error=f"{video_id}: {exc}")
        return ClipResult(clip.start_frame, clip.end_frame, str(item.path), expected, size)


def picture_bytes(picture: Picture) -> int:
    if isinstance(picture, av.VideoFrame):
        return sum(plane.buffer_size for plane in picture.planes)
    if isinstance(picture, np.ndarray):
        return int(picture.nbytes)
    return int(picture.numel() * picture.element_size())


def lane_count(settings: Settings) -> int:
    """Clips one worker writes at once: its share of the machine's cores (encode.parallel_clips
    when set), so that the workers together run one encoder per core and never more."""
    if settings.encode.parallel_clips:
        return settings.encode.parallel_clips
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // settings.run.workers)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    import torch

    return images.clamp(0, 1).mul(255).round_().to(torch.uint8)


def stack_frames(frames: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
    """(N, H, W, 3) uint8; frames NVDEC left on the device stay there."""
    import torch

    if isinstance(frames[0], torch.Tensor):
        return torch.stack([torch.as_tensor(frame) for frame in frames])
    return torch.from_numpy(np.stack(frames))


def encoder_input(encoder: ClipEncoder, frames: torch.Tensor) -> Any:
    """Device tensors for an encoder that reads them in place (NVENC), host arrays for the rest."""
    if getattr(encoder, "takes_device_tensors", False):
        return frames
    return frames.cpu().numpy()
