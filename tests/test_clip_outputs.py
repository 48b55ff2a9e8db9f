"""A clip's files appear whole or not at all, the main stream and its matte together."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction
from pathlib import Path

from daemon.backends import cpu_parts
from daemon.clips import Clip
from daemon.config import load_settings
from daemon.cutter import ClipCutter
from daemon.cutting import CutJob
from daemon.encode import X265Encoder, X265Encoders
from daemon.messages import ClipResult
from daemon.stages import FrameBatch
from daemon.stages.resize import Resize

from media import CollectedClips, make_video

SETTINGS = load_settings(None, {"output.width": 128, "output.height": 80, "encode.preset": "ultrafast"})


class BrightnessMatte:
    """A stand-in matte stage: alpha is the picture's brightness."""

    name = "matte"

    def __call__(self, batch: FrameBatch) -> FrameBatch:
        batch.alpha = batch.rgb.mean(dim=1, keepdim=True)
        return batch

    def runs_on(self, width: int, height: int) -> bool:
        return True


def cutter(vanishing_suffix: str | None) -> ClipCutter:
    """Encoders whose `.part` file someone deletes just before it is renamed, for names ending so."""

    class Encoders(X265Encoders):
        def __call__(self, path: Path, width: int, height: int, fps: Fraction) -> X265Encoder:
            return vanishing(X265Encoder(path, width, height, fps, SETTINGS.encode))

    def vanishing(encoder: X265Encoder) -> X265Encoder:
        path = encoder.path  # the clip's `.part` file
        if vanishing_suffix and f"{vanishing_suffix}." in path.name:
            original = encoder.finish

            def finish() -> None:
                encoder._container.close()
                encoder.path.unlink()
                original()

            encoder.finish = finish  # type: ignore[method-assign]
        return encoder

    stages = [Resize(128, 80, "crop"), BrightnessMatte()]
    parts = replace(cpu_parts(SETTINGS, stages), encoders=Encoders(SETTINGS.encode), write_alpha=True)
    made = ClipCutter(parts)
    return made


def run(tmp_path: Path, vanishing_suffix: str | None) -> tuple[ClipResult, list[str]]:
    source = make_video(tmp_path / "src.mp4", frames=20)
    sink = CollectedClips()
    cutter(vanishing_suffix).run(CutJob(source, "v", [Clip(0, 10)], tmp_path / "out", sink))
    return sink.results[0], sorted(p.name for p in (tmp_path / "out" / "v").iterdir())


def test_a_clip_with_a_matte_writes_both_streams(tmp_path: Path) -> None:
    result, files = run(tmp_path, None)
    assert result.error is None
    assert files == ["v_0000000_0000010.alpha.hevc", "v_0000000_0000010.hevc"]


def test_when_the_main_stream_fails_its_matte_is_not_left_behind(tmp_path: Path) -> None:
    result, files = run(tmp_path, "_0000010.hevc")
    assert result.path is None and result.error and result.error.startswith("v: ")
    assert files == []


def test_when_the_matte_fails_the_clip_is_removed_whole(tmp_path: Path) -> None:
    result, files = run(tmp_path, ".alpha.hevc")
    assert result.path is None and result.error
    assert files == []


def flat_video(path: Path, width: int, height: int, colorspace: int) -> Path:
    """Two seconds of one orange, encoded with the given YUV matrix and tagged with it."""
    import av
    import numpy as np
    from av.video.reformatter import ColorRange

    orange = np.zeros((height, width, 3), np.uint8)
    orange[:] = (220, 120, 30)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.colorspace = colorspace
        stream.codec_context.color_range = ColorRange.MPEG
        stream.options = {"preset": "ultrafast", "crf": "10"}
        for index in range(60):
            frame = av.VideoFrame.from_ndarray(orange, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=colorspace, dst_color_range=ColorRange.MPEG
            )
            frame.pts, frame.time_base = index, Fraction(1, 30)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_colours_survive_whatever_matrix_the_source_uses(tmp_path: Path) -> None:
    """Outputs are BT.709; a source in BT.601 is converted, not relabelled."""
    import av
    import numpy as np
    from av.video.reformatter import Colorspace

    for name, size, colorspace in [
        ("sd", (320, 240), Colorspace.ITU601),
        ("hd", (1280, 720), Colorspace.ITU709),
        # Tagged BT.601 at an HD size: the tag wins over the size-based guess for untagged video.
        ("hd601", (1280, 720), Colorspace.ITU601),
    ]:
        source = flat_video(tmp_path / f"{name}.mp4", *size, colorspace)
        sink = CollectedClips()
        ClipCutter(cpu_parts(SETTINGS, [Resize(128, 80, "crop")])).run(
            CutJob(source, name, [Clip(0, 5)], tmp_path / "out", sink)
        )
        with av.open(sink.results[0].path or "") as container:
            frame = next(container.decode(video=0))
        assert frame.colorspace == Colorspace.ITU709
        rgb = frame.to_ndarray(format="rgb24", src_colorspace=Colorspace.ITU709).reshape(-1, 3).mean(axis=0)
        # Relabelling BT.601 samples as BT.709 would be 8 levels off in red.
        assert np.abs(rgb - (220, 120, 30)).max() < 4, (name, rgb)


