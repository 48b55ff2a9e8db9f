"""The torch NV12 <-> RGB conversion used on the GPU path agrees with FFmpeg's swscale (BT.709, limited)."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from av.video.reformatter import ColorRange, Colorspace

from daemon.gpu.color import nv12_to_rgb, rgb_to_nv12

HEIGHT, WIDTH = 96, 128


def sample_image() -> np.ndarray:
    """Smooth gradients, plus saturated patches where BT.601 and BT.709 disagree most."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack(
        [cols * 255 / (WIDTH - 1), rows * 255 / (HEIGHT - 1), (cols + rows) * 255 / (WIDTH + HEIGHT - 2)], -1
    )
    image[:16, :16] = (255, 0, 0)
    image[:16, 16:32] = (0, 255, 0)
    image[:16, 32:48] = (0, 0, 255)
    image[16:32, :16] = (255, 255, 0)
    return image.round().astype(np.uint8)


def smooth_mask(image: np.ndarray, radius: int = 3) -> np.ndarray:
    """Pixels away from hard edges: there 4:2:0 chroma must blur, however it is upsampled."""
    padded = np.pad(image.astype(int), ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1), axis=(0, 1))
    spread = windows.max(axis=(-1, -2)) - windows.min(axis=(-1, -2))
    return (spread < 40).all(axis=-1)


def swscale_nv12(rgb: np.ndarray) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    return frame.reformat(
        format="nv12",
        src_color_range=ColorRange.JPEG,
        dst_colorspace=Colorspace.ITU709,
        dst_color_range=ColorRange.MPEG,
    )


def test_nv12_to_rgb_matches_swscale_bt709_limited() -> None:
    rgb = sample_image()
    nv12 = swscale_nv12(rgb)
    reference = nv12.to_ndarray(
        format="rgb24",
        src_colorspace=Colorspace.ITU709,
        src_color_range=ColorRange.MPEG,
        dst_color_range=ColorRange.JPEG,
    ).astype(int)

    converted = nv12_to_rgb(torch.from_numpy(nv12.to_ndarray())).numpy()

    assert converted.shape == (HEIGHT, WIDTH, 3) and converted.dtype == np.uint8
    smooth = smooth_mask(rgb)
    assert smooth[:16, :48].sum() > 100  # the saturated patches' insides are compared too
    difference = np.abs(converted.astype(int) - reference)[smooth]
    assert difference.max() <= 6 and difference.mean() < 2.5
    # And it recovers the picture that went in.
    assert np.abs(converted.astype(int) - rgb.astype(int))[smooth].max() <= 4


def test_nv12_to_rgb_is_not_bt601() -> None:
    """A guard that the tolerance above is tight enough to tell the two matrices apart."""
    rgb = sample_image()
    nv12_601 = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
        format="nv12",
        src_color_range=ColorRange.JPEG,
        dst_colorspace=Colorspace.ITU601,
        dst_color_range=ColorRange.MPEG,
    )
    converted = nv12_to_rgb(torch.from_numpy(nv12_601.to_ndarray())).numpy()
    assert np.abs(converted.astype(int) - rgb.astype(int))[smooth_mask(rgb)].max() > 20


def test_rgb_to_nv12_matches_swscale() -> None:
    rgb = sample_image()
    reference = swscale_nv12(rgb).to_ndarray().astype(int)

    converted = rgb_to_nv12(torch.from_numpy(rgb)[None])

    assert converted.shape == (1, HEIGHT * 3 // 2, WIDTH) and converted.dtype == torch.uint8
    difference = np.abs(converted[0].numpy().astype(int) - reference)
    assert difference[:HEIGHT][smooth_mask(rgb)].max() <= 1
    assert difference[HEIGHT:].reshape(HEIGHT // 2, WIDTH // 2, 2)[smooth_mask(rgb)[::2, ::2]].max() <= 1


def test_batch_round_trip_keeps_each_frame() -> None:
    frames = np.stack([sample_image(), 255 - sample_image()])
    back = nv12_to_rgb(rgb_to_nv12(torch.from_numpy(frames))).numpy()
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int))[:, smooth_mask(sample_image())].max() <= 4


def test_luma_only_frames_become_grey() -> None:
    matte = np.full((1, HEIGHT, WIDTH), 200, np.uint8)
    nv12 = rgb_to_nv12(torch.from_numpy(matte))[0]
    assert int(nv12[:HEIGHT].float().mean().round()) == round(16 + 200 / 255 * 219)
    assert torch.all(nv12[HEIGHT:] == 128)


def test_odd_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        rgb_to_nv12(torch.zeros((1, 5, 8, 3), dtype=torch.uint8))
    with pytest.raises(ValueError):
        nv12_to_rgb(torch.zeros((10, 8), dtype=torch.uint8))
