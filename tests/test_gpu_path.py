"""The GPU path gives the same clips as the CPU path: NVDEC shows the same source frames at the same
times, NVENC writes BT.709 HEVC with our GOP, a source NVDEC cannot take and a clip that runs out of
device memory are still finished, and the command line picks the GPU by itself.

These run only where the GPU probe finds a usable device (`pytest -m gpu` selects them); elsewhere
they are skipped with the probe's reason, and the CPU side of backend choice is covered by
test_gpu_probe.py."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from av.video.frame import PictureType
from av.video.reformatter import Colorspace
from loguru import logger

from daemon.backends import Backends
from daemon.clips import Clip
from daemon.config import Settings, load_settings
from daemon.cutting import CutJob
from daemon.gpu.probe import probe_gpu
from daemon.partfile import PartFile
from daemon.source import VideoSource

from conftest import FAST_CONFIG, run_cli
from media import CollectedClips, decoded_indices, make_video, read_index

PROBE = probe_gpu(0, timeout_seconds=120)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not PROBE.nvdec_ok, reason=f"no usable NVDEC: {PROBE.nvdec_reason or PROBE.cuda_reason}"
    ),
]
needs_nvenc = pytest.mark.skipif(not PROBE.nvenc_ok, reason=f"no NVENC: {PROBE.nvenc_reason}")

WIDTH, HEIGHT = 256, 160  # above NVENC's smallest HEVC picture


def settings_for(codec: str, tmp_path: Path, **overrides: object) -> Settings:
    return load_settings(
        None,
        {
            "output.width": WIDTH,
            "output.height": HEIGHT,
            "encode.preset": "ultrafast",
            "encode.codec": codec,
            "gpu.slot_dir": str(tmp_path / "slots"),
            **overrides,
        },
    )


def cut(settings: Settings, source: Path, clips: list[Clip], out: Path) -> list[list[int]]:
    """Clips cut the way a worker cuts them, as the source frame indices each output frame shows."""
    backends = Backends.start(settings)
    sink = CollectedClips()
    backends.cut(CutJob(source, "v", clips, out, sink, lambda: False))
    assert [result.error for result in sink.results] == [None] * len(clips)
    return [
        decoded_indices(Path(result.path or ""))
        for result in sorted(sink.results, key=lambda r: r.start_frame)
    ]


def test_nvdec_shows_the_frames_the_cpu_decoder_shows_at_the_same_times(tmp_path: Path) -> None:
    from daemon.gpu.nvcodec import NvdecSource

    source = make_video(tmp_path / "src.mp4", fps=30, frames=90, width=320, height=200)
    for start in (Fraction(0), Fraction(47, 30), Fraction(75, 30)):
        with VideoSource(source) as cpu, NvdecSource(source, 0) as gpu:
            on_cpu = [
                (f.pts_seconds, read_index(f.frame.to_ndarray(format="gray"))) for f in cpu.frames(start)
            ]
            on_gpu = [(f.pts_seconds, read_index(f.nv12[:200].cpu().numpy())) for f in gpu.frames(start)]
        assert on_gpu == on_cpu, start
        # Both start at the keyframe at or before `start` (the cutter skips what comes before it)
        # and go on through the frame on screen at `start`.
        assert on_gpu[0][0] <= start
        assert any(pts <= start < pts + Fraction(1, 30) for pts, _ in on_gpu), start
        assert [index for _, index in on_gpu] == list(range(on_gpu[0][1], 90))


def test_a_clip_cut_on_the_gpu_shows_the_same_source_frames_as_on_the_cpu(tmp_path: Path) -> None:
    """A 60 fps source, clips in 30 fps frame numbers, output at 30 fps: timing, seeking and
    resampling all take part."""
    source = make_video(tmp_path / "src.mp4", fps=60, frames=480, width=320, height=200)
    clips = [Clip(10, 40), Clip(150, 180), Clip(160, 200)]

    on_cpu = cut(settings_for("cpu", tmp_path), source, clips, tmp_path / "cpu")
    on_gpu = cut(settings_for("gpu", tmp_path), source, clips, tmp_path / "gpu")

    assert on_gpu == on_cpu
    assert on_gpu[0] == list(range(20, 80, 2))


@pytest.mark.parametrize("codec", ["libx264", "libvpx-vp9"])
def test_a_1080p_source_cut_on_the_gpu_matches_the_cpu_path_within_35_db(tmp_path: Path, codec: str) -> None:
    """The shipped path end to end on a 1080p H.264 and a VP9 source, resized to 1280x720: the same
    frames, shown from the same source frames, and pictures within 35 dB PSNR of the CPU path's."""
    source = make_video(tmp_path / "src", fps=30, frames=60, width=1920, height=1080, codec=codec)
    size = {"output.width": 1280, "output.height": 720}
    pictures = []
    for device in ("cpu", "gpu"):
        backends = Backends.start(settings_for(device, tmp_path, **size))
        sink = CollectedClips()
        (tmp_path / device).mkdir()
        backends.cut(CutJob(source, device, [Clip(5, 50)], tmp_path / device, sink, lambda: False))
        assert [result.error for result in sink.results] == [None], device
        path = Path(sink.results[0].path or "")
        assert decoded_indices(path) == list(range(5, 50)), device
        with av.open(str(path)) as container:
            pictures.append(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))
    on_cpu, on_gpu = (p.astype(np.float64) for p in pictures)
    assert on_cpu.shape == on_gpu.shape == (45, 720, 1280, 3)
    psnr = 10 * np.log10(255**2 / max(np.mean((on_cpu - on_gpu) ** 2), 1e-9))
    assert psnr >= 35, psnr


