"""GPU path end to end: NVDEC decode, stages on the device, NVENC (where the GPU has one), next to the
CPU path and the equivalent ffmpeg command line, on the same machine and the same source.

    python bench/bench_gpu.py [--seconds 10] [--device-id 0] [--width 1280 --height 720]

Prints frames per second for each step (decode, NV12 -> RGB, stages, encode) and for the whole
pipeline (ClipCutter over one clip covering the source). On a machine without a usable GPU it says
so and exits 0.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.clips import Clip  # noqa: E402
from daemon.config import Settings, load_settings  # noqa: E402
from daemon.encode import X265Encoder, x265_params  # noqa: E402
from daemon.gpu.probe import choose_backends, probe_gpu  # noqa: E402
from daemon.messages import ClipResult  # noqa: E402

SOURCE_W, SOURCE_H, SOURCE_FPS = 1920, 1080, 30


def make_source(path: Path, seconds: int) -> Path:
    """A moving gradient with lines: cheap to make, not trivially compressible."""
    x = np.linspace(0, 255, SOURCE_W, dtype=np.float32)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=SOURCE_FPS)
        stream.width, stream.height, stream.pix_fmt = SOURCE_W, SOURCE_H, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "26", "g": "60"}
        for index in range(seconds * SOURCE_FPS):
            shift = ((x + index * 4) % 256).astype(np.uint8)
            image = np.empty((SOURCE_H, SOURCE_W, 3), np.uint8)
            image[..., 0] = shift
            image[..., 1] = (index * 2) % 256
            image[..., 2] = 255 - shift
            image[(index * 7) % SOURCE_H :: 37] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


class _Sink:
    def clip_finished(self, result: ClipResult) -> None:
        if result.error:
            print(f"  clip error: {result.error}")

    def frames_encoded(self, count: int) -> None:
        pass

    def frame_decoded(self) -> None:
        pass

    def waiting(self, seconds: float) -> None:
        pass


def timed(label: str, frames: int, run: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    started = time.perf_counter()
    run()
    sync()
    seconds = time.perf_counter() - started
    fps = frames / seconds if seconds else float("inf")
    print(f"  {label:<44} {fps:9.1f} fps  ({frames} frames in {seconds:.2f}s)")
    return fps


def bench_steps(settings: Settings, source: Path, device_id: int, nvenc: bool, frames: int) -> None:
    import torch

    from daemon.gpu.nvcodec import NvdecSource, NvencEncoder
    from daemon.source import VideoSource
    from daemon.stages import FrameBatch, build_stages

    device = torch.device("cuda", device_id)

    def sync() -> None:
        torch.cuda.synchronize(device)

    print("per step:")
    decoded: list[torch.Tensor] = []

    def nvdec() -> None:
        with NvdecSource(source, device_id) as nv_source:
            decoded.extend(frame.nv12 for frame in nv_source.frames())

    timed("decode, NVDEC (NV12 on the device)", frames, nvdec, sync)
    from daemon.gpu.color import nv12_to_rgb

    rgb: list[torch.Tensor] = []
    timed("NV12 -> RGB, torch on the GPU", len(decoded), lambda: rgb.extend(map(nv12_to_rgb, decoded)), sync)

    def cpu_decode() -> None:
        with VideoSource(source) as cpu_source:
            for frame in cpu_source.frames():
                frame.to_rgb()

    timed("decode + RGB, CPU (PyAV)", frames, cpu_decode, lambda: None)

    stages = build_stages(settings, device)
    batch_size = settings.decode.batch_size
    outputs: list[torch.Tensor] = []

    def run_stages() -> None:
        with torch.inference_mode():
            for start in range(0, len(rgb), batch_size):
                images = torch.stack(rgb[start : start + batch_size]).permute(0, 3, 1, 2).float().div_(255)
                batch = FrameBatch(rgb=images)
                for stage in stages:
                    batch = stage(batch)
                outputs.append(batch.rgb.clamp(0, 1).mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1))

    timed(f"stages {settings.stages} on the GPU", len(rgb), run_stages, sync)
    out_w, out_h, fps = settings.output.width, settings.output.height, settings.fps
    with tempfile.TemporaryDirectory() as folder:
        if nvenc:

            def encode_nvenc() -> None:
                encoder = NvencEncoder(Path(folder) / "n.hevc", out_w, out_h, fps, settings.encode, device_id)
                for batch in outputs:
                    encoder.write(batch)
                encoder.finish()

            timed("encode, NVENC HEVC", len(rgb), encode_nvenc, sync)
        else:
            print("  encode, NVENC HEVC                            (no NVENC on this GPU)")
        host = [batch.cpu().numpy() for batch in outputs]

        def encode_x265() -> None:
            encoder = X265Encoder(Path(folder) / "x.hevc", out_w, out_h, fps, settings.encode)
            for batch in host:
                encoder.write(batch)
            encoder.finish()

        timed(f"encode, libx265 preset {settings.encode.preset}", len(rgb), encode_x265, lambda: None)


def bench_pipeline(settings: Settings, source: Path, frames: int) -> None:
    import torch

    from daemon.backends import Backends, cpu_parts
    from daemon.cutter import ClipCutter
    from daemon.cutting import CutJob
    from daemon.stages import build_stages

    print("whole pipeline (one clip over the whole source, decode once, stages, encode):")
    clip = Clip(0, int(frames * settings.clips.clip_fps / SOURCE_FPS) - 1)
    out_frames = clip.frame_count(settings.clip_fps, settings.fps)
    backends = Backends.start(settings)
    cpu = torch.device("cpu")
    cpu_cutter = ClipCutter(cpu_parts(settings, build_stages(settings, cpu)))
    with tempfile.TemporaryDirectory() as folder:
        label = f"GPU path ({backends.choice.describe()})"

        def gpu_run() -> None:
            backends.cut(CutJob(source, "g", [clip], Path(folder), _Sink(), lambda: False))

        timed(label, out_frames, gpu_run, lambda: torch.cuda.synchronize(backends.device))

        def cpu_run() -> None:
            cpu_cutter.run(CutJob(source, "c", [clip], Path(folder), _Sink()))

        timed("CPU path (PyAV decode, torch stages, libx265)", out_frames, cpu_run, lambda: None)


def bench_ffmpeg(settings: Settings, source: Path, frames: int, nvenc: bool) -> None:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        print("ffmpeg: not on PATH; skipped")
        return
    out_w, out_h = settings.output.width, settings.output.height
    rate = f"fps={float(settings.fps):g}"
    x265 = [
        "-c:v",
        "libx265",
        "-preset",
        settings.encode.preset,
        "-x265-params",
        x265_params(settings.encode),
    ]
    commands = {
        "ffmpeg, CPU decode + scale + libx265": [
            "-i", str(source), "-vf", f"{rate},scale={out_w}:{out_h}", *x265,
        ],
        "ffmpeg, NVDEC + scale_cuda + " + ("hevc_nvenc" if nvenc else "libx265"): [
            "-hwaccel", "cuda", "-hwaccel_output_format", "cuda", "-i", str(source),
            "-vf", f"{rate},scale_cuda={out_w}:{out_h}" + ("" if nvenc else ",hwdownload,format=nv12"),
            *(
                [
                    "-c:v", "hevc_nvenc", "-preset", settings.encode.nvenc_preset,
                    "-tune", settings.encode.nvenc_tuning,
                    "-rc", "vbr", "-cq", f"{round(settings.encode.crf)}",
                    "-maxrate", f"{settings.encode.max_bitrate_kbps}k",
                    "-bufsize", f"{settings.encode.buffer_kbits}k", "-g", str(settings.encode.gop),
                ]
                if nvenc
                else x265
            ),
        ],
    }  # fmt: skip
    print("ffmpeg on the same source:")
    with tempfile.TemporaryDirectory() as folder:
        for label, arguments in commands.items():
            command = [ffmpeg, "-v", "error", "-y", *arguments, "-f", "hevc", str(Path(folder) / "f.hevc")]
            print(f"  $ {' '.join(command)}")
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            seconds = time.perf_counter() - started
            if done.returncode:
                print(f"  {label:<44} failed: {done.stderr.strip().splitlines()[-1:]}")
            else:
                print(f"  {label:<44} {frames / seconds:9.1f} fps  ({seconds:.2f}s)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="length of the generated 1080p source")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    args = parser.parse_args()

    probe = probe_gpu(args.device_id)
    if not probe.has_cuda:
        print(f"no GPU here ({probe.cuda_reason}); nothing to measure on the GPU path")
        return 0
    print(f"GPU {args.device_id}: {probe.device_name}")
    for reason in choose_backends("auto", probe).fallbacks:
        print(f"  fallback: {reason}")
    settings = load_settings(
        None,
        {
            "run.device_id": args.device_id,
            "output.width": args.width,
            "output.height": args.height,
            "encode.codec": "auto",
            "gpu.min_free_memory_mb": 0,
        },
    )
    with tempfile.TemporaryDirectory() as folder:
        frames = args.seconds * SOURCE_FPS
        print(f"making a {SOURCE_W}x{SOURCE_H} H.264 source of {args.seconds}s ...")
        source = make_source(Path(folder) / "source.mp4", args.seconds)
        if probe.nvdec_ok:
            bench_steps(settings, source, args.device_id, probe.nvenc_ok, frames)
        else:
            print(f"per step: skipped, NVDEC unusable ({probe.nvdec_reason})")
        bench_pipeline(settings, source, frames)
        bench_ffmpeg(settings, source, frames, probe.nvenc_ok)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
