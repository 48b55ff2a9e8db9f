"""Reading a downloaded video: probe it, then decode forward from a time, seeking only to skip gaps."""

from __future__ import annotations

import itertools
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import av.container
import av.error
import av.video.stream
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, Interpolation, VideoReformatter

from daemon.arrival import ArrivingFile, ReadInterrupted, media_input
from daemon.colour import ColourError, SdrConversion, describe, needs_mapping
from daemon.frames import PictureFormat
from daemon.geometry import DisplayGeometry, Orientation, sample_aspect


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
    geometry: DisplayGeometry | None = None  # how it is shown, when not as stored
    colour: str = ""  # its transfer and primaries where they are not SDR BT.709's (daemon.colour)

    def describe(self) -> str:
        """The source line of the log: codec, stored size, rate, length, and how it is shown."""
        line = (
            f"source {self.codec} {self.width}x{self.height} "
            f"{self.average_fps or 0:.3f} fps, {self.duration_seconds or 0:.1f}s"
        )
        shown = self.geometry.describe() if self.geometry is not None else ""
        return ", ".join(part for part in (line, shown, self.colour) if part)


@dataclass
class SourceFrame:
    """A decoded frame and the moment it appears on screen, in seconds from the stream's start.

    Its width, height and pictures are the picture as a player shows it: turned upright by the
    display matrix and in square pixels (daemon.geometry); sizes asked of it are sizes on screen."""

    frame: av.VideoFrame
    pts_seconds: Fraction
    duration_seconds: Fraction | None
    # Shared by every frame of a source: a scaler context is costly to set up for each frame.
    reformatter: VideoReformatter = field(default_factory=VideoReformatter)
    geometry: DisplayGeometry | None = None  # None: square pixels, shown as stored
    # Shared too: HDR and wide-gamut frames are converted to BT.709 SDR by it (daemon.colour).
    sdr: SdrConversion = field(default_factory=SdrConversion)

    @property
    def width(self) -> int:
        return self._shown_size[0]

    @property
    def height(self) -> int:
        return self._shown_size[1]

    @property
    def _shown_size(self) -> tuple[int, int]:
        if self.geometry is None:
            return int(self.frame.width), int(self.frame.height)
        return self.geometry.size

    @property
    def _orientation(self) -> Orientation:
        return self.geometry.orientation if self.geometry is not None else Orientation()

    def _stored_size(self, size: tuple[int, int] | None) -> tuple[int, int] | None:
        """The size to scale the stored picture to for `size` on screen; None: as stored."""
        if size is None:
            if self.geometry is None or self.geometry.sample_aspect == 1:
                return None
            size = self.geometry.size  # square pixels need a scale even at the size shown
        return self._orientation.stored_size(size)

    def to_rgb(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """(height, width, 3) uint8, full range, using the colour matrix the stream declares.

        `size` (width, height) scales in the same pass as the colour conversion, which on the CPU
        costs far less than scaling the RGB picture afterwards; the picture is then turned upright.
        """
        stored = self._stored_size(size)
        rgb = self._mapped(stored, "rgb24") if self._needs_mapping else self._reformatted_rgb(stored)
        orientation = self._orientation
        if orientation.upright:
            return rgb.to_ndarray()
        return np.ascontiguousarray(orientation.apply(rgb.to_ndarray()))

    @property
    def _needs_mapping(self) -> bool:
        return needs_mapping(self.frame.color_trc, self.frame.color_primaries)

    def _mapped(self, size: tuple[int, int] | None, pixel_format: str) -> av.VideoFrame:
        """HDR or wide gamut: tone and gamut mapped to BT.709 SDR while scaling (daemon.colour)."""
        try:
            return self.sdr.convert(self.frame, size or (self.frame.width, self.frame.height), pixel_format)
        except ColourError as exc:
            raise SourceError(str(exc)) from exc

    def _reformatted_rgb(self, size: tuple[int, int] | None) -> av.VideoFrame:
        colorspace, color_range = self._declared_colour()
        width, height = size or (None, None)
        return self.reformatter.reformat(
            self.frame,
            format="rgb24",
            width=width,
            height=height,
            src_colorspace=colorspace,
            src_color_range=color_range,
            dst_color_range=ColorRange.JPEG,
            interpolation=Interpolation.BICUBIC,
            threads=1,
        )

    def _declared_colour(self) -> tuple[int, int]:
        return declared_colour(self.frame.colorspace, self.frame.color_range, self.frame.height)

    def to_yuv420(self, size: tuple[int, int], window: tuple[int, int, int, int]) -> av.VideoFrame:
        """Scaled to `size`, then cut to `window` (left, top, width, height), staying in yuv420p.

        One pass that scales and converts to BT.709 limited range, and no RGB round trip: what the
        encoder needs when no stage looks at the pixels. `size` and `window` are on screen: the
        stored picture is scaled to the turned size, and its planes turned before the cut.
        """
        stored = self._stored_size(size) or size
        scaled = self._mapped(stored, "yuv420p") if self._needs_mapping else self._reformatted_yuv(stored)
        left, top, out_width, out_height = window
        orientation = self._orientation
        if (left, top, out_width, out_height) != (0, 0, *size) or not orientation.upright:
            left, top = left & ~1, top & ~1  # chroma is subsampled by two
            luma, *chroma = (orientation.apply(_plane(scaled, index)) for index in (0, 1, 2))
            planes = [luma[top : top + out_height, left : left + out_width]]
            for plane in chroma:
                planes.append(plane[top // 2 : (top + out_height) // 2, left // 2 : (left + out_width) // 2])
            packed = np.concatenate([plane.reshape(-1) for plane in planes]).reshape(-1, out_width)
            scaled = av.VideoFrame.from_ndarray(packed, format="yuv420p")
        scaled.colorspace = Colorspace.ITU709
        scaled.color_range = ColorRange.MPEG
        return scaled

    def _reformatted_yuv(self, size: tuple[int, int]) -> av.VideoFrame:
        width, height = size
        colorspace, color_range = self._declared_colour()
        interpolation = Interpolation.BICUBIC
        if (colorspace, color_range) != (Colorspace.ITU709, ColorRange.MPEG):
            # Exact rounding: without it, converting between YUV matrices drifts by several levels.
            interpolation |= Interpolation.ACCURATE_RND
        return self.reformatter.reformat(
            self.frame,
            width=width,
            height=height,
            format="yuv420p",
            src_colorspace=colorspace,
            dst_colorspace=Colorspace.ITU709,
            src_color_range=color_range,
            dst_color_range=ColorRange.MPEG,
            interpolation=interpolation,
            # One thread: the worker's other threads (decoder, encoders) have the other cores, and
            # handing slices of a small picture to a pool costs more than it saves.
            threads=1,
        )


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


# Frame rates a camera or an encoder really uses: whole numbers, and the NTSC ones (30000/1001 …).
_GRID_DENOMINATORS = (1, 1001)


def _frame_grid(stream: av.video.stream.VideoStream) -> Fraction | None:
    """The constant frame rate a stream declares, when it is one of the usual ones; else None."""
    for rate in (stream.guessed_rate, stream.average_rate):
        if rate and Fraction(rate).denominator in _GRID_DENOMINATORS:
            return Fraction(rate)
    return None


@dataclass(frozen=True)
class StreamClock:
    """Turns a stream's timestamps into seconds from its start, and back.

    Containers with a coarse time base round timestamps: WebM keeps whole milliseconds, so 30 fps
    frames are stamped 0, 33, 67, 100 ms, and frame 2 (67 ms) would seem not yet on screen at
    2/30 s = 66.7 ms. A timestamp within one tick of the declared frame grid is read as the grid
    moment it stands for. Exact time bases are unchanged by this (their stamps sit on the grid),
    and so are variable-rate streams' stamps that lie between grid moments.
    """

    time_base: Fraction
    origin: int
    frame_rate: Fraction | None = None

    def seconds(self, pts: int) -> Fraction:
        exact = Fraction(pts - self.origin) * self.time_base
        if self.frame_rate is None:
            return exact
        on_grid = Fraction(round(exact * self.frame_rate)) / self.frame_rate
        return on_grid if abs(on_grid - exact) <= self.time_base else exact

    def pts(self, seconds: Fraction) -> int:
        """The timestamp of `seconds`, rounded down: a backward seek to it stays at or before."""
        return int(seconds / self.time_base) + self.origin


class VideoSource:
    """One video stream of a media file, decoded forward on the CPU."""

    picture_formats = frozenset({PictureFormat.HOST_RGB, PictureFormat.YUV420})

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.path = path
        self._files: list[ArrivingFile] = []  # what it reads a file still downloading through
        self._index_container: av.container.InputContainer | None = None
        try:
            self._container = av.open(self._opened(path), mode="r")
        except (av.error.FFmpegError, OSError) as exc:
            self.close_files()
            raise SourceError(f"{path.name}: cannot open as video: {exc}") from exc
        except ReadInterrupted as exc:  # a signal while the read waited for bytes: as itself
            self.close_files()
            raise exc.reason from None
        except BaseException:  # the download it reads failed, or a stop: nothing stays open
            self.close_files()
            raise
        if not self._container.streams.video:
            self.close()
            raise SourceError(f"{path.name}: has no video stream")
        self.stream = self._container.streams.video[0]
        self.stream.thread_type = "AUTO"
        if threads:
            self.stream.codec_context.thread_count = threads
        if self.stream.time_base is None:
            raise SourceError(f"{path.name}: video stream has no time base")
        self.time_base = Fraction(self.stream.time_base)
        self._reformatter = VideoReformatter()
        self._sdr = SdrConversion()
        self._decoded_any = False
        start = self.stream.start_time
        self._origin = start if start is not None else 0
        rate = self.stream.average_rate or self.stream.guessed_rate
        self._nominal_frame_seconds = Fraction(1) / Fraction(rate) if rate else Fraction(1, 30)
        self.clock = StreamClock(self.time_base, self._origin, _frame_grid(self.stream))
        context = self.stream.codec_context
        self._sample_aspect = sample_aspect(self.stream.sample_aspect_ratio or context.sample_aspect_ratio)
        self._geometry: DisplayGeometry | None = None  # known from the first frame decoded
        # A frame decoded only to learn the geometry, and the decoding it came from: the walk
        # starts with it, so that knowing the geometry costs no second reader (a pipe has one).
        self._peeked: av.VideoFrame | None = None
        self._peeked_from: Iterator[av.VideoFrame] | None = None

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()
        if self._index_container is not None:
            self._index_container.close()
        self.close_files()

    def close_files(self) -> None:
        for file in self._files:
            file.close()

    def _opened(self, path: Path) -> str | ArrivingFile:
        opened = media_input(path)
        if isinstance(opened, ArrivingFile):
            self._files.append(opened)
        return opened

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
            geometry=self.geometry,
            colour=self.colour,
        )

    @property
    def colour(self) -> str:
        """Its transfer and primaries where they are not SDR BT.709's, as the first frame says."""
        first = self._peek()
        source = first if first is not None else self.stream.codec_context
        return describe(source.color_trc, source.color_primaries)

    @property
    def geometry(self) -> DisplayGeometry:
        """How the stream is shown: its sample aspect ratio and the first frame's display matrix."""
        if self._geometry is None:
            first = self._peek()
            self._geometry = self._geometry_of(first)
        return self._geometry

    def _geometry_of(self, frame: av.VideoFrame | None) -> DisplayGeometry:
        context = self.stream.codec_context
        orientation = Orientation.of_frame(frame) if frame is not None else Orientation()
        return DisplayGeometry(context.width, context.height, self._sample_aspect, orientation)

    def _peek(self) -> av.VideoFrame | None:
        """The first frame, decoded ahead of the walk; None once the walk has begun, or if none."""
        if self._decoded_any or self._peeked_from is not None:
            return self._peeked
        self._peeked_from = iter(self._container.decode(self.stream))
        try:
            self._peeked = next(self._peeked_from, None)
        except av.error.FFmpegError as exc:
            raise SourceError(f"{self.path.name}: decoding failed: {exc}") from exc
        except ReadInterrupted as exc:
            raise exc.reason from None
        return self._peeked

    def frames(self, from_seconds: Fraction = Fraction(0)) -> Generator[SourceFrame, None, None]:
        """Frames in presentation order, from the keyframe the index puts at or before `from_seconds`.

        An index can be wrong, so the first frame may come later than `from_seconds`;
        `daemon.walk.FrameWalk` checks that and decides what to do about it.
        """
        if from_seconds > 0 or self._decoded_any:
            self._seek(max(from_seconds, Fraction(0)))
        # else the reader is at the start already; not seeking lets a pipe be a source
        return self._decode()

    def keyframe_seconds(self, at_or_before: Fraction) -> Fraction | None:
        """Where a seek to `at_or_before` would land: the keyframe the index puts there, or None.

        Asked of a second, demux-only reader, so the decoder keeps its place: whether a seek would
        move forward at all is known before the frames decoded so far are given up.
        """
        try:
            if self._index_container is None:
                self._index_container = av.open(self._opened(self.path), mode="r")
            container = self._index_container
            stream = container.streams.video[0]  # the same stream as the decoder's
            target = self.clock.pts(at_or_before)
            container.seek(target, backward=True, any_frame=False, stream=stream)
            for packet in container.demux(stream):
                if packet.pts is None:
                    continue
                if packet.is_keyframe:
                    return self.clock.seconds(int(packet.pts))
                if packet.pts > target:
                    return None  # no keyframe at or before the target where the seek landed
        except (av.error.FFmpegError, OSError):
            return None
        except ReadInterrupted as exc:
            raise exc.reason from None
        return None

    @property
    def width(self) -> int:
        """On screen: upright and in square pixels, as its frames are."""
        return self.geometry.size[0]

    @property
    def height(self) -> int:
        return self.geometry.size[1]

    def skip_unreferenced(self, skip: bool) -> None:
        """Drop frames no other frame references (B-frames, mostly) while nothing will show them."""
        self.stream.codec_context.skip_frame = "NONREF" if skip else "DEFAULT"

    def _seek(self, seconds: Fraction) -> None:
        self._peeked, self._peeked_from = None, None
        self._decoded_any = True  # the peeked frame, if any, is gone: its decoding is not resumed
        try:
            self._container.seek(self.clock.pts(seconds), backward=True, any_frame=False, stream=self.stream)
        except av.error.FFmpegError as exc:
            raise SourceError(f"{self.path.name}: cannot seek to {float(seconds):.3f}s: {exc}") from exc
        except ReadInterrupted as exc:
            raise exc.reason from None

    def _decode(self) -> Generator[SourceFrame, None, None]:
        last_pts: int | None = None
        if self._peeked_from is not None:
            decoded: Iterator[av.VideoFrame] = self._peeked_from
            if self._peeked is not None:
                decoded = itertools.chain([self._peeked], decoded)
            self._peeked, self._peeked_from = None, None
        else:
            decoded = self._container.decode(self.stream)
        try:
            for frame in decoded:
                self._decoded_any = True
                if self._geometry is None:
                    self._geometry = self._geometry_of(frame)
                geometry = None if self._geometry.plain else self._geometry
                pts = frame.pts if frame.pts is not None else frame.dts
                if pts is None:
                    continue
                if last_pts is not None and pts <= last_pts:
                    continue  # duplicate or out-of-order timestamps: the first one wins
                last_pts = pts
                duration = Fraction(frame.duration) * self.time_base if frame.duration else None
                yield SourceFrame(
                    frame, self.clock.seconds(pts), duration, self._reformatter, geometry, self._sdr
                )
        except av.error.FFmpegError as exc:
            raise SourceError(f"{self.path.name}: decoding failed: {exc}") from exc
        except ReadInterrupted as exc:  # a signal while a read waited for bytes: as itself
            raise exc.reason from None

    @property
    def nominal_frame_seconds(self) -> Fraction:
        return self._nominal_frame_seconds


def probe(path: Path) -> SourceInfo:
    """Open the file and decode its first frame, so a truncated or non-video file fails here."""
    with VideoSource(path) as source:
        info = source.info
        if next(source.frames(), None) is None:
            raise SourceError(f"{path.name}: no decodable video frame")
    return info
