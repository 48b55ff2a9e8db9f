"""What a cut is given and what it gives back: the cutter's parts (chosen once per worker, by
daemon.backends), one job (a source and its clips), and the outcome.

The modules that run the frame loop (daemon.cutter, daemon.writers, daemon.parts) take these and
read no settings: every choice (decoder, encoder, stages, lanes, threads) is made before them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from daemon.clips import Clip
from daemon.failures import Failure
from daemon.frames import EncoderFactory, FrameSource
from daemon.messages import ClipResult
from daemon.stages.base import Stage

if TYPE_CHECKING:
    import torch


class ProgressSink(Protocol):
    def clip_finished(self, result: ClipResult) -> None: ...

    def frames_encoded(self, count: int) -> None: ...

    def frame_decoded(self) -> None:
        """Called for every decoded frame, shown or not: the sign of life a watchdog waits for."""

    def waiting(self, seconds: float) -> None:
        """About to wait this long on purpose (for a GPU slot): not a stall."""


class ForwardingSink:
    """A progress sink that passes everything on to `sink`: a sink that adds to one thing (say,
    remembering the clips finished) overrides that method alone."""

    def __init__(self, sink: ProgressSink) -> None:
        self.sink = sink

    def clip_finished(self, result: ClipResult) -> None:
        self.sink.clip_finished(result)

    def frames_encoded(self, count: int) -> None:
        self.sink.frames_encoded(count)

    def frame_decoded(self) -> None:
        self.sink.frame_decoded()

    def waiting(self, seconds: float) -> None:
        self.sink.waiting(seconds)


# Opens a decoder on a source file, with this many decoding threads (where the decoder has any).
SourceOpener = Callable[[Path, int], FrameSource]


@dataclass(frozen=True)
class CutterParts:
    """Everything the cutter works with, decided once: it decides nothing from what it is given."""

    open_source: SourceOpener
    encoders: EncoderFactory
    stages: tuple[Stage, ...]
    device: torch.device | str  # where the stages compute
    width: int  # the clips' size and rate
    height: int
    fps: Fraction
    clip_fps: Fraction  # the rate the clips' frame numbers count in
    seek_threshold_seconds: Fraction  # a gap longer than this is sought over, not decoded
    lanes: int  # clips written at once, each on its own thread (1: on the decoding thread)
    batch_size: int  # pictures per call into the stages and the encoder
    buffer_bytes: int  # pictures the decoder may queue ahead for the lanes
    write_alpha: bool  # a matte a stage makes goes to its own `.alpha.hevc` stream
    decoder_threads: int
    part_decoder_threads: int  # each decoder's, when parts of a source are cut side by side
    decodes_in_parts: bool  # clips far apart may be cut by decoders of their own, a lane each

    def open(self, path: Path) -> FrameSource:
        return self.open_source(path, self.decoder_threads)

    def for_one_part(self) -> CutterParts:
        """The parts of one of several decoders cutting a source side by side: the same opener
        and encoders, one lane (the part's thread), its share of the decoding threads."""
        return replace(self, lanes=1, decoder_threads=self.part_decoder_threads, decodes_in_parts=False)


def no_stop() -> bool:
    return False


@dataclass(frozen=True)
class CutJob:
    """One source's clips to cut, where they go and who hears about it."""

    source_path: Path
    video_id: str
    clips: list[Clip]
    output_dir: Path
    sink: ProgressSink
    should_stop: Callable[[], bool] = field(default=no_stop)
    # Still downloading (daemon.arrival): read front to back, in one pass.
    arriving: bool = False
    # How many lanes a clip starting now may use, where that changes as the source is cut (the
    # cores other workers left since it began); None: the parts' lanes throughout.
    lanes_now: Callable[[], int] | None = None


@dataclass(frozen=True)
class VideoOutcome:
    results: list[ClipResult]
    interrupted: bool  # a stop request left clips unstarted; they stay pending


def failed_clip(clip: Clip, failure: Failure) -> ClipResult:
    """A clip not made, and why: nothing written, no file."""
    return ClipResult(clip.start_frame, clip.end_frame, None, 0, 0, failure=failure)
