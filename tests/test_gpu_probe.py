"""Backend choice: the probe runs in a child process, every fallback says why, codec = "gpu" refuses to
start without a GPU, codec = "auto" runs on the CPU without one, and the CPU path takes no GPU slot."""

from __future__ import annotations

import ctypes
import json
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from daemon.gpu.nvcodec import nvdec_unsupported_reason
from daemon.gpu.probe import GpuProbe, GpuUnavailable, choose_backends, probe_gpu, probe_in_child

from conftest import FAST_CONFIG, run_cli, run_command
from media import decoded_indices, index_image, make_video
from server import MediaServer


def driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


NO_DRIVER = not driver_present()
H100 = GpuProbe(
    0,
    has_cuda=True,
    device_name="NVIDIA H100 80GB HBM3",
    nvdec_ok=True,
    nvenc_ok=False,
    nvenc_reason="no NVENC on this GPU model (NVIDIA H100 80GB HBM3)",
)


def test_the_probe_runs_in_a_child_and_answers_plainly() -> None:
    probe = probe_in_child(0, timeout_seconds=120)
    if NO_DRIVER:
        assert not probe.has_cuda and not probe.nvdec_ok and not probe.nvenc_ok
        assert probe.cuda_reason.startswith("no NVIDIA driver")
        assert probe.nvdec_reason == probe.nvenc_reason == probe.cuda_reason
    else:
        assert probe.has_cuda or probe.cuda_reason.startswith("no GPU")


def test_a_device_that_does_not_exist_is_a_reason_not_a_crash() -> None:
    for probe in (probe_gpu(63, timeout_seconds=120), probe_in_child(63, timeout_seconds=120)):
        assert not probe.has_cuda
        assert probe.cuda_reason.startswith(("no NVIDIA driver", "no GPU"))


def test_auto_without_a_gpu_runs_everything_on_the_cpu_and_says_why() -> None:
    probe = GpuProbe(0, cuda_reason="no NVIDIA driver (libcuda.so.1 missing)")
    choice = choose_backends("auto", probe)
    assert (choice.decode, choice.encode, choice.device) == ("cpu", "x265", "cpu")
    assert choice.fallbacks == ["CPU decode, stages and encode: no NVIDIA driver (libcuda.so.1 missing)"]
    assert not choice.uses_gpu


def test_gpu_without_a_gpu_refuses() -> None:
    with pytest.raises(GpuUnavailable, match='encode.codec = "gpu" but no GPU: the NVIDIA driver sees no'):
        choose_backends("gpu", GpuProbe(0, cuda_reason="no GPU: the NVIDIA driver sees no CUDA device"))


def test_a_gpu_without_nvenc_decodes_on_it_and_encodes_with_x265() -> None:
    for codec in ("auto", "gpu"):
        choice = choose_backends(codec, H100)  # type: ignore[arg-type]
        assert (choice.decode, choice.encode, choice.device) == ("nvdec", "x265", "cuda:0")
        assert choice.fallbacks == [
            "libx265 encode on the CPU: no NVENC on this GPU model (NVIDIA H100 80GB HBM3)"
        ]


def test_cpu_never_looks_at_the_gpu() -> None:
    choice = choose_backends("cpu", None)
    assert (choice.decode, choice.encode, choice.device) == ("cpu", "x265", "cpu")


def test_sources_nvdec_can_take_and_those_it_cannot(tmp_path: Path) -> None:
    assert nvdec_unsupported_reason(make_video(tmp_path / "ok.mp4", frames=3)) == ""
    small_vp9 = make_video(tmp_path / "small.webm", frames=3, codec="libvpx-vp9")
    assert nvdec_unsupported_reason(small_vp9) == "vp9 128x80 is outside NVDEC's 128x128 to 8192x8192"

    full_chroma = tmp_path / "444.mp4"
    with av.open(str(full_chroma), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(30))
        stream.width, stream.height, stream.pix_fmt = 128, 80, "yuv444p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(index_image(i, 128, 80), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert nvdec_unsupported_reason(full_chroma) == "h264 yuv444p is not 8-bit 4:2:0"

    not_video = tmp_path / "notes.mp4"
    not_video.write_bytes(np.zeros(100, np.uint8).tobytes())
    assert nvdec_unsupported_reason(not_video).startswith("cannot be read")


