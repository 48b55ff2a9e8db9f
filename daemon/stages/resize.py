"""Bringing frames to exactly the output size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from daemon.config import Settings
from daemon.stages.base import FrameBatch, ScalePlan

if TYPE_CHECKING:  # planning a resize for the decoder's scaler needs no torch; resizing tensors does
    import torch


def parse_color(text: str) -> tuple[float, float, float]:
    value = text.lstrip("#")
    if len(value) != 6:
        raise ValueError(f"{text!r} is not a #rrggbb colour")
    return tuple(int(value[i : i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


def scale(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    import torch.nn.functional as F

    if images.shape[-2:] == (height, width):
        return images
    shrinking = images.shape[-2] > height or images.shape[-1] > width
    # Antialiasing only matters (and is only supported) when shrinking.
    mode = "bilinear" if shrinking else "bicubic"
    return F.interpolate(
        images, size=(height, width), mode=mode, antialias=shrinking, align_corners=False
    ).clamp_(0, 1)


class Resize:
    """Centre-crop to the target aspect then scale (`crop`), fit inside with borders (`pad`), or `stretch`."""

    name = "resize"

    def __init__(
        self,
        width: int,
        height: int,
        mode: Literal["crop", "pad", "stretch"],
        pad_color: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> None:
        self.width = width
        self.height = height
        self.mode = mode
        self.pad_color = pad_color

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device | str) -> Resize:
        out = settings.output
        return cls(out.width, out.height, out.resize_mode, parse_color(out.pad_color))

    def plan(self, width: int, height: int) -> ScalePlan:
        """How a decoder that can scale should do this resize: scale to `size`, then keep `window`.

        `crop` scales to cover the target and keeps the centre; `pad` scales to fit inside and
        leaves the borders to `__call__`; `stretch` scales straight to the target.
        """
        if self.mode == "stretch":
            return ScalePlan((self.width, self.height), (0, 0, self.width, self.height))
        fit = min if self.mode == "pad" else max
        ratio = fit(self.width / width, self.height / height)
        scaled_w, scaled_h = round(width * ratio), round(height * ratio)
        if self.mode == "pad":
            scaled_w, scaled_h = min(self.width, max(1, scaled_w)), min(self.height, max(1, scaled_h))
            return ScalePlan((scaled_w, scaled_h), (0, 0, scaled_w, scaled_h))
        scaled_w, scaled_h = max(self.width, scaled_w), max(self.height, scaled_h)
        left, top = (scaled_w - self.width) // 2, (scaled_h - self.height) // 2
        return ScalePlan((scaled_w, scaled_h), (left, top, self.width, self.height))

    def pad_array(self, image: np.ndarray) -> np.ndarray:
        """An (H, W, 3) uint8 frame the decoder scaled per `plan`, with `pad`'s borders drawn.

        The same pixels `__call__` gives (borders centred the same way, the colour rounded the same
        way), without torch; frames already at the output size come back as they are."""
        height, width = image.shape[:2]
        if (height, width) == (self.height, self.width) or self.mode != "pad":
            return image
        colour = np.array([round(c * 255) for c in self.pad_color], dtype=np.uint8)
        canvas = np.empty((self.height, self.width, 3), dtype=np.uint8)
        canvas[:] = colour
        top, left = (self.height - height) // 2, (self.width - width) // 2
        canvas[top : top + height, left : left + width] = image
        return canvas

    def runs_on(self, width: int, height: int) -> bool:
        return True

    def __call__(self, batch: FrameBatch) -> FrameBatch:
        batch.rgb = self._apply(batch.rgb, self.pad_color)
        if batch.alpha is not None:
            batch.alpha = self._apply(batch.alpha, (0.0,))
        return batch

    def _apply(self, images: torch.Tensor, fill: tuple[float, ...]) -> torch.Tensor:
        import torch

        height, width = images.shape[-2:]
        if (height, width) == (self.height, self.width):
            return images
        if self.mode == "stretch":
            return scale(images, self.height, self.width)
        if self.mode == "crop":
            # Keep the largest centred window with the target's aspect ratio.
            if width * self.height > height * self.width:
                crop_width = round(height * self.width / self.height)
                left = (width - crop_width) // 2
                images = images[..., :, left : left + crop_width]
            else:
                crop_height = round(width * self.height / self.width)
                top = (height - crop_height) // 2
                images = images[..., top : top + crop_height, :]
            return scale(images, self.height, self.width)
        ratio = min(self.width / width, self.height / height)
        inner_w = min(self.width, max(1, round(width * ratio)))
        inner_h = min(self.height, max(1, round(height * ratio)))
        inner = scale(images, inner_h, inner_w)
        canvas = torch.empty(
            (*images.shape[:-2], self.height, self.width), dtype=images.dtype, device=images.device
        )
        canvas[:] = torch.tensor(fill, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        top = (self.height - inner_h) // 2
        left = (self.width - inner_w) // 2
        canvas[..., top : top + inner_h, left : left + inner_w] = inner
        return canvas
