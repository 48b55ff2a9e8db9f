"""Pipeline throughput, memory and temp-disk use, next to per-clip ffmpeg commands doing the same job.

    python bench/bench_pipeline.py [--minutes 1 10] [--clips 8] [--clip-seconds 4] [--preset ultrafast]

For each source length it serves a generated H.264 video over a loopback HTTP server, runs
`download_and_process` on it with one worker (download, decode once, resize, libx265), and then,
when an `ffmpeg` binary is on PATH, one `ffmpeg -ss … -frames:v … -vf fps,scale -c:v libx265`
per clip with the same preset and rate control. It prints frames per second for both, their
ratio, the peak RSS of the largest process and the peak size of the temp folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from daemon.config import load_settings  # noqa: E402
from daemon.encode import x265_params  # noqa: E402

from server import MediaServer  # noqa: E402

SOURCE_W, SOURCE_H, SOURCE_FPS = 960, 540, 30
OUT_W, OUT_H = 640, 360


def make_source(path: Path, seconds: int) -> Path:
    """A moving gradient with a counter-like pattern: cheap to make, not trivially compressible.

    Encoded and tagged as BT.709 limited range, as online video sources nearly always are.
    """
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 40, (SOURCE_H, SOURCE_W, 3), dtype=np.uint8)
    x = np.linspace(0, 255, SOURCE_W, dtype=np.float32)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=SOURCE_FPS)
        stream.width, stream.height, stream.pix_fmt = SOURCE_W, SOURCE_H, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28", "g": "60"}
        stream.codec_context.colorspace = Colorspace.ITU709
        stream.codec_context.color_range = ColorRange.MPEG
        stream.codec_context.color_primaries = 1
        stream.codec_context.color_trc = 1
        for index in range(seconds * SOURCE_FPS):
            shift = (x + index * 4) % 256
            image = np.empty((SOURCE_H, SOURCE_W, 3), np.uint8)
            image[..., 0] = shift.astype(np.uint8)
            image[..., 1] = (index * 2) % 256
            image[..., 2] = 255 - shift.astype(np.uint8)
            image[(index * 7) % SOURCE_H :: 37] = 255
            image += noise
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
            )
            frame.pts = index
            frame.time_base = Fraction(1, SOURCE_FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def clip_lines(seconds: int, clips: int, clip_seconds: int, layout: str) -> list[tuple[int, int]]:
    """`clips` clips of `clip_seconds` (30 fps frame indices): spread evenly over the video
    (`sparse`), or back to back from the middle of it (`dense`, as in clip files cut from scenes)."""
    if layout == "dense":
        first = max(0, (seconds - clips * clip_seconds) // 2)
        starts = [first + i * clip_seconds for i in range(clips)]
    else:
        span = seconds - clip_seconds
        starts = [round(span * i / max(1, clips - 1)) for i in range(clips)]
    return [(s * 30, (s + clip_seconds) * 30) for s in starts]


def folder_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += (Path(root) / name).stat().st_size
    return total


class PeakWatcher(threading.Thread):
    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, folder_size(self.folder))
            time.sleep(0.05)


def child_peak_rss_mb(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run a command; return (wall seconds, peak RSS MB of the largest descendant, stdout)."""
    script = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.monotonic()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.monotonic() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "sys.stderr.write(p.stderr)\n"
        "print(json.dumps([wall, rss, p.stdout, p.returncode]))\n"
    )
    import json

    result = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, env=env)
    wall, rss, stdout, code = json.loads(result.stdout.strip().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"command failed ({code}): {' '.join(command)}\n{result.stderr[-2000:]}")
    return wall, rss, stdout


