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


def test_the_decoder_side_resize_matches_the_stage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """On the CPU path the decoder scales while converting colours; the picture must be the same."""
    from fractions import Fraction

    import av
    import numpy as np
    from skimage import data

    from daemon.backends import cpu_parts
    from daemon.clips import Clip
    from daemon.config import load_settings
    from daemon.cutter import ClipCutter
    from daemon.cutting import CutJob

    photo = data.astronaut()[64:352, :, :]  # 512x288: 16:9
    source = tmp_path / "photo.mp4"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 512, 288, "yuv420p"
        stream.options = {"crf": "10", "preset": "ultrafast"}
        for index in range(3):
            frame = av.VideoFrame.from_ndarray(photo, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 30)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))

    class Sink:
        def clip_finished(self, result: object) -> None: ...

        def frames_encoded(self, count: int) -> None: ...

        def frame_decoded(self) -> None: ...

    for mode in ("crop", "pad", "stretch"):
        settings = load_settings(
            None,
            {"output.width": 160, "output.height": 120, "output.resize_mode": mode, "encode.crf": 8,
             "encode.preset": "ultrafast"},
        )  # fmt: skip
        stage = Resize(160, 120, mode)  # type: ignore[arg-type]
        ClipCutter(cpu_parts(settings, [stage])).run(
            CutJob(source, mode, [Clip(0, 2)], tmp_path / "out", Sink())
        )
        with av.open(str(tmp_path / "out" / mode / f"{mode}_0000000_0000002.hevc")) as container:
            made = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(np.float64)
        reference = stage(FrameBatch(rgb=torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255)).rgb
        expected = (reference[0].permute(1, 2, 0).numpy() * 255).astype(np.float64)
        psnr = 10 * np.log10(255**2 / np.mean((made - expected) ** 2))
        assert psnr > 24, (mode, psnr)  # filters and centring differ by under a pixel
        # A crop window that slipped by a few pixels, or a stretch instead of a crop, scores far lower.
        shifted = np.roll(expected, 4, axis=1)
        assert 10 * np.log10(255**2 / np.mean((made - shifted) ** 2)) < psnr - 3, mode
