"""How a source's frames become pictures for the stages and the encoder, and what moving a batch
of pictures between host, device and encoder takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import av
import numpy as np

from daemon.frames import ClipEncoder, Frame, FrameSource, Picture, PictureFormat, Pictures
from daemon.stages.base import ScaledByDecoder, Stage

if TYPE_CHECKING:  # resize-only runs pass numpy arrays and YUV frames; only the stages need tensors
    import torch


@dataclass(frozen=True)
class PicturePlan:
    """How one source's frames become pictures, chosen from the stages that run on that source
    (not from their names: an upscale a large source does not need costs no RGB round trip)."""

    stages: list[Stage]  # the stages that change frames of this source
    prescale: ScaledByDecoder | None  # the first stage, done by the decoder's scaler while converting colours
    yuv: bool  # no stage looks at the pixels: frames go to the encoder as YUV
    width: int
    height: int

    @classmethod
    def choose(
        cls,
        stages: Sequence[Stage],
        source: FrameSource,
        accepts: frozenset[PictureFormat],
        width: int,
        height: int,
    ) -> PicturePlan:
        running = [stage for stage in stages if stage.runs_on(source.width, source.height)]
        first = running[0] if running else None
        prescale = (
            first
            if isinstance(first, ScaledByDecoder) and PictureFormat.HOST_RGB in source.picture_formats
            else None
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
