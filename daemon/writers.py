"""Clips being written: each clip's writer (its stages' state, its streams), the lanes that write
clips side by side, and the clips of one source from their first frame until they are reported."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import av
import numpy as np

from daemon.clips import Clip
from daemon.cutting import CutJob, CutterParts, failed_clip
from daemon.failures import Failure, Scope, from_exception, permanent
from daemon.frames import ClipEncoder, EncodeError, Frame, Picture
from daemon.messages import ClipResult
from daemon.partfile import IncompleteFile, PartFile, publish_together
from daemon.pictures import PicturePlan, accepted, picture_bytes, stack_frames, to_uint8
from daemon.stages.base import FrameBatch
from daemon.timing import ClipTimeline, FrameSchedule
from daemon.walk import FrameWalk

if TYPE_CHECKING:
    import torch


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

    def __init__(
        self,
        count: int,
        buffer_bytes: int,
        on_written: Callable[[int], None],
        count_now: Callable[[], int] | None = None,
    ) -> None:
        self._count = count if count > 1 else 0
        # More lanes for clips that start once other workers left cores free: a source begun on
        # one core, as the last of a run, ends on all of them. Never fewer than it began with.
        self._count_now = count_now
        self._lanes: dict[ThreadPoolExecutor, int] = {}  # each lane, with its clips still receiving frames
        self._buffer_bytes = buffer_bytes
        self._on_written = on_written
        # Oldest first: each batch with its size in bytes and its lane.
        self._queued: deque[tuple[Future[int], int, ThreadPoolExecutor]] = deque()
        self._queued_bytes = 0

    @property
    def side_by_side(self) -> bool:
        """Whether clips may be written on several threads at once."""
        return bool(self._count or self._lanes)

    def take(self) -> ThreadPoolExecutor | None:
        """The lane for a new clip; None (written on the decoding thread) when there are no lanes."""
        if self._count_now is not None:
            now = self._count_now()
            self._count = max(self._count, now if now > 1 else 0)
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

    def __init__(self, parts: CutterParts, job: CutJob) -> None:
        self.parts = parts
        self.video_id = job.video_id
        self.output_dir = job.output_dir
        self.sink = job.sink
        self.results: list[ClipResult] = []
        self.writers: dict[Clip, ClipWriter] = {}  # clips still receiving frames
        self.finishing: list[ClipWriter] = []  # clips whose lane is finishing them, in order
        self.lanes = Lanes(parts.lanes, parts.buffer_bytes, job.sink.frames_encoded, job.lanes_now)

    def report(self, result: ClipResult) -> None:
        self.results.append(result)
        self.sink.clip_finished(result)

    def show(self, plan: PicturePlan, frame: Frame, showings: list[tuple[ClipTimeline, int]]) -> None:
        """The frame into every clip it is shown in, `count` times each; full batches are written."""
        writers = [(self._writer(plan, timeline), count) for timeline, count in showings]
        # Converted once, however many clips and repeats show it; but a YUV frame goes to the
        # encoder itself (which stamps it), so clips on different threads each get their own.
        picture = plan.picture(frame)
        for index, (writer, count) in enumerate(writers):
            if index and isinstance(picture, av.VideoFrame) and self.lanes.side_by_side:
                picture = plan.picture(frame)
            for _ in range(count):
                writer.pending.append(picture)
                if len(writer.pending) >= self.parts.batch_size:
                    self.lanes.write(writer, writer.take_pending())
            if writer.timeline.finished:
                self._finish(writer)

    def _writer(self, plan: PicturePlan, timeline: ClipTimeline) -> ClipWriter:
        writer = self.writers.get(timeline.clip)
        if writer is None:
            parts = self.parts
            writer = self.writers[timeline.clip] = ClipWriter(
                timeline,
                self.output_dir / self.video_id / timeline.clip.file_name(self.video_id),
                plan,
                lambda path: parts.encoders(path, parts.width, parts.height, parts.fps),
                parts.device,
                parts.write_alpha,
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
