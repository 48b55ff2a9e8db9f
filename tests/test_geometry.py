"""What is on screen: a display matrix turns the picture and a sample aspect ratio widens or narrows
its pixels, before the resize rules see it, exactly as a player shows the source.

Sources are made here with PyAV: a picture as a player must show it (`shown`), stored turned back
or squeezed, with the display matrix or the SAR that undoes it. Each output frame is compared with
the shown picture resized by the README's rules, computed here with plain numpy."""

from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from daemon.clips import Clip
from daemon.geometry import DisplayGeometry, Orientation
from daemon.gpu.color import as_shown
from daemon.source import VideoSource

from media import cut, settings

# Red grows left to right and green top to bottom, so a squeeze or a wrong crop shifts them; blue
# is one level per quarter, so a turn or a mirror moves it; a white disc in the centre stays round.
QUARTER_BLUES = (40, 110, 180, 250)  # top left, top right, bottom left, bottom right


def shown_picture(width: int, height: int) -> np.ndarray:
    """The picture a player shows: the two ramps, the blue quarters, and the white disc."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = np.round(30 + 180 * cols / (width - 1))
    image[..., 1] = np.round(30 + 180 * rows / (height - 1))
    bottom, right = rows >= height // 2, cols >= width // 2
    image[..., 2] = np.choose(bottom * 2 + right, QUARTER_BLUES)
    radius = min(width, height) / 3.5
    image[(rows - (height - 1) / 2) ** 2 + (cols - (width - 1) / 2) ** 2 <= radius**2] = 255
    return image


def write_source(path: Path, stored: np.ndarray, rotation: int = 0, sar: Fraction | None = None) -> Path:
    """An H.264 MP4 of `stored`, with a display matrix turning it `rotation` degrees counter-clockwise
    (FFmpeg's sense: what VideoFrame.rotation reads back) and the given sample aspect ratio."""
    height, width = stored.shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "12"}
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = sar
        if rotation:
            stream.set_display_rotation(rotation)
        for index in range(24):
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def squeeze(picture: np.ndarray, sar: Fraction) -> np.ndarray:
    """The stored picture of an anamorphic source: `sar` times fewer columns than it shows."""
    width = round(picture.shape[1] / sar)
    cols = np.minimum(((np.arange(width) + 0.5) * picture.shape[1] / width).astype(int), picture.shape[1] - 1)
    return picture[:, cols]


