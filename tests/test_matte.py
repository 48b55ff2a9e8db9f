"""Robust Video Matting on a real portrait, and its recurrent state within and across clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from daemon.stages import FrameBatch
from daemon.stages.matte import STATE_KEY, Matte, auto_downsample_ratio, load_matting_model

CPU = torch.device("cpu")

# Regions of skimage.data.astronaut() (512x512), as (rows, columns).
FACE = (slice(90, 170), slice(180, 270))
SUIT = (slice(320, 460), slice(80, 240))
BACKGROUND = {
    "wall, top right": (slice(0, 60), slice(320, 512)),
    "flag, top left": (slice(0, 120), slice(0, 50)),
    "model shuttle": (slice(60, 240), slice(390, 450)),
}


@pytest.fixture(scope="module")
def matte() -> Matte:
    return Matte(load_matting_model("rvm-mobilenetv3", CPU))


def astronaut(frames: int, size: int = 512) -> torch.Tensor:
    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1).unsqueeze(0).float() / 255
    if size != 512:
        image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
    return image.repeat(frames, 1, 1, 1)


def test_the_matte_is_high_on_the_person_and_low_on_the_background(matte: Matte) -> None:
    # Two frames: the second already sees the recurrent state the first left.
    alpha = matte(FrameBatch(astronaut(2), state={})).alpha
    assert alpha is not None and alpha.shape == (2, 1, 512, 512)
    last = alpha[-1, 0].numpy()
    assert last[FACE].mean() > 0.95
    assert last[SUIT].mean() > 0.95
    for name, region in BACKGROUND.items():
        assert last[region].mean() < 0.05, name


def test_the_recurrent_state_carries_within_a_clip_and_restarts_with_the_next(matte: Matte) -> None:
    frames = astronaut(3, size=128)
    first_clip: dict[str, object] = {}
    a = matte(FrameBatch(frames[:2].clone(), state=first_clip)).alpha
    b = matte(FrameBatch(frames[2:].clone(), state=first_clip)).alpha
    assert a is not None and b is not None and first_clip[STATE_KEY] is not None
    # Same picture, different history: the state must have changed the answer.
    assert not torch.allclose(a[0], a[1], atol=1e-4)
    second_clip = matte(FrameBatch(frames[:1].clone(), state={})).alpha
    assert second_clip is not None
    torch.testing.assert_close(second_clip[0], a[0], atol=1e-5, rtol=0)
    # A batch boundary inside a clip changes nothing: state passes between batches.
    whole = matte(FrameBatch(frames.clone(), state={})).alpha
    assert whole is not None
    torch.testing.assert_close(whole[2], b[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("height", "width", "low", "high"),
    [(240, 320, 1.0, 1.0), (720, 1280, 0.4, 0.4), (1080, 1920, 0.25, 0.28), (2160, 3840, 0.125, 0.14)],
)
def test_the_downsample_ratio_follows_frame_size(height: int, width: int, low: float, high: float) -> None:
    assert low <= auto_downsample_ratio(height, width) <= high


def test_a_fixed_downsample_ratio_is_used_as_given(matte: Matte) -> None:
    frames = astronaut(1, size=256)
    coarse = Matte(matte.model, downsample_ratio=0.25)(FrameBatch(frames.clone(), state={})).alpha
    automatic = matte(FrameBatch(frames.clone(), state={})).alpha
    assert coarse is not None and automatic is not None
    assert not torch.allclose(coarse, automatic, atol=1e-3)
    assert np.isfinite(coarse.numpy()).all()


class _FrameCounter(torch.nn.Module):
    """RVM's TorchScript signature; its matte is the number of frames seen before, in tenths."""

    def forward(
        self,
        src: torch.Tensor,
        r1: torch.Tensor | None = None,
        r2: torch.Tensor | None = None,
        r3: torch.Tensor | None = None,
        r4: torch.Tensor | None = None,
        downsample_ratio: float = 1.0,
    ) -> list[torch.Tensor]:
        seen = torch.zeros(1, 1, 1, 1) if r1 is None else r1 + 1
        alpha = (seen / 10).expand(src.shape[0], 1, src.shape[2], src.shape[3])
        return [src, alpha, seen, seen, seen, seen]


def test_a_torchscript_checkpoint_gets_its_recurrent_state_back_each_frame(tmp_path: Path) -> None:
    path = tmp_path / "counter.torchscript"
    torch.jit.script(_FrameCounter()).save(str(path))
    stage = Matte(load_matting_model(str(path), CPU))
    clip: dict[str, object] = {}
    first = stage(FrameBatch(torch.rand(2, 3, 8, 8), state=clip)).alpha
    second = stage(FrameBatch(torch.rand(1, 3, 8, 8), state=clip)).alpha
    fresh = stage(FrameBatch(torch.rand(1, 3, 8, 8), state={})).alpha
    assert first is not None and second is not None and fresh is not None
    seen = [round(float(a.mean()) * 10) for a in (*first, *second, *fresh)]
    assert seen == [0, 1, 2, 0]
