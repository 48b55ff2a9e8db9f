"""The torch NV12 <-> RGB conversion used on the GPU path agrees with FFmpeg's swscale: BT.709 limited range
for what the encoders get, and whatever matrix and range a source declares for what NVDEC decodes."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from av.video.reformatter import ColorRange, Colorspace

from daemon.gpu.color import LUMA_WEIGHTS, crop_nv12, nv12_to_rgb, rgb_to_nv12
from daemon.source import KNOWN_MATRICES, declared_colour

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


def swscale_nv12(
    rgb: np.ndarray, matrix: int = Colorspace.ITU709, color_range: int = ColorRange.MPEG
) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    return frame.reformat(
        format="nv12",
        src_color_range=ColorRange.JPEG,
        dst_colorspace=matrix,
        dst_color_range=color_range,
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


@pytest.mark.parametrize(
    ("matrix", "color_range"),
    [
        (Colorspace.ITU601, ColorRange.MPEG),
        (Colorspace.SMPTE240M, ColorRange.MPEG),
        (Colorspace.BT2020, ColorRange.MPEG),
        (Colorspace.FCC, ColorRange.MPEG),
        (Colorspace.ITU709, ColorRange.JPEG),
        (Colorspace.ITU601, ColorRange.JPEG),
    ],
)
def test_decoded_pictures_are_read_with_the_matrix_and_range_their_source_declares(
    matrix: int, color_range: int
) -> None:
    rgb = sample_image()
    nv12 = swscale_nv12(rgb, matrix, color_range)
    reference = nv12.to_ndarray(
        format="rgb24", src_colorspace=matrix, src_color_range=color_range, dst_color_range=ColorRange.JPEG
    ).astype(int)

    converted = nv12_to_rgb(torch.from_numpy(nv12.to_ndarray()), matrix, color_range).numpy().astype(int)

    smooth = smooth_mask(rgb)
    assert np.abs(converted - reference)[smooth].max() <= 6
    error = np.abs(converted - rgb.astype(int))[smooth].max()
    assert error <= 4
    # Read as BT.709 limited instead, the same samples come out further from the picture.
    wrong = nv12_to_rgb(torch.from_numpy(nv12.to_ndarray())).numpy().astype(int)
    assert np.abs(wrong - rgb.astype(int))[smooth].max() > error + 2


def test_both_decoders_know_the_same_matrices_and_guess_alike_for_the_rest() -> None:
    assert set(LUMA_WEIGHTS) == set(KNOWN_MATRICES)
    unspecified, smpte170m = 2, 6
    assert declared_colour(unspecified, 0, 1080) == (Colorspace.ITU709, ColorRange.MPEG)
    assert declared_colour(unspecified, 0, 480) == (Colorspace.ITU601, ColorRange.MPEG)
    assert declared_colour(Colorspace.ITU601, ColorRange.JPEG, 1080) == (Colorspace.ITU601, ColorRange.JPEG)
    assert declared_colour(smpte170m, ColorRange.MPEG, 720) == (smpte170m, ColorRange.MPEG)


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


def test_a_surface_at_the_coded_size_is_cut_to_the_visible_picture() -> None:
    """1080-line H.264 is coded as 1088 lines; NVDEC may hand the whole surface back, chroma after
    every coded luma row. What comes out is the picture PyAV shows, chroma included."""
    rgb = sample_image()
    nv12 = torch.from_numpy(swscale_nv12(rgb).to_ndarray())
    coded = torch.full((112 * 3 // 2, WIDTH + 32), 77, dtype=torch.uint8)  # 16 more lines, 32 more columns
    coded[:HEIGHT, :WIDTH] = nv12[:HEIGHT]
    coded[112 : 112 + HEIGHT // 2, :WIDTH] = nv12[HEIGHT:]

    assert torch.equal(crop_nv12(coded, WIDTH, HEIGHT), nv12)
    assert crop_nv12(nv12, WIDTH, HEIGHT) is nv12
    with pytest.raises(ValueError):
        crop_nv12(nv12, WIDTH, HEIGHT + 16)