def test_the_output_gop_is_ours_not_the_sources(tmp_path: Path) -> None:
    """Keyframes every `encode.gop` frames and B-frames, whatever picture types the source had."""
    import av

    source = make_video(tmp_path / "src.mp4", frames=120)  # a keyframe every 30 frames, no B-frames
    settings = load_settings(
        None, {"output.width": 128, "output.height": 80, "encode.preset": "ultrafast", "encode.gop": 50}
    )
    for mode in ("crop", "pad"):  # the YUV path and the RGB path
        sink = CollectedClips()
        cutter = ClipCutter(cpu_parts(settings, [Resize(128, 80, mode)]))  # type: ignore[arg-type]
        cutter.run(CutJob(source, mode, [Clip(0, 120)], tmp_path / mode, sink))
        with av.open(sink.results[0].path or "") as container:
            types = [frame.pict_type for frame in container.decode(video=0)]
        keyframes = [index for index, kind in enumerate(types) if kind == av.video.frame.PictureType.I]
        assert keyframes == [0, 50, 100], (mode, keyframes)
        assert av.video.frame.PictureType.B in types, mode


def raw_hevc(path: Path, x265_colour: str) -> Path:
    """Twelve frames of raw HEVC with a keyframe, and so a parameter set, every four frames."""
    import av
    import numpy as np

    with av.open(str(path), "w", format="hevc") as container:
        stream = container.add_stream("libx265", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        params = "keyint=4:min-keyint=4:repeat-headers=1:log-level=error"
        stream.options = {"preset": "ultrafast", "x265-params": f"{params}{x265_colour}"}
        for index in range(12):
            image = np.zeros((48, 64, 3), np.uint8)
            image[:, : 4 + index * 5] = (220, 120, 30)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_a_stream_the_encoder_left_untagged_or_tagged_otherwise_comes_out_bt709(tmp_path: Path) -> None:
    """What the NVENC path does to its output: every parameter set says BT.709 limited range, and
    the pictures are untouched."""
    import av
    import numpy as np
    from av.video.reformatter import ColorRange, Colorspace

    from daemon.encode import tag_bt709

    bt709 = 1  # H.273's code point for primaries and transfer
    for name, colour in [
        ("untagged", ""),
        ("bt601", ":colorprim=smpte170m:transfer=smpte170m:colormatrix=smpte170m:range=full"),
    ]:
        before = raw_hevc(tmp_path / f"{name}.hevc", colour)
        after = tmp_path / f"{name}.tagged.hevc"
        assert tag_bt709(before, after) == 12
        with av.open(str(before)) as original, av.open(str(after)) as tagged:
            assert original.streams.video[0].codec_context.color_primaries != bt709
            assert tagged.streams.video[0].codec_context.color_primaries == bt709
            assert tagged.streams.video[0].codec_context.color_trc == bt709
            pairs = list(zip(original.decode(video=0), tagged.decode(video=0), strict=True))
        assert len(pairs) == 12
        for old, new in pairs:
            assert old.colorspace != Colorspace.ITU709, name
            assert (new.colorspace, new.color_range) == (Colorspace.ITU709, ColorRange.MPEG), name
            for old_plane, new_plane in zip(old.planes, new.planes, strict=True):
                assert bytes(old_plane) == bytes(new_plane), name
        # The untouched payload is checked through the planes; the frames must also differ from each
        # other, or a stream of one repeated picture would pass.
        assert not np.array_equal(pairs[0][1].to_ndarray(), pairs[-1][1].to_ndarray())
