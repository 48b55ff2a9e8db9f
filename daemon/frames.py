"""What flows through the pipeline: decoded frames, the pictures made of them, and the encoders
that take those pictures. Decoders (daemon.source, daemon.gpu.nvcodec) and encoders
(daemon.encode, daemon.gpu.nvcodec) implement these protocols; the cutter knows only these.

A decoder says which picture formats its frames give cheaply and an encoder which it accepts; the
cutter picks one per source from what the stages that run on it need, and has a single path.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias

if TYPE_CHECKING:  # a resize-only run never imports torch; PyAV and numpy come with every install
    import av
    import numpy as np
    import torch


class PictureFormat(enum.Enum):
    HOST_RGB = "host RGB"  # (H, W, 3) uint8 numpy array, full range
    DEVICE_RGB = "device RGB"  # (H, W, 3) uint8 torch tensor on a GPU, full range
    YUV420 = "YUV 4:2:0"  # av.VideoFrame, yuv420p, BT.709 limited range, at the output size


# One picture on its way to a clip: RGB on the host or a device, or YUV ready to encode.
Picture: TypeAlias = "np.ndarray | torch.Tensor | av.VideoFrame"
# A batch for an encoder: (N, H, W, 3) RGB or (N, H, W) luma uint8 (host or device), or YUV frames.
Pictures: TypeAlias = "np.ndarray | torch.Tensor | list[av.VideoFrame]"


class Frame(Protocol):
    """One decoded frame and its time on screen, in seconds from the stream's start."""

    @property
    def pts_seconds(self) -> Fraction: ...

    @property
    def duration_seconds(self) -> Fraction | None: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    def to_rgb(self, size: tuple[int, int] | None = None) -> np.ndarray | torch.Tensor:
        """(height, width, 3) uint8 RGB, scaled to `size` (width, height) in the same pass when given."""

    def to_yuv420(self, size: tuple[int, int], window: tuple[int, int, int, int]) -> av.VideoFrame:
        """Scaled to `size`, then cut to `window` (left, top, width, height), as BT.709 yuv420p."""


class FrameSource(Protocol):
    """A decoder, opened on one source file: what a walk along the clips needs of it."""

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    @property
    def nominal_frame_seconds(self) -> Fraction: ...

    @property
    def picture_formats(self) -> frozenset[PictureFormat]:
        """What its frames give without a trip between host and device; a host format also scales
        in the same pass."""

    def frames(self, from_seconds: Fraction = ...) -> Iterator[Frame]:
        """Decoded frames in presentation order, from the keyframe at or before `from_seconds`."""

    def keyframe_seconds(self, at_or_before: Fraction) -> Fraction | None:
        """Where a seek to that moment would land, without moving the decoder; None if unknown."""

    def skip_unreferenced(self, skip: bool) -> None:
        """Let the decoder drop frames no other frame references (B-frames), or stop doing so."""

    def __enter__(self) -> FrameSource: ...

    def __exit__(self, *exc: object) -> None: ...


class EncodeError(Exception):
    """An encoder cannot make this clip (it refused the pictures, or its output cannot be read)."""


class ClipEncoder(Protocol):
    """One clip's stream being encoded into the file it was opened on: bytes only (the `.part`
    file's naming, its frame-count check and its publishing are daemon.partfile's)."""

    frames_written: int
    accepts: frozenset[PictureFormat]

    def write(self, pictures: Pictures) -> None:
        """Append a batch of pictures in one of the formats in `accepts`."""

    def finish(self) -> None:
        """Flush the encoder and close the file: every byte of the stream is in it."""

    def abort(self) -> None:
        """Close, whatever state it is in, leaving the file to whoever opened it."""


class EncoderFactory(Protocol):
    """Opens a clip's encoder on the file at `path`; `accepts` is what every encoder it opens accepts."""

    accepts: frozenset[PictureFormat]

    def __call__(self, path: Path, width: int, height: int, fps: Fraction) -> ClipEncoder: ...