def resample(picture: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-average resize: close enough to any scaler for pictures made of large flat shapes."""
    tensor = torch.from_numpy(picture).permute(2, 0, 1)[None].float()
    out = torch.nn.functional.interpolate(tensor, size=(height, width), mode="area")
    return out[0].permute(1, 2, 0).round().to(torch.uint8).numpy()


def expected(shown: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """The README's resize rules applied to the shown picture, independently of daemon.stages."""
    source_h, source_w = shown.shape[:2]
    if mode == "stretch":
        return resample(shown, width, height)
    if mode == "crop":
        if source_w * height > source_h * width:
            keep = round(source_h * width / height)
            left = (source_w - keep) // 2
            return resample(shown[:, left : left + keep], width, height)
        keep = round(source_w * height / width)
        top = (source_h - keep) // 2
        return resample(shown[top : top + keep], width, height)
    ratio = min(width / source_w, height / source_h)
    inner_w, inner_h = round(source_w * ratio), round(source_h * ratio)
    canvas = np.zeros((height, width, 3), np.uint8)  # the default pad colour is black
    top, left = (height - inner_h) // 2, (width - inner_w) // 2
    canvas[top : top + inner_h, left : left + inner_w] = resample(shown, inner_w, inner_h)
    return canvas


def disc_size(picture: np.ndarray) -> tuple[int, int]:
    """(width, height) of the white disc: equal where pixels are square."""
    rows, cols = (picture.min(axis=2) > 215).nonzero()
    return int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


def clip_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def mismatch(frame: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute difference per channel, away from the reference's edges: there, scalers and
    4:2:0 chroma legitimately differ by a pixel's worth of blur."""
    values = reference.astype(int)
    steps = np.zeros(values.shape[:2], int)
    steps[:, 1:] = np.abs(np.diff(values, axis=1)).max(axis=2)
    steps[1:, :] = np.maximum(steps[1:, :], np.abs(np.diff(values, axis=0)).max(axis=2))
    padded = np.pad(steps, 2, mode="edge")
    height, width = steps.shape
    near_edge = np.max(
        [padded[dy : dy + height, dx : dx + width] for dy in range(5) for dx in range(5)], axis=0
    )
    flat = near_edge < 16  # the ramps step by a few levels a pixel; edges by tens
    assert flat.mean() > 0.3  # most of the picture is compared
    return float(np.abs(frame.astype(int) - values)[flat].mean())


def run_clip(source: Path, tmp_path: Path, width: int, height: int, mode: str) -> list[np.ndarray]:
    config = settings(**{"output.width": width, "output.height": height, "output.resize_mode": mode})
    results = cut(source, [Clip(0, 20)], tmp_path / "out", config)
    result = results[Clip(0, 20)]
    assert result.error is None and result.path is not None
    frames = clip_frames(Path(result.path))
    assert len(frames) == 20
    return frames


# A frame off by a turn or a squeeze differs by 40 and more on average; compression and the
# scalers' different filters by about 3 on these flat shapes.
TOLERANCE = 8.0


@pytest.mark.parametrize("rotation", [-90, 90, 180])
@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_a_phone_video_comes_out_as_a_player_shows_it(tmp_path: Path, rotation: int, mode: str) -> None:
    shown = shown_picture(72, 128) if rotation % 180 else shown_picture(128, 72)
    stored = np.ascontiguousarray(np.rot90(shown, -rotation // 90))  # a player turns it back
    source = write_source(tmp_path / "phone.mp4", stored, rotation)
    reference = expected(shown, 64, 36, mode)
    unturned = expected(stored, 64, 36, mode)
    assert mismatch(unturned, reference) > 5 * TOLERANCE  # the check below can tell them apart
    for frame in run_clip(source, tmp_path, 64, 36, mode):
        assert mismatch(frame, reference) < TOLERANCE


@pytest.mark.parametrize("sar", [Fraction(32, 27), Fraction(8, 9)])
@pytest.mark.parametrize("mode", ["crop", "pad", "stretch"])
def test_non_square_pixels_are_resized_by_the_shape_a_player_shows(
    tmp_path: Path, sar: Fraction, mode: str
) -> None:
    shown = shown_picture(256, 144) if sar > 1 else shown_picture(144, 144)
    stored = squeeze(shown, sar)
    source = write_source(tmp_path / "anamorphic.mp4", stored, sar=sar)
    width, height = (128, 96) if sar > 1 else (112, 128)
    reference = expected(shown, width, height, mode)
    if mode != "stretch":  # stretching ignores the aspect ratio, whatever it is
        wrong_width, wrong_height = disc_size(expected(stored, width, height, mode))
        assert abs(wrong_width - wrong_height) > 4  # read as square pixels, the disc is an ellipse
    for frame in run_clip(source, tmp_path, width, height, mode):
        assert mismatch(frame, reference) < TOLERANCE
        if mode != "stretch":  # the disc stays round: as wide as it is tall, to a pixel or two
            disc_width, disc_height = disc_size(frame)
            assert abs(disc_width - disc_height) <= 2


def test_frames_report_and_give_the_picture_on_screen(tmp_path: Path) -> None:
    """Without a resize first (a stage that wants the whole picture), the frame is turned and in
    square pixels at the size a player shows."""
    shown = shown_picture(72, 128)
    stored = squeeze(np.ascontiguousarray(np.rot90(shown, 1)), Fraction(4, 3))  # 96 x 72 stored
    source = write_source(tmp_path / "both.mp4", stored, rotation=-90, sar=Fraction(4, 3))
    with VideoSource(source) as video:
        assert (video.width, video.height) == (72, 128)
        assert video.info.geometry == DisplayGeometry(96, 72, Fraction(4, 3), Orientation(True, False, True))
        frame = next(iter(video.frames()))
        assert (frame.width, frame.height) == (72, 128)
        picture = frame.to_rgb()
        assert picture.shape == (128, 72, 3)
        assert mismatch(picture, shown) < TOLERANCE


def test_the_source_line_says_how_it_is_shown(tmp_path: Path) -> None:
    stored = squeeze(np.ascontiguousarray(np.rot90(shown_picture(72, 128), 1)), Fraction(4, 3))
    source = write_source(tmp_path / "both.mp4", stored, rotation=-90, sar=Fraction(4, 3))
    with VideoSource(source) as video:
        line = video.info.describe()
    assert line.startswith("source h264 96x72 30.000 fps")
    assert line.endswith("rotated 90° clockwise, SAR 4:3, shown 72x128")
    plain = write_source(tmp_path / "plain.mp4", shown_picture(64, 48))
    with VideoSource(plain) as video:
        assert video.info.describe() == "source h264 64x48 30.000 fps, 0.8s"


@pytest.mark.parametrize(
    ("rotation", "mirror"), [(90, False), (-90, False), (180, False), (0, True), (90, True), (180, True)]
)
def test_every_display_matrix_turns_the_picture_as_ffmpeg_does(
    tmp_path: Path, rotation: int, mirror: bool
) -> None:
    """FFmpeg's own player logic is the reference: its command line turns pictures by the matrix."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.skip("the ffmpeg command line is not installed")
    stored = shown_picture(96, 64)
    path = tmp_path / "turned.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.set_display_rotation(rotation, hflip=mirror)
        frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with VideoSource(path) as video:
        ours = next(iter(video.frames())).to_rgb()
    command = [
        ffmpeg,
        "-v",
        "error",
        "-i",
        str(path),
        "-frames:v",
        "1",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-",
    ]
    raw = subprocess.run(command, capture_output=True, check=True).stdout
    assert len(raw) == ours.size
    theirs = np.frombuffer(raw, np.uint8).reshape(ours.shape)
    assert mismatch(ours, theirs) < 1.0


def test_the_nvdec_path_turns_and_widens_its_pictures_the_same_way() -> None:
    """GpuFrame's conversion in plain torch ops, run on the CPU: the same picture as the CPU path's."""
    shown = shown_picture(64, 48)
    for orientation in (
        Orientation(True, False, True),
        Orientation(False, True, True),
        Orientation(True, True, False),
    ):
        stored = shown
        # Undo the turn: transpose and flips are their own inverses, applied in reverse order.
        if orientation.flip_cols:
            stored = stored[:, ::-1]
        if orientation.flip_rows:
            stored = stored[::-1]
        if orientation.transpose:
            stored = np.swapaxes(stored, 0, 1)
        stored = np.ascontiguousarray(stored)
        geometry = DisplayGeometry(stored.shape[1], stored.shape[0], Fraction(1), orientation)
        assert geometry.size == (64, 48)
        assert np.array_equal(as_shown(torch.from_numpy(stored), geometry).numpy(), shown)
    narrow = squeeze(shown, Fraction(8, 9))
    geometry = DisplayGeometry(narrow.shape[1], narrow.shape[0], Fraction(8, 9))
    widened = as_shown(torch.from_numpy(np.ascontiguousarray(narrow)), geometry).numpy()
    assert widened.shape == shown.shape
    assert mismatch(widened, shown) < TOLERANCE