def with_codec(workspace: dict[str, Path], codec: str, extra: str = "") -> None:
    config = FAST_CONFIG.replace('codec = "cpu"', f'codec = "{codec}"')
    workspace["config"].write_text(config + extra)


@pytest.mark.skipif(not NO_DRIVER, reason="this machine has an NVIDIA driver")
def test_codec_gpu_stops_at_start_up_with_exit_2_and_the_reason(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    url = server.add("v.mp4", make_video(workspace["media"] / "v.mp4", frames=10))
    workspace["urls"].write_text(f"{url}\n")
    (workspace["clips"] / "v.txt").write_text("0 5\n")
    with_codec(workspace, "gpu")

    result = run_cli(workspace, "--workers", "1", timeout=120)

    assert result.returncode == 2
    assert 'download_and_process: encode.codec = "gpu" but no NVIDIA driver' in result.stderr
    assert server.routes["/v.mp4"].requests == []  # stopped before any download
    assert not list(workspace["out"].glob("*/*.hevc"))


@pytest.mark.skipif(not NO_DRIVER, reason="this machine has an NVIDIA driver")
def test_codec_auto_without_a_gpu_cuts_on_the_cpu_logs_why_once_and_takes_no_slot(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    video = make_video(workspace["media"] / "v.mp4", frames=30)
    workspace["urls"].write_text(f"{video}\n")
    (workspace["clips"] / "v.txt").write_text("0 10\n15 25\n")
    slots = tmp_path / "slots"
    with_codec(workspace, "auto", f'[gpu]\nslot_dir = "{slots}"\n')

    result = run_cli(workspace, "--workers", "1", timeout=300)

    assert result.returncode == 0, result.stderr
    clips = sorted((workspace["out"] / "v").glob("*.hevc"))
    assert [decoded_indices(clip) for clip in clips] == [list(range(10)), list(range(15, 25))]
    log = (workspace["out"] / "logs" / "worker-0.log").read_text()
    assert log.count("backends: decode cpu, stages on cpu, encode x265") == 1
    assert log.count("fallback: CPU decode, stages and encode: no NVIDIA driver") == 1
    assert not slots.exists() or not list(slots.iterdir())  # the CPU path never takes a GPU slot


@pytest.mark.skipif(not NO_DRIVER, reason="this machine has an NVIDIA driver")
def test_a_clip_nvenc_cannot_open_an_encoder_for_is_made_with_libx265(tmp_path: Path) -> None:
    """As when a GeForce card's few NVENC sessions are all taken: here the binding itself cannot
    load, which fails the same call. Each reason is one warning; the clips all come out."""
    from loguru import logger

    from daemon.backends import Backends
    from daemon.clips import Clip
    from daemon.config import load_settings
    from daemon.cutting import CutJob
    from daemon.gpu.probe import BackendChoice

    from media import CollectedClips

    settings = load_settings(None, {"output.width": 128, "output.height": 80, "encode.preset": "ultrafast"})
    backends = Backends(settings, BackendChoice(decode="cpu", encode="nvenc", device="cpu"))
    source = make_video(tmp_path / "v.mp4", frames=30)
    sink = CollectedClips()
    lines: list[str] = []
    handler = logger.add(
        lambda message: lines.append(str(message)), level="DEBUG", format="{level} {message}"
    )
    try:
        backends.cut(CutJob(source, "v", [Clip(0, 10), Clip(5, 15)], tmp_path / "out", sink, lambda: False))
    finally:
        logger.remove(handler)

    results = sorted(sink.results, key=lambda result: result.start_frame)
    assert [decoded_indices(Path(result.path or "")) for result in results] == [
        list(range(10)),
        list(range(5, 15)),
    ]
    refusals = [line for line in lines if "NVENC cannot open an encoder" in line]
    assert len(refusals) == 2 and "\n" not in refusals[0].strip()
    assert refusals[0].startswith(
        "WARNING v_0000000_0000010.hevc: NVENC cannot open an encoder (Failed to load"
    )
    assert refusals[1].startswith("DEBUG v_0000005_0000015.hevc")


def test_the_probe_runs_as_a_module_without_a_runpy_warning(tmp_path: Path) -> None:
    """The package does not import the probe module, so `-m` runs the only copy there is."""
    done = run_command(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "daemon.gpu.probe", "--device", "0"],
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["device_id"] == 0
