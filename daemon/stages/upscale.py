"""Super-resolution with any checkpoint spandrel recognises, then exactly to the output size."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from loguru import logger

from daemon import models
from daemon.config import Settings
from daemon.stages.base import FrameBatch
from daemon.stages.resize import Resize, parse_color

# Tile sides tried, largest first, when whole frames do not fit in the device's memory.
_FALLBACK_TILES = (512, 256, 128)


def resolve_checkpoint(model: str) -> Path:
    if model in models.BUILTIN_UPSCALERS:
        return models.builtin_upscaler_checkpoint(model)
    path = Path(model).expanduser()
    if not path.is_file():
        names = ", ".join(models.BUILTIN_UPSCALERS)
        raise FileNotFoundError(
            f"upscale.model: {model!r} is neither a file nor a built-in model ({names}); "
            "set upscale.model to an SR checkpoint spandrel can load, or set upscale.mode = 'off'"
        )
    return path


def load_model(model: str, device: torch.device, half: bool) -> Any:
    """A spandrel ImageModelDescriptor on `device`, checked with one small forward pass."""
    try:
        import spandrel
    except ImportError as exc:
        raise ImportError("upscale needs spandrel: pip install spandrel (the 'models' extra)") from exc
    path = resolve_checkpoint(model)
    try:
        descriptor = spandrel.ModelLoader(device=device).load_from_file(path)
    except spandrel.UnsupportedModelError as exc:
        raise ValueError(f"upscale.model: {path}: spandrel does not recognise this architecture") from exc
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many kinds for unreadable files
        raise ValueError(f"upscale.model: {path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ValueError(f"upscale.model: {path}: {descriptor.architecture.name} is not image-to-image")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise ValueError(f"upscale.model: {path}: takes {descriptor.input_channels} channels, not RGB")
    descriptor.eval()
    if half and device.type == "cuda" and descriptor.supports_half:
        descriptor.half()
    try:
        with torch.inference_mode():
            result = descriptor(torch.rand(1, 3, 16, 16, device=device, dtype=_dtype(descriptor)))
    except RuntimeError as exc:
        raise ValueError(f"upscale.model: {path}: fails on a test frame ({exc})") from exc
    expected = (16 * descriptor.scale, 16 * descriptor.scale)
    if tuple(result.shape[-2:]) != expected or not torch.isfinite(result).all():
        raise ValueError(f"upscale.model: {path}: a test frame came back wrong ({tuple(result.shape)})")
    return descriptor


def _dtype(descriptor: Any) -> torch.dtype:
    return next(descriptor.model.parameters()).dtype


class Upscale:
    """Runs the SR model on source-size frames, then crops/pads/scales them to exactly width×height."""

    name = "upscale"

    def __init__(
        self,
        descriptor: Any,
        to_output: Resize,
        mode: Literal["auto", "always"],
        batch_size: int,
        tile_size: int = 0,
        tile_overlap: int = 16,
    ) -> None:
        self.descriptor = descriptor
        self.scale: int = descriptor.scale
        self.to_output = to_output  # brings the upscaled frames to the output size
        self.mode = mode
        self.batch_size = batch_size
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device) -> Upscale | _PassThrough:
        config = settings.upscale
        if config.mode == "off":
            return _PassThrough()
        out = settings.output
        to_output = Resize(out.width, out.height, out.resize_mode, parse_color(out.pad_color))
        descriptor = load_model(config.model, device, config.half)
        logger.debug(f"upscale model {descriptor.architecture.name} x{descriptor.scale} on {device}")
        return cls(
            descriptor, to_output, config.mode, config.batch_size, config.tile_size, config.tile_overlap
        )

    def needed(self, height: int, width: int) -> bool:
        return self.mode == "always" or height < self.to_output.height or width < self.to_output.width

    def runs_on(self, width: int, height: int) -> bool:
        return self.needed(height, width)

    @torch.inference_mode()
    def __call__(self, batch: FrameBatch) -> FrameBatch:
        height, width = batch.rgb.shape[-2:]
        if not self.needed(height, width):
            return batch
        rgb, alpha = [], []
        # Each chunk shrinks to the output size before the next runs: 4x frames are large.
        for start in range(0, batch.rgb.shape[0], self.batch_size):
            chunk = slice(start, start + self.batch_size)
            alpha_chunk = batch.alpha[chunk] if batch.alpha is not None else None
            finished = self.to_output(FrameBatch(self.run(batch.rgb[chunk]), alpha_chunk))
            rgb.append(finished.rgb)
            if finished.alpha is not None:
                alpha.append(finished.alpha)
        batch.rgb = torch.cat(rgb)
        batch.alpha = torch.cat(alpha) if alpha else None
        return batch

    def run(self, images: torch.Tensor) -> torch.Tensor:
        """The model's output at its own scale, (N, 3, H*scale, W*scale), float in [0, 1]."""
        if self.tile_size:
            return self._tiled(images, self.tile_size)
        try:
            return self._forward(images)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
        for tile in _FALLBACK_TILES:
            if tile <= 2 * self.tile_overlap:
                break
            try:
                result = self._tiled(images, tile)
                logger.info(f"upscale: whole frames do not fit in memory; using {tile}px tiles from now on")
                self.tile_size = tile
                return result
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
        raise torch.OutOfMemoryError(
            f"upscale: out of device memory even with {_FALLBACK_TILES[-1]}px tiles; lower upscale.batch_size"
        )

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.descriptor(images.to(_dtype(self.descriptor))).float().clamp_(0, 1)

    def _tiled(self, images: torch.Tensor, tile: int) -> torch.Tensor:
        """Each tile carries `tile_overlap` pixels of context on every side; only its core is kept."""
        count, channels, height, width = images.shape
        scale, overlap = self.scale, self.tile_overlap
        core = tile - 2 * overlap
        output = images.new_empty((count, channels, height * scale, width * scale), dtype=torch.float32)
        for top in range(0, height, core):
            bottom = min(top + core, height)
            outer_top, outer_bottom = max(top - overlap, 0), min(bottom + overlap, height)
            for left in range(0, width, core):
                right = min(left + core, width)
                outer_left, outer_right = max(left - overlap, 0), min(right + overlap, width)
                result = self._forward(images[..., outer_top:outer_bottom, outer_left:outer_right])
                dy, dx = (top - outer_top) * scale, (left - outer_left) * scale
                output[..., top * scale : bottom * scale, left * scale : right * scale] = result[
                    ..., dy : dy + (bottom - top) * scale, dx : dx + (right - left) * scale
                ]
        return output


class _PassThrough:
    name = "upscale"

    def __call__(self, batch: FrameBatch) -> FrameBatch:
        return batch

    def runs_on(self, width: int, height: int) -> bool:
        return False
