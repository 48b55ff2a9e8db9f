"""Test videos that carry their own frame index in the picture, and a reader for it."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from daemon.backends import cpu_parts
from daemon.clips import Clip
from daemon.config import Settings, load_settings
from daemon.cutter import ClipCutter
from daemon.cutting import CutJob
from daemon.messages import ClipResult
from daemon.stages import build_stages

BITS = 10  # horizontal bands, most significant on top: up to 1024 distinct frames


def index_image(index: int, width: int, height: int) -> np.ndarray:
    """An RGB frame whose horizontal bands spell `index` in binary (white = 1)."""
    image = np.zeros((height, width, 3), np.uint8)
    for bit in range(BITS):
        if index >> (BITS - 1 - bit) & 1:
            image[round(bit * height / BITS) : round((bit + 1) * height / BITS)] = 255
    return image


def read_index(gray: np.ndarray) -> int:
    """Inverse of index_image on a decoded luma plane of any size."""
    height = gray.shape[0]
    band = height / BITS
    value = 0
    for bit in range(BITS):
        rows = gray[int(bit * band + band * 0.3) : int(bit * band + band * 0.7)]
        value = value << 1 | int(rows.mean() > 128)
    return value


def make_video(
    path: Path,
    fps: float = 30,
    frames: int = 60,
    width: int = 128,
    height: int = 80,
    codec: str = "libx264",
    timestamps: Sequence[float] | None = None,
    gop: int = 30,
    bframes: int = 0,
    open_gop: bool = False,
    time_base: Fraction | None = None,
    start_seconds: Fraction = Fraction(0),
    hidden_frames: bool = False,
    index_first: bool = False,
) -> Path:
    """Write a video whose frame i shows index i; `timestamps` (seconds) makes it variable-rate.

    `gop` frames between keyframes (0: only the first frame is one); `bframes` and `open_gop` for
    H.264; `time_base` overrides the stream's (the MP4 muxer keeps it, WebM always uses 1/1000);
    `start_seconds` makes the first frame's timestamp non-zero; `hidden_frames` lets VP9 write
    alt-ref frames that are decoded but never shown; `index_first` puts an MP4's index (`moov`)
    before the pictures, as web servers serve MP4s (else it comes last).
    """
    container_format = {"libx264": "mp4", "libvpx-vp9": "webm"}[codec]
    muxing = {"movflags": "faststart"} if index_first else {}
    with av.open(str(path), "w", format=container_format, options=muxing) as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        keyint = str(gop or 100000)
        if codec == "libx264":
            params = f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes={bframes}"
            if open_gop:
                params += ":open-gop=1"
            stream.options = {"preset": "ultrafast", "crf": "18", "x264-params": params}
        else:
            stream.options = {"crf": "20", "b": "0", "g": keyint}
            if hidden_frames:
                stream.options |= {
                    "deadline": "good",
                    "cpu-used": "8",
                    "auto-alt-ref": "1",
                    "lag-in-frames": "8",
                }
            else:
                stream.options |= {"deadline": "realtime", "cpu-used": "8"}
        if time_base is None:
            time_base = Fraction(1, 1000) if timestamps is not None else 1 / rate
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        count = len(timestamps) if timestamps is not None else frames
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(index_image(i, width, height), format="rgb24")
            moment = Fraction(timestamps[i]).limit_denominator(100000) if timestamps is not None else i / rate
            frame.pts = round((moment + start_seconds) / time_base)
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def decoded_indices(path: Path) -> list[int]:
    """The frame index shown by each frame of an encoded file (raw .hevc or any container)."""
    with av.open(str(path)) as container:
        return [read_index(frame.to_ndarray(format="gray")) for frame in container.decode(video=0)]


def stream_info(path: Path) -> tuple[str, int, int, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(video=0))
        return stream.codec_context.name, stream.codec_context.width, stream.codec_context.height, count


def frame_times(path: Path) -> list[Fraction]:
    """Presentation times in seconds, as the container stores them (webm rounds to milliseconds)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        origin = stream.start_time or 0
        return [Fraction(f.pts - origin) * Fraction(stream.time_base) for f in container.decode(stream)]


def settings(**overrides: object) -> Settings:
    base: dict[str, object] = {"output.width": 128, "output.height": 80, "encode.preset": "ultrafast"}
    base.update(overrides)
    return load_settings(None, base)


def cut(source: Path, clips: list[Clip], out: Path, config: Settings | None = None) -> dict[Clip, ClipResult]:
    config = config or settings()
    device = torch.device("cpu")
    sink = CollectedClips()
    ClipCutter(cpu_parts(config, build_stages(config, device))).run(CutJob(source, "vid", clips, out, sink))
    return {Clip(r.start_frame, r.end_frame): r for r in sink.results}


def expected(clip: Clip, source_times: list[Fraction], fps: float = 30, clip_fps: float = 30) -> list[int]:
    """The reference rule, written independently: the last source frame at or before each moment."""
    count = int(
        Fraction(clip.end_frame - clip.start_frame) * Fraction(fps) / Fraction(clip_fps) + Fraction(1, 2)
    )
    shown = []
    for k in range(count):
        moment = Fraction(clip.start_frame) / Fraction(clip_fps) + Fraction(k) / Fraction(fps)
        candidates = [i for i, t in enumerate(source_times) if t <= moment]
        shown.append(candidates[-1] if candidates else 0)
    return shown


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail instead of hanging: the walk's loop runs Python code, where SIGALRM interrupts it."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class CollectedClips:
    """A progress sink for ClipCutter.run that keeps what it is told."""

    def __init__(self) -> None:
        self.results: list[ClipResult] = []
        self.frames = 0
        self.decoded = 0

    def clip_finished(self, result: ClipResult) -> None:
        self.results.append(result)

    def frames_encoded(self, count: int) -> None:
        self.frames += count

    def frame_decoded(self) -> None:
        self.decoded += 1

    def waiting(self, seconds: float) -> None:
        pass
