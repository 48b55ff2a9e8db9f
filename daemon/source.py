"""Reading a downloaded video: probe it, then decode forward from a time, seeking only to skip gaps."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Protocol, TypeVar

import av
import av.error
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, Interpolation, VideoReformatter


class SourceError(Exception):
    """The source cannot be opened or decoded; the message says why."""


@dataclass(frozen=True)
class SourceInfo:
    path: str
    codec: str
    width: int
    height: int
    average_fps: float | None
    duration_seconds: float | None
    frames: int | None


@dataclass
class SourceFrame:
    """A decoded frame and the moment it appears on screen, in seconds from the stream's start."""

    frame: av.VideoFrame
    seconds: Fraction
    duration_seconds: Fraction | None
    # Shared by every frame of a source: a scaler context is costly to set up for each frame.
    reformatter: VideoReformatter = field(default_factory=VideoReformatter)

    def to_rgb(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """(height, width, 3) uint8, full range, using the colour matrix the stream declares.

        `size` (width, height) scales in the same pass as the colour conversion, which on the CPU
        costs far less than scaling the RGB picture afterwards.
        """
        colorspace, color_range = self._declared_colour()
        width, height = size if size is not None else (None, None)
        rgb = self.reformatter.reformat(
            self.frame,
            format="rgb24",
            width=width,
            height=height,
            src_colorspace=colorspace,
            src_color_range=color_range,
            dst_color_range=ColorRange.JPEG,
            interpolation=Interpolation.BICUBIC,
        )
        return rgb.to_ndarray()

    def _declared_colour(self) -> tuple[int, int]:
        return declared_colour(self.frame.colorspace, self.frame.color_range, self.frame.height)

    def to_yuv420(self, size: tuple[int, int], window: tuple[int, int, int, int]) -> av.VideoFrame:
        """Scaled to `size`, then cut to `window` (left, top, width, height), staying in yuv420p.

        One pass that scales and converts to BT.709 limited range, and no RGB round trip: what the
        encoder needs when no stage looks at the pixels.
        """
        width, height = size
        colorspace, color_range = self._declared_colour()
        interpolation = Interpolation.BICUBIC
        if (colorspace, color_range) != (Colorspace.ITU709, ColorRange.MPEG):
            # Exact rounding: without it, converting between YUV matrices drifts by several levels.
            interpolation |= Interpolation.ACCURATE_RND
        scaled = self.reformatter.reformat(
            self.frame,
            width=width,
            height=height,
            format="yuv420p",
            src_colorspace=colorspace,
            dst_colorspace=Colorspace.ITU709,
            src_color_range=color_range,
            dst_color_range=ColorRange.MPEG,
            interpolation=interpolation,
        )
        left, top, out_width, out_height = window
        if (left, top, out_width, out_height) != (0, 0, width, height):
            left, top = left & ~1, top & ~1  # chroma is subsampled by two
            planes = [_plane(scaled, 0)[top : top + out_height, left : left + out_width]]
            for index in (1, 2):
                chroma = _plane(scaled, index)
                planes.append(chroma[top // 2 : (top + out_height) // 2, left // 2 : (left + out_width) // 2])
            packed = np.concatenate([plane.reshape(-1) for plane in planes]).reshape(-1, out_width)
            scaled = av.VideoFrame.from_ndarray(packed, format="yuv420p")
        scaled.colorspace = Colorspace.ITU709
        scaled.color_range = ColorRange.MPEG
        return scaled


# H.273 matrix code points that swscale converts with their own coefficients: BT.709, FCC, BT.470 BG,
# SMPTE 170M, SMPTE 240M and BT.2020. Any other value (2 is "unspecified") is a guess to make.
KNOWN_MATRICES = (1, 4, 5, 6, 7, 9)


def declared_colour(colorspace: int, color_range: int, height: int) -> tuple[int, int]:
    """(matrix, range) to read a picture with: what it declares, or the usual guess where it is silent.

    Unspecified matrices are BT.709 for HD and BT.601 for SD, as players assume; unspecified range is
    limited. Both decoding paths use this, so a clip looks the same whichever decoded it."""
    # Compared with FFmpeg's numbers, not PyAV's Colorspace: its DEFAULT is 5, which is BT.601 itself.
    if colorspace not in KNOWN_MATRICES:
        colorspace = Colorspace.ITU709 if height >= 600 else Colorspace.ITU601
    if color_range not in (ColorRange.MPEG, ColorRange.JPEG):
        color_range = ColorRange.MPEG
    return int(colorspace), int(color_range)


def _plane(frame: av.VideoFrame, index: int) -> np.ndarray:
    plane = frame.planes[index]
    rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width]


class VideoSource:
    """One video stream of a media file, decoded forward."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.path = path
        try:
            self._container = av.open(str(path), mode="r")
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceError(f"{path.name}: cannot open as video: {exc}") from exc
        if not self._container.streams.video:
            self._container.close()
            raise SourceError(f"{path.name}: has no video stream")
        self.stream = self._container.streams.video[0]
        self.stream.thread_type = "AUTO"
        if threads:
            self.stream.codec_context.thread_count = threads
        if self.stream.time_base is None:
            raise SourceError(f"{path.name}: video stream has no time base")
        self.time_base = Fraction(self.stream.time_base)
        self._reformatter = VideoReformatter()
        start = self.stream.start_time
        self._origin = start if start is not None else 0
        rate = self.stream.average_rate or self.stream.guessed_rate
        self._nominal_frame_seconds = Fraction(1) / Fraction(rate) if rate else Fraction(1, 30)

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    @property
    def info(self) -> SourceInfo:
        stream = self.stream
        duration = None
        if stream.duration is not None:
            duration = float(stream.duration * self.time_base)
        elif self._container.duration is not None:
            duration = self._container.duration / av.time_base
        rate = stream.average_rate or stream.guessed_rate
        return SourceInfo(
            path=str(self.path),
            codec=stream.codec_context.name,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            average_fps=float(rate) if rate else None,
            duration_seconds=duration,
            frames=stream.frames or None,
        )

    def frames(self, from_seconds: Fraction = Fraction(0)) -> Generator[SourceFrame, None, None]:
        """Frames in presentation order whose display interval reaches `from_seconds` or later.

        Seeks to the keyframe at or before `from_seconds`; if the container's index put us past it,
        falls back to decoding from the start so no frame on screen at `from_seconds` is missed.
        """
        return decode_from(from_seconds, self._decode_after_seek, self._decode_from_start)

    def _decode_after_seek(self, seconds: Fraction) -> Generator[SourceFrame, None, None]:
        self._seek(seconds)
        return self._decode()

    def _decode_from_start(self) -> Generator[SourceFrame, None, None]:
        self._seek(Fraction(0))
        return self._decode()

    def _seek(self, seconds: Fraction) -> None:
        target = int(seconds / self.time_base) + self._origin
        try:
            self._container.seek(target, backward=True, any_frame=False, stream=self.stream)
        except av.error.FFmpegError as exc:
            raise SourceError(f"{self.path.name}: cannot seek to {float(seconds):.3f}s: {exc}") from exc

    def _decode(self) -> Generator[SourceFrame, None, None]:
        last_pts: int | None = None
        try:
            for frame in self._container.decode(self.stream):
                pts = frame.pts if frame.pts is not None else frame.dts
                if pts is None:
                    continue
                if last_pts is not None and pts <= last_pts:
                    continue  # duplicate or out-of-order timestamps: the first one wins
                last_pts = pts
                duration = Fraction(frame.duration) * self.time_base if frame.duration else None
                yield SourceFrame(
                    frame, Fraction(pts - self._origin) * self.time_base, duration, self._reformatter
                )
        except av.error.FFmpegError as exc:
            raise SourceError(f"{self.path.name}: decoding failed: {exc}") from exc

    @property
    def nominal_frame_seconds(self) -> Fraction:
        return self._nominal_frame_seconds


class _Timed(Protocol):
    seconds: Fraction


Frame = TypeVar("Frame", bound=_Timed)


def decode_from(
    from_seconds: Fraction,
    after_seek: Callable[[Fraction], Iterator[Frame] | None],
    from_start: Callable[[], Iterator[Frame]],
) -> Generator[Frame, None, None]:
    """Frames from the one on screen at `from_seconds` on, for any decoder that can seek.

    `after_seek` decodes from the keyframe the index puts at or before that moment (None when it
    cannot seek). An index can be wrong: if the first frame lands after the moment, decoding starts
    again from the beginning, so the frame on screen then is never missed.
    """
    if from_seconds > 0:
        iterator = after_seek(from_seconds)
        if iterator is not None:
            first = next(iterator, None)
            if first is None or first.seconds <= from_seconds:
                if first is not None:
                    yield first
                yield from iterator
                return
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
    yield from from_start()


def probe(path: Path) -> SourceInfo:
    """Open the file and decode its first frame, so a truncated or non-video file fails here."""
    with VideoSource(path) as source:
        info = source.info
        if next(source.frames(), None) is None:
            raise SourceError(f"{path.name}: no decodable video frame")
    return info