def test_colours_match_the_cpu_path(tmp_path: Path) -> None:
    """An SD source in BT.601: both paths read it as BT.601 and write BT.709."""
    orange = np.zeros((240, 320, 3), np.uint8)
    orange[:] = (220, 120, 30)
    source = tmp_path / "sd.mp4"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.codec_context.colorspace = Colorspace.ITU601
        stream.options = {"preset": "ultrafast", "crf": "10"}
        for index in range(30):
            frame = av.VideoFrame.from_ndarray(orange, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=Colorspace.ITU601
            )
            frame.pts, frame.time_base = index, Fraction(1, 30)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))

    means = []
    for codec in ("cpu", "gpu"):
        backends = Backends.start(settings_for(codec, tmp_path))
        sink = CollectedClips()
        backends.cut(
            CutJob(
                source,
                codec,
                [Clip(0, 10)],
                tmp_path,
                sink,
                lambda: False,
            )
        )
        with av.open(sink.results[0].path or "") as container:
            frame = next(container.decode(video=0))
        assert frame.colorspace == Colorspace.ITU709, codec
        means.append(
            frame.to_ndarray(format="rgb24", src_colorspace=Colorspace.ITU709).reshape(-1, 3).mean(0)
        )
    for mean in means:
        assert np.abs(mean - (220, 120, 30)).max() < 4, means


@needs_nvenc
def test_nvenc_writes_bt709_hevc_with_our_gop_and_every_frame(tmp_path: Path) -> None:
    from daemon.gpu.nvcodec import NvencEncoder

    settings = settings_for("gpu", tmp_path, **{"encode.gop": 10})
    frames = torch.zeros((25, HEIGHT, WIDTH, 3), dtype=torch.uint8, device="cuda")
    frames[..., 0], frames[..., 1], frames[..., 2] = 220, 120, 30
    for index in range(25):
        frames[index, :, : 8 + index * 8] = 255  # a bar that grows, so frames differ
    path = tmp_path / "v" / "clip.hevc"
    file = PartFile(path)
    encoder = NvencEncoder(file.part_path, WIDTH, HEIGHT, Fraction(30), settings.encode, 0)
    encoder.write(frames[:12])
    encoder.write(frames[12:].cpu().numpy())  # host frames are accepted too
    encoder.finish()
    file.expect_frames(encoder.frames_written, 25)
    assert file.publish() == path.stat().st_size
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.hevc"]  # no .part left

    with av.open(str(path)) as container:
        context = container.streams.video[0].codec_context
        assert (context.name, context.width, context.height) == ("hevc", WIDTH, HEIGHT)
        decoded = list(container.decode(video=0))
    assert len(decoded) == 25
    assert all(frame.colorspace == Colorspace.ITU709 for frame in decoded)
    keyframes = [index for index, frame in enumerate(decoded) if frame.pict_type == PictureType.I]
    assert keyframes == [0, 10, 20]
    last = decoded[-1].to_ndarray(format="rgb24", src_colorspace=Colorspace.ITU709).astype(int)
    assert np.abs(last[:, -40:].reshape(-1, 3).mean(0) - (220, 120, 30)).max() < 6


def test_a_source_nvdec_cannot_take_is_decoded_on_the_cpu_and_its_clips_made(tmp_path: Path) -> None:
    source = make_video(tmp_path / "small.webm", frames=30, codec="libvpx-vp9")  # 128x80: below NVDEC's VP9
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), format="{message}")
    try:
        on_gpu = cut(settings_for("gpu", tmp_path), source, [Clip(0, 10)], tmp_path / "out")
    finally:
        logger.remove(sink)
    assert on_gpu == [list(range(10))]
    assert any("small.webm: decoded on the CPU and uploaded to the GPU: vp9 128x80" in line for line in lines)


def test_a_clip_out_of_device_memory_is_retried_smaller_then_finished_on_the_cpu(tmp_path: Path) -> None:
    source = make_video(tmp_path / "src.mp4", frames=60, width=320, height=200)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), format="{message}")
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1e-6, 0)  # every new allocation fails
    try:
        on_gpu = cut(
            settings_for("gpu", tmp_path, **{"decode.batch_size": 4}), source, [Clip(0, 20)], tmp_path
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        logger.remove(sink)
    assert on_gpu == [list(range(20))]
    for said in (
        "out of GPU memory; retrying 1 clip(s) at batch size 2",
        "at batch size 1",
        "go to the CPU path",
    ):
        assert any(said in line for line in lines), (said, lines)


def test_the_command_line_uses_the_gpu_by_itself(tmp_path: Path, workspace: dict[str, Path]) -> None:
    video = make_video(workspace["media"] / "v.mp4", frames=60, width=320, height=200)
    workspace["urls"].write_text(f"{video}\n")
    (workspace["clips"] / "v.txt").write_text("0 10\n30 50\n")
    config = FAST_CONFIG.replace('codec = "cpu"', 'codec = "auto"')
    config = config.replace("width = 128\nheight = 80", f"width = {WIDTH}\nheight = {HEIGHT}")
    workspace["config"].write_text(config + f'[gpu]\nslot_dir = "{tmp_path / "slots"}"\n')

    result = run_cli(workspace, "--workers", "2", timeout=300)

    assert result.returncode == 0, result.stderr
    clips = sorted((workspace["out"] / "v").glob("*.hevc"))
    assert [decoded_indices(clip) for clip in clips] == [list(range(10)), list(range(30, 50))]
    logs = "".join(path.read_text() for path in (workspace["out"] / "logs").glob("worker-*.log"))
    encoder = "nvenc" if PROBE.nvenc_ok else "x265"
    assert f"backends: decode nvdec, stages on cuda:0, encode {encoder}" in logs
