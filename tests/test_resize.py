import torch

from daemon.stages import FrameBatch
from daemon.stages.resize import Resize


def frame_with_border(height: int, width: int, border: int) -> torch.Tensor:
    """White picture with a black frame `border` pixels wide on the left and right."""
    image = torch.ones(1, 3, height, width)
    image[..., :border] = 0
    image[..., width - border :] = 0
    return image


def test_crop_removes_what_falls_outside_the_target_aspect() -> None:
    # 16:9 source with black side bars that a centre crop to 4:3 removes entirely.
    image = frame_with_border(90, 160, 20)
    out = Resize(64, 48, "crop")(FrameBatch(rgb=image)).rgb
    assert out.shape == (1, 3, 48, 64)
    assert out.min() > 0.95


def test_pad_keeps_the_whole_picture_inside_borders_of_the_pad_colour() -> None:
    image = torch.ones(2, 3, 40, 40)
    out = Resize(80, 40, "pad", pad_color=(1.0, 0.0, 0.0))(FrameBatch(rgb=image)).rgb
    assert out.shape == (2, 3, 40, 80)
    assert torch.allclose(out[0, :, :, :20], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 40, 20))
    assert torch.allclose(out[:, :, :, 20:60], torch.ones(2, 3, 40, 40))


def test_stretch_scales_each_axis_on_its_own() -> None:
    image = frame_with_border(90, 160, 20)
    out = Resize(64, 48, "stretch")(FrameBatch(rgb=image)).rgb
    assert out.shape == (1, 3, 48, 64)
    assert out[0, :, :, 0].max() < 0.05  # the side bars are still there, squeezed


def test_the_matte_follows_the_picture() -> None:
    image = torch.ones(1, 3, 90, 160)
    alpha = torch.zeros(1, 1, 90, 160)
    batch = Resize(64, 48, "crop")(FrameBatch(rgb=image, alpha=alpha))
    assert batch.alpha is not None and batch.alpha.shape == (1, 1, 48, 64)
