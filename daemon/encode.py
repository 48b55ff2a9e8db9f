"""Encoding one clip as a raw HEVC (Annex-B) stream with libx265, into the file it is given (the
clip's `.part` file: daemon.partfile publishes it)."""

from __future__ import annotations

import contextlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.bitstream import BitStreamFilterContext
from av.container import OutputContainer
from av.video.frame import PictureType
from av.video.reformatter import ColorRange, Colorspace, VideoReformatter
from av.video.stream import VideoStream

from daemon.config import EncodeSettings
from daemon.frames import ClipEncoder, EncodeError, PictureFormat, Pictures
from daemon.partfile import PART_SUFFIX, final_name


def x265_params(settings: EncodeSettings, threads: int = 0) -> str:
    """libx265's options, on `threads` threads (encode.threads when set; 0: libx265's own choice,
    every core). One thread means one frame at a time too: the bytes then do not depend on the
    machine or on what runs beside it."""
    params = {
        "crf": f"{settings.crf:g}",
        # VBR with a ceiling: constant quality, but never above max_bitrate over the VBV buffer.
        "vbv-maxrate": str(settings.max_bitrate_kbps),
        "vbv-bufsize": str(settings.buffer_kbits),
        "keyint": str(settings.gop),
        "min-keyint": str(min(settings.gop, 25)),
        "colorprim": "bt709",
        "transfer": "bt709",
        "colormatrix": "bt709",
        "range": "limited",
        "repeat-headers": "1",
        "log-level": "error",
        "info": "0",
    }
    threads = settings.threads or threads
    if settings.deterministic or threads == 1:
        params["pools"] = "1"
        params["frame-threads"] = "1"
    elif threads:
        params["pools"] = str(threads)
        params["frame-threads"] = str(min(threads, 4))
    return ":".join(f"{k}={v}" for k, v in params.items())


class X265Encoder:
    """libx265 through PyAV, on the CPU."""

    accepts = frozenset({PictureFormat.HOST_RGB, PictureFormat.YUV420})

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        fps: Fraction,
        settings: EncodeSettings,
        threads: int = 0,
    ) -> None:
        self.path = path  # where the bytes go
        self.name = final_name(path)  # the clip's, for messages
        self.width = width
        self.height = height
        self.frames_written = 0
        self._container: OutputContainer | None = av.open(str(path), mode="w", format="hevc")
        stream = self._container.add_stream("libx265", rate=fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1) / fps
        context = stream.codec_context
        context.colorspace = Colorspace.ITU709
        context.color_range = ColorRange.MPEG
        context.color_primaries = 1
        context.color_trc = 1
        stream.options = {"preset": settings.preset, "x265-params": x265_params(settings, threads)}
        self._stream: VideoStream | None = stream
        self._reformatter = VideoReformatter()
        self._time_base = Fraction(1) / fps

    def write(self, pictures: Pictures) -> None:
        if isinstance(pictures, list):  # YUV frames, already BT.709 limited range at the output size
            for frame in pictures:
                self._encode(frame)
            return
        if not isinstance(pictures, np.ndarray):
            raise EncodeError(f"{self.name}: libx265 takes host pictures, not {type(pictures).__name__}")
        for image in pictures:
            layout = "gray" if image.ndim == 2 else "rgb24"
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=layout)
            self._encode(
                self._reformatter.reformat(
                    frame,
                    format="yuv420p",
                    dst_colorspace=Colorspace.ITU709,
                    dst_color_range=ColorRange.MPEG,
                )
            )

    def _encode(self, frame: av.VideoFrame) -> None:
        # A decoded frame keeps its source picture type, and libx265 would obey it: the source's
        # keyframes and P-frames would replace our GOP and B-frames.
        frame.pict_type = PictureType.NONE
        frame.pts = self.frames_written
        frame.time_base = self._time_base
        container, stream = self._live()
        container.mux(stream.encode(frame))
        self.frames_written += 1

    def _live(self) -> tuple[OutputContainer, VideoStream]:
        if self._container is None or self._stream is None:
            raise EncodeError(f"{self.name}: the encoder is closed")
        return self._container, self._stream

    def _close(self) -> None:
        """Close the file and let go of libx265 at once: its pictures (see the README for how much)
        are freed here, on the thread that finishes the clip, not whenever this object is dropped."""
        container, self._container, self._stream = self._container, None, None
        if container is not None:
            container.close()

    def finish(self) -> None:
        container, stream = self._live()
        container.mux(stream.encode(None))
        self._close()

    def abort(self) -> None:
        # Closing a broken encoder must not hide the error that broke it.
        with contextlib.suppress(Exception):
            self._close()


class X265Encoders:
    """Opens libx265 encoders on `threads` threads each (see `x265_params`)."""

    accepts = X265Encoder.accepts

    def __init__(self, settings: EncodeSettings, threads: int = 0) -> None:
        self.settings = settings
        self.threads = threads

    def __call__(self, path: Path, width: int, height: int, fps: Fraction) -> ClipEncoder:
        return X265Encoder(path, width, height, fps, self.settings, self.threads)


# H.273 code points: BT.709 primaries, transfer and matrix; limited ("video") range.
BT709_TAGS = "colour_primaries=1:transfer_characteristics=1:matrix_coefficients=1:video_full_range_flag=0"


def tag_bt709(raw_path: Path, tagged_path: Path) -> int:
    """Copy a raw HEVC stream, marking every sequence parameter set as BT.709 limited range.

    Encoders that take NV12 (NVENC) leave the colour description out unless asked through options
    their bindings may not expose; players then guess, often BT.601. Rewriting the parameter sets
    with FFmpeg's hevc_metadata filter tags the stream the same way as the libx265 path, whatever
    the encoder did. The pictures themselves are copied bit for bit. Returns the packet count."""
    packets = 0
    with (
        av.open(str(raw_path), format="hevc") as source,
        av.open(str(tagged_path), "w", format="hevc") as target,
    ):
        in_stream = source.streams.video[0]
        out_stream = target.add_stream_from_template(in_stream)
        tagger = BitStreamFilterContext(f"hevc_metadata={BT709_TAGS}", in_stream, out_stream)
        for packet in source.demux(in_stream):
            # The demuxer ends with an empty packet; None is how the filter is told to flush.
            for tagged in tagger.filter(packet if packet.size else None):
                tagged.stream = out_stream
                target.mux(tagged)
                packets += 1
    return packets


def remove_partial_files(root: Path) -> int:
    """Delete `.part` files a killed run left behind; none of them is ever a finished clip."""
    removed = 0
    if not root.is_dir():
        return 0
    for part in root.glob(f"*/*{PART_SUFFIX}"):
        part.unlink(missing_ok=True)
        removed += 1
    return removed