def run_pipeline(source: Path, seconds: int, clips: list[tuple[int, int]], preset: str, work: Path) -> dict:
    clip_dir, out, temp = work / "clips", work / "out", work / "temp"
    for folder in (clip_dir, out, temp):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    (clip_dir / "src.txt").write_text("".join(f"{s:07d} {e:07d}\n" for s, e in clips))
    config = work / "bench.toml"
    config.write_text(
        f'stages = ["resize"]\n[run]\nstart_delay = 0.0\n[output]\nwidth = {OUT_W}\nheight = {OUT_H}\n'
        f'[encode]\npreset = "{preset}"\ncodec = "cpu"\n'
    )
    with MediaServer() as server:
        url = server.add("src.mp4", source)
        (work / "urls.txt").write_text(url + "\n")
        watcher = PeakWatcher(temp)
        watcher.start()
        command = [
            sys.executable, "-m", "daemon", "-u", str(work / "urls.txt"), "-c", str(clip_dir), "-o", str(out),
            "--temp-dir", str(temp), "--config", str(config), "--workers", "1",
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        wall, rss, stdout = child_peak_rss_mb(command, env)
        watcher.done.set()
        watcher.join()
    made = sum(1 for _ in out.glob("src/*.hevc"))
    assert made == len(clips), stdout
    with sqlite3.connect(out / "ledger.sqlite") as db:
        download_seconds, process_seconds = db.execute(
            "SELECT download_seconds, process_seconds FROM urls"
        ).fetchone()
    return {
        "wall": wall,
        "frames": sum(e - s for s, e in clips),
        "rss_mb": rss,
        "temp_peak_mb": watcher.peak / 1e6,
        "download_seconds": download_seconds,
        "process_seconds": process_seconds,
    }


def run_ffmpeg(source: Path, clips: list[tuple[int, int]], preset: str, work: Path) -> dict | None:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return None
    out = work / "ffmpeg"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    params = x265_params(load_settings(None).encode)
    wall = 0.0
    peak = 0.0
    for start, end in clips:
        command = [
            ffmpeg, "-v", "error", "-y", "-ss", f"{start / 30:.6f}", "-i", str(source),
            "-frames:v", str(end - start), "-vf", f"fps=30,scale={OUT_W}:{OUT_H}",
            "-c:v", "libx265", "-preset", preset, "-x265-params", params, "-pix_fmt", "yuv420p",
            "-f", "hevc", str(out / f"src_{start:07d}_{end:07d}.hevc"),
        ]  # fmt: skip
        seconds, rss, _ = child_peak_rss_mb(command, dict(os.environ))
        wall += seconds
        peak = max(peak, rss)
    return {"wall": wall, "frames": sum(e - s for s, e in clips), "rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--clip-seconds", type=int, default=4)
    parser.add_argument("--preset", default="ultrafast")
    parser.add_argument("--layout", choices=("sparse", "dense"), default="sparse")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dap-bench")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'unknown CPU'}")
    print(
        f"source {SOURCE_W}x{SOURCE_H} H.264 {SOURCE_FPS} fps -> {OUT_W}x{OUT_H} HEVC, "
        f"x265 preset {args.preset}, {args.clips} {args.layout} clips of {args.clip_seconds}s"
    )
    columns = ("source", "tool", "wall s", "frames", "fps", "peak RSS MB", "temp MB")
    print("{:>8} {:<22} {:>7} {:>7} {:>7} {:>12} {:>8}".format(*columns))
    for minutes in args.minutes:
        seconds = int(minutes * 60)
        source = make_source(args.work / f"source-{seconds}s-bt709.mp4", seconds)
        clips = clip_lines(seconds, args.clips, args.clip_seconds, args.layout)
        ours = run_pipeline(source, seconds, clips, args.preset, args.work)
        label = f"{minutes:g} min"
        print(
            f"{label:>8} {'download_and_process':<22} {ours['wall']:7.1f} {ours['frames']:7d} "
            f"{ours['frames'] / ours['wall']:7.1f} {ours['rss_mb']:12.0f} {ours['temp_peak_mb']:8.1f}"
        )
        print(
            f"{label:>8} {'  of which processing':<22} {ours['process_seconds']:7.1f} {ours['frames']:7d} "
            f"{ours['frames'] / ours['process_seconds']:7.1f}   (download {ours['download_seconds']:.1f}s, "
            f"the rest is start-up: interpreter, torch import, worker spawn)"
        )
        peer = run_ffmpeg(source, clips, args.preset, args.work)
        if peer is None:
            print(f"{label:>8} {'ffmpeg per clip':<22} (no ffmpeg binary on PATH: peer not run)")
            continue
        print(
            f"{label:>8} {'ffmpeg per clip':<22} {peer['wall']:7.1f} {peer['frames']:7d} "
            f"{peer['frames'] / peer['wall']:7.1f} {peer['rss_mb']:12.0f} {'-':>8}"
        )
        print(
            f"{label:>8} ratio of fps, ours / ffmpeg: end to end {peer['wall'] / ours['wall']:.2f}, "
            f"processing alone {peer['wall'] / ours['process_seconds']:.2f}"
        )


if __name__ == "__main__":
    main()
