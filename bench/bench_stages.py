"""Frames per second of each stage alone and of the whole decode → stages → x265 pipeline.

    .venv/bin/python bench/bench_stages.py                      # CPU-sized defaults
    .venv/bin/python bench/bench_stages.py --width 1280 --height 720 --source-width 640 --source-height 360

The source is skimage's astronaut portrait panning across the frame, so the matte has a person to find
and the upscaler a photo to work on. Figures are printed beside the original workflow's: a one-minute
video (about 1800 frames) through SR + matting + background replacement in 1.7 minutes on an RTX 3060.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.backends import cpu_parts
from daemon.clips import Clip  # noqa: E402
from daemon.config import Settings, load_settings  # noqa: E402
from daemon.cutter import ClipCutter
from daemon.cutting import CutJob  # noqa: E402
from daemon.messages import ClipResult  # noqa: E402
from daemon.stages import FrameBatch, Stage, build_stages  # noqa: E402

ORIGINAL_FPS = 1800 / 102  # RTX 3060: 1-minute video (30 fps) in 1.7 minutes, SR + matting + background


def portrait_frames(count: int, width: int, height: int) -> np.ndarray:
    """(count, height, width, 3) uint8: the astronaut, scaled to the frame height, panning sideways."""
    from skimage import data

    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).unsqueeze(0).float()
    side = height
    photo = torch.nn.functional.interpolate(photo, size=(side, side), mode="bilinear", antialias=True)
    canvas = torch.full((count, 3, height, width), 128.0)
    for index in range(count):
        left = round((width - side) * index / max(count - 1, 1)) if width > side else 0
        visible = min(side, width)
        canvas[index, :, :, left : left + visible] = photo[0, :, :, :visible]
    return canvas.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_source(path: Path, frames: np.ndarray, fps: int = 30) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "16"}
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(frames: int, run: Callable[[], None], device: torch.device) -> float:
    run()  # warm-up: first calls pay for allocation, kernel choice and caches
    sync(device)
    started = time.perf_counter()
    run()
    sync(device)
    return frames / (time.perf_counter() - started)


def stage_alone(stage: Stage, inputs: torch.Tensor, batch_size: int, device: torch.device) -> float:
    def run() -> None:
        state: dict[str, object] = {}
        with torch.inference_mode():
            for chunk in inputs.split(batch_size):
                alpha = torch.ones(chunk.shape[0], 1, *chunk.shape[-2:], device=device)
                stage(
                    FrameBatch(chunk.clone(), alpha=alpha if stage.name == "composite" else None, state=state)
                )

    return rate(inputs.shape[0], run, device)


class _Count:
    def __init__(self) -> None:
        self.results: list[ClipResult] = []

    def clip_finished(self, result: ClipResult) -> None:
        self.results.append(result)

    def frames_encoded(self, count: int) -> None:
        pass

    def frame_decoded(self) -> None:
        pass


def pipeline(settings: Settings, source: Path, frames: int, out: Path, device: torch.device) -> float:
    cutter = ClipCutter(cpu_parts(settings, build_stages(settings, device)))
    clip = Clip(0, frames)

    def run() -> None:
        sink = _Count()
        cutter.run(CutJob(source, "bench", [clip], out, sink))
        errors = [result.error for result in sink.results if result.error]
        if errors:
            raise RuntimeError(errors[0])

    return rate(frames, run, device)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=640, help="output width")
    parser.add_argument("--height", type=int, default=360, help="output height")
    parser.add_argument("--source-width", type=int, default=320, help="below the output size: upscale runs")
    parser.add_argument("--source-height", type=int, default=180)
    parser.add_argument("--frames", type=int, default=8, help="frames per measurement")
    parser.add_argument("--preset", default="ultrafast", help="x265 preset for the pipeline runs")
    parser.add_argument("--device", default="auto", help="cpu, cuda:0, … (auto: cuda:0 when present)")
    args = parser.parse_args()
    device = torch.device(
        args.device if args.device != "auto" else "cuda:0" if torch.cuda.is_available() else "cpu"
    )

    base = {
        "output.width": args.width,
        "output.height": args.height,
        "encode.preset": args.preset,
        "encode.codec": "cpu",
    }
    settings = load_settings(None, {**base, "stages": ["upscale", "resize", "matte", "composite"]})
    source_frames = portrait_frames(args.frames, args.source_width, args.source_height)
    cpu_name = f"{os.cpu_count()} CPU cores"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name
    print(f"device: {device} ({where}); torch threads {torch.get_num_threads()}")
    print(
        f"source {args.source_width}x{args.source_height} -> output {args.width}x{args.height}, "
        f"{args.frames} frames per measurement"
    )

    stages = {stage.name: stage for stage in build_stages(settings, device)}
    source_tensor = torch.from_numpy(source_frames).to(device).permute(0, 3, 1, 2).float().div(255)
    with torch.inference_mode():
        output_size = stages["resize"](FrameBatch(source_tensor.clone())).rgb
    rows: list[tuple[str, float]] = []
    batch = settings.decode.batch_size
    rows.append(
        ("upscale alone (source size in)", stage_alone(stages["upscale"], source_tensor, batch, device))
    )
    rows.append(
        ("resize alone (source size in)", stage_alone(stages["resize"], source_tensor, batch, device))
    )
    rows.append(("matte alone (output size in)", stage_alone(stages["matte"], output_size, batch, device)))
    rows.append(("composite alone (colour)", stage_alone(stages["composite"], output_size, batch, device)))

    with tempfile.TemporaryDirectory() as folder:
        source = write_source(Path(folder) / "source.mp4", source_frames)
        variants = {
            "pipeline, resize only": ["resize"],
            "pipeline, upscale + resize": ["upscale", "resize"],
            "pipeline, upscale + resize + matte (alpha)": ["upscale", "resize", "matte"],
            "pipeline, upscale + resize + matte + composite": ["upscale", "resize", "matte", "composite"],
        }
        for label, names in variants.items():
            chosen = load_settings(None, {**base, "stages": names})
            rows.append((label, pipeline(chosen, source, args.frames, Path(folder) / "out", device)))

    width = max(len(label) for label, _ in rows)
    for label, fps in rows:
        print(f"  {label:<{width}}  {fps:8.2f} frames/s")
    print(
        f"  {'original workflow, RTX 3060, SR + matting + background':<{width}}  {ORIGINAL_FPS:8.2f} frames/s"
        "  (1800 frames in 102 s, output size not stated)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
