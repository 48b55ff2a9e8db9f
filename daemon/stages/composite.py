"""Background replacement: the matte keeps the person; a colour, image or looping video fills the rest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from daemon.config import Settings
from daemon.source import SourceError, VideoSource
from daemon.stages.base import FrameBatch
from daemon.stages.resize import Resize, parse_color

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
STATE_KEY = "composite_background"


def cover(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale to cover height×width and centre-crop the overflow, as a wallpaper would."""
    return Resize(width, height, "crop")(FrameBatch(images)).rgb


class Background(Protocol):
    def frames(self, state: dict[str, object], count: int, like: torch.Tensor) -> torch.Tensor:
        """(count, 3, H, W) background frames matching `like`'s size, device and dtype."""


class ColourBackground:
    def __init__(self, rgb: tuple[float, float, float]) -> None:
        self.rgb = rgb

    def frames(self, state: dict[str, object], count: int, like: torch.Tensor) -> torch.Tensor:
        colour = torch.tensor(self.rgb, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
        return colour.expand(count, 3, *like.shape[-2:])


def _decode_rgb(path: Path) -> Iterator[np.ndarray]:
    # The clips' own decoder, so a background video's colour matrix is read the same way.
    with VideoSource(path) as source:
        for frame in source.frames():
            yield frame.to_rgb()


def _to_tensor(image: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    tensor = torch.from_numpy(image).to(like.device).permute(2, 0, 1).unsqueeze(0)
    return tensor.to(like.dtype).div_(255)


class ImageBackground:
    def __init__(self, path: Path) -> None:
        first = next(_decode_rgb(path), None)
        if first is None:
            raise ValueError(f"composite.background: {path}: no picture in it")
        self.image = first
        self._fitted: torch.Tensor | None = None

    def frames(self, state: dict[str, object], count: int, like: torch.Tensor) -> torch.Tensor:
        height, width = like.shape[-2:]
        fitted = self._fitted
        if fitted is None or fitted.shape[-2:] != (height, width) or fitted.device != like.device:
            fitted = self._fitted = cover(_to_tensor(self.image, like), height, width)
        return fitted.to(like.dtype).expand(count, -1, -1, -1)


class VideoBackground:
    """Decoded as the clip goes, one background frame per output frame, from its start again at its end."""

    def __init__(self, path: Path) -> None:
        if next(_decode_rgb(path), None) is None:
            raise ValueError(f"composite.background: {path}: no video frames in it")
        self.path = path

    def frames(self, state: dict[str, object], count: int, like: torch.Tensor) -> torch.Tensor:
        height, width = like.shape[-2:]
        decoder = state.get(STATE_KEY)
        pictures: list[torch.Tensor] = []
        while len(pictures) < count:
            image = next(decoder, None) if isinstance(decoder, Iterator) else None
            if image is None:
                decoder = state[STATE_KEY] = _decode_rgb(self.path)
                continue
            pictures.append(cover(_to_tensor(image, like), height, width))
        return torch.cat(pictures)


def load_background(spec: str) -> Background:
    if spec.startswith("#"):
        try:
            return ColourBackground(parse_color(spec))
        except ValueError as exc:
            raise ValueError(f"composite.background: {exc}") from exc
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"composite.background: {spec!r} is neither a #rrggbb colour nor an existing image or video file"
        )
    try:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return ImageBackground(path)
        return VideoBackground(path)
    except SourceError as exc:
        raise ValueError(f"composite.background: {path}: cannot be decoded ({exc})") from exc


class Composite:
    name = "composite"

    def __init__(self, background: Background) -> None:
        self.background = background

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device) -> Composite:
        return cls(load_background(settings.composite.background))

    def runs_on(self, width: int, height: int) -> bool:
        return True

    def __call__(self, batch: FrameBatch) -> FrameBatch:
        if batch.alpha is None:
            raise RuntimeError("composite: no matte on this batch; 'matte' must run before 'composite'")
        background = self.background.frames(batch.state, batch.rgb.shape[0], batch.rgb)
        alpha = batch.alpha
        if alpha.shape[-2:] != batch.rgb.shape[-2:]:
            raise RuntimeError(
                f"composite: matte {tuple(alpha.shape)} does not match frames {tuple(batch.rgb.shape)}"
            )
        batch.rgb = batch.rgb * alpha + background * (1 - alpha)
        return batch
