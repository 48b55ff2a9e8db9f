"""Super-resolution: the shipped ncnn weights converted for spandrel, and what they do to pictures."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import spandrel
import torch
import torch.nn.functional as F
from skimage import data

from daemon import models
from daemon.stages import FrameBatch
from daemon.stages.resize import Resize, scale
from daemon.stages.upscale import Upscale, load_model

CPU = torch.device("cpu")
# SRVGGNetCompact's receptive field: 18 3x3 convolutions reach 18 pixels to each side.
RECEPTIVE_RADIUS_PX = 18


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "download_and_process"


@pytest.fixture(scope="module")
def descriptor(tmp_path_factory: pytest.TempPathFactory) -> object:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        return load_model("realesr-animevideov3", CPU, half=False)


def cartoon(size: int = 256) -> np.ndarray:
    """Flat fills with dark outlines, the kind of picture realesr-animevideov3 was trained on."""
    yy, xx = np.mgrid[:size, :size]
    image = np.empty((size, size, 3), np.uint8)
    image[:] = (250, 240, 200)
    outline_px, ink = 4, (20, 20, 30)
    for cy, cx, radius, colour in [(80, 90, 50, (220, 60, 60)), (200, 70, 35, (80, 200, 90))]:
        distance = np.hypot(yy - cy, xx - cx)
        image[distance <= radius + outline_px] = ink
        image[distance <= radius] = colour
    boxes = [(130, 120, 220, 230, (60, 120, 220)), (30, 170, 90, 240, (240, 200, 40))]
    for top, left, bottom, right, colour in boxes:
        outer = (yy >= top - outline_px) & (yy <= bottom + outline_px)
        image[outer & (xx >= left - outline_px) & (xx <= right + outline_px)] = ink
        image[(yy >= top) & (yy <= bottom) & (xx >= left) & (xx <= right)] = colour
    return image


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float() / 255


def quarter(images: torch.Tensor) -> torch.Tensor:
    height, width = images.shape[-2:]
    return F.interpolate(images, size=(height // 4, width // 4), mode="bilinear", antialias=True)


def bicubic(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


def laplacian_variance(images: torch.Tensor) -> float:
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    return float(F.conv2d(images.mean(1, keepdim=True), kernel).var())


def test_the_shipped_ncnn_model_converts_once_into_a_cached_checkpoint_spandrel_loads(cache: Path) -> None:
    path = models.builtin_upscaler_checkpoint("realesr-animevideov3")
    assert path.parent == cache and path.is_file()
    loaded = spandrel.ModelLoader().load_from_file(path)
    assert loaded.architecture.id == "Compact"
    assert loaded.scale == 4
    assert loaded.tags == ["64nf", "16nc"]
    written = path.stat().st_mtime_ns
    assert models.builtin_upscaler_checkpoint("realesr-animevideov3") == path
    assert path.stat().st_mtime_ns == written, "a cached conversion must not be redone"
    assert not list(cache.glob("*.tmp")), "no temporary files left beside the cache"


def test_a_bin_file_that_does_not_match_its_param_file_is_refused(tmp_path: Path) -> None:
    source = models.ncnn_model_dir()
    param = shutil.copy(source / "realesr-animevideov3-x4.param", tmp_path / "m.param")
    blob = (source / "realesr-animevideov3-x4.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(blob[:-100])
    (tmp_path / "long.bin").write_bytes(blob + b"\0" * 8)
    with pytest.raises(ValueError, match="ends early"):
        models.compact_state_dict_from_ncnn(Path(param), tmp_path / "short.bin")
    with pytest.raises(ValueError, match="8 bytes left over"):
        models.compact_state_dict_from_ncnn(Path(param), tmp_path / "long.bin")


def test_on_an_outlined_cartoon_the_model_beats_bicubic_by_at_least_1_5_db(descriptor: object) -> None:
    original = as_tensor(cartoon())
    small = quarter(original)
    with torch.inference_mode():
        upscaled = descriptor(small).clamp(0, 1)  # type: ignore[operator]
    model_db = psnr_db(upscaled, original)
    bicubic_db = psnr_db(bicubic(small, *original.shape[-2:]), original)
    # Measured: model 23.0 dB, bicubic 19.9 dB.
    assert model_db >= bicubic_db + 1.5, (model_db, bicubic_db)


def test_on_a_photo_the_model_restores_sharpness_that_bicubic_loses(descriptor: object) -> None:
    original = as_tensor(data.astronaut())
    small = quarter(original)
    with torch.inference_mode():
        upscaled = descriptor(small).clamp(0, 1)  # type: ignore[operator]
    target = laplacian_variance(original)
    model = laplacian_variance(upscaled)
    smooth = laplacian_variance(bicubic(small, *original.shape[-2:]))
    # Measured: original 0.0129, model 0.0022, bicubic 0.0002.
    assert abs(model - target) < abs(smooth - target)
    assert model > 4 * smooth, (model, smooth)


def test_auto_mode_leaves_sources_at_least_as_large_as_the_output_alone(descriptor: object) -> None:
    stage = Upscale(descriptor, Resize(64, 48, "crop"), "auto", batch_size=2)
    large = torch.rand(3, 3, 48, 80)
    batch = stage(FrameBatch(large))
    assert batch.rgb is large


def test_auto_mode_upscales_a_small_source_to_exactly_the_output_size(descriptor: object) -> None:
    stage = Upscale(descriptor, Resize(64, 48, "crop"), "auto", batch_size=2)
    original = as_tensor(cartoon(128)).repeat(3, 1, 1, 1)
    small = scale(original, 24, 32)  # smaller than 64x48 in both dimensions
    result = stage(FrameBatch(small.clone())).rgb
    assert result.shape == (3, 3, 48, 64)
    plain = Resize(64, 48, "crop")(FrameBatch(small.clone())).rgb
    assert not torch.allclose(result, plain, atol=0.02), "the model must have run, not just a resize"


def test_always_mode_runs_the_model_even_on_a_large_source(descriptor: object) -> None:
    stage = Upscale(descriptor, Resize(32, 24, "crop"), "always", batch_size=4)
    assert stage.needed(480, 640) and not Upscale(descriptor, stage.to_output, "auto", 4).needed(480, 640)
    assert stage(FrameBatch(torch.rand(1, 3, 24, 32))).rgb.shape == (1, 3, 24, 32)


def test_tiles_with_enough_overlap_give_the_same_pixels_as_whole_frames(descriptor: object) -> None:
    overlap = RECEPTIVE_RADIUS_PX + 2
    tiled = Upscale(descriptor, Resize(224, 160, "crop"), "always", 4, tile_size=64, tile_overlap=overlap)
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = tiled._forward(images)
        pieces = tiled.run(images)
    assert pieces.shape == (2, 3, 160, 224)
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)
