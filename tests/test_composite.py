"""Background replacement: where the matte says person, the frame stays; elsewhere the background shows."""

from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from daemon.stages import FrameBatch
from daemon.stages.composite import Composite, load_background

sys.path.insert(0, str(Path(__file__).parent))
from media import make_video, read_index  # noqa: E402


def half_matte(count: int, height: int, width: int) -> torch.Tensor:
    """Person (alpha 1) on the left half, background (alpha 0) on the right."""
    alpha = torch.zeros(count, 1, height, width)
    alpha[..., : width // 2] = 1
    return alpha


def test_a_colour_fills_the_background_and_the_person_is_untouched() -> None:
    frames = torch.rand(2, 3, 16, 20)
    stage = Composite(load_background("#ff8000"))
    out = stage(FrameBatch(frames.clone(), alpha=half_matte(2, 16, 20))).rgb
    torch.testing.assert_close(out[..., :10], frames[..., :10])
    expected = torch.tensor([1.0, 128 / 255, 0.0]).view(1, 3, 1, 1).expand(2, 3, 16, 10)
    torch.testing.assert_close(out[..., 10:], expected)


def test_a_soft_matte_blends_frame_and_background() -> None:
    frames = torch.ones(1, 3, 4, 4)
    alpha = torch.full((1, 1, 4, 4), 0.25)
    out = Composite(load_background("#000000"))(FrameBatch(frames, alpha=alpha)).rgb
    torch.testing.assert_close(out, torch.full((1, 3, 4, 4), 0.25))


def test_an_image_background_is_scaled_to_cover_the_frame(tmp_path: Path) -> None:
    # 80x20, red | green | blue in thirds; covering a 16x16 frame keeps only the middle (green).
    picture = np.zeros((20, 80, 3), np.uint8)
    picture[:, :27] = (255, 0, 0)
    picture[:, 27:53] = (0, 255, 0)
    picture[:, 53:] = (0, 0, 255)
    path = tmp_path / "wall.png"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 80, 20, "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode(None))
    stage = Composite(load_background(str(path)))
    out = stage(FrameBatch(torch.zeros(1, 3, 16, 16), alpha=torch.zeros(1, 1, 16, 16))).rgb
    assert out.shape == (1, 3, 16, 16)
    centre = out[0, :, 4:12, 4:12].mean((1, 2))
    torch.testing.assert_close(centre, torch.tensor([0.0, 1.0, 0.0]), atol=0.02, rtol=0)


def test_a_video_background_loops_to_the_clip_length_and_restarts_each_clip(tmp_path: Path) -> None:
    path = make_video(tmp_path / "bg.mp4", frames=5, width=128, height=80)
    stage = Composite(load_background(str(path)))
    clip: dict[str, object] = {}
    shown = []
    for count in (4, 4, 4):  # three batches of one clip, 12 frames from a 5-frame video
        batch = FrameBatch(torch.zeros(count, 3, 40, 64), alpha=torch.zeros(count, 1, 40, 64), state=clip)
        shown += [read_index(gray) for gray in (stage(batch).rgb.mean(1) * 255).numpy()]
    assert shown == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    next_clip = FrameBatch(torch.zeros(2, 3, 40, 64), alpha=torch.zeros(2, 1, 40, 64), state={})
    assert [read_index(gray) for gray in (stage(next_clip).rgb.mean(1) * 255).numpy()] == [0, 1]


def test_bad_backgrounds_are_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="composite.background: 'nowhere.mp4'"):
        load_background("nowhere.mp4")
    with pytest.raises(ValueError, match="composite.background: '#12345' is not a #rrggbb colour"):
        load_background("#12345")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="composite.background: .*junk.mp4: cannot be decoded"):
        load_background(str(junk))


def test_composite_without_a_matte_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="'matte' must run before 'composite'"):
        Composite(load_background("#000000"))(FrameBatch(torch.zeros(1, 3, 4, 4)))
