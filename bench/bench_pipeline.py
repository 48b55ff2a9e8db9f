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
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def h264_writer(
    path: Path,
    width: int,
    height: int,
    options: dict[str, str],
    fps: int = SOURCE_FPS,
    index_first: bool = False,
) -> Iterator[Callable[[av.VideoFrame], None]]:
    """Write an MP4 with one libx264 stream tagged BT.709 limited range; yields `write(frame)`.
    With `index_first` its index (`moov`) goes before the pictures, as web servers serve MP4s.

    The file appears under its name only once complete (a `.part` file renamed), so a cached source
    interrupted half-way is made again rather than reused."""
    part = path.with_name(path.name + ".part")
    muxing = {"movflags": "faststart"} if index_first else {}
    with av.open(str(part), "w", format="mp4", options=muxing) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        stream.codec_context.colorspace = Colorspace.ITU709
        stream.codec_context.color_range = ColorRange.MPEG
        stream.codec_context.color_primaries = 1
        stream.codec_context.color_trc = 1
        count = 0

        def write(frame: av.VideoFrame) -> None:
            nonlocal count
            frame.pts = count
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
            count += 1

        yield write
        container.mux(stream.encode(None))
    os.replace(part, path)


def make_source(
    path: Path, seconds: int, width: int = SOURCE_W, height: int = SOURCE_H, seed: int = 0
) -> Path:
    """A moving gradient with a counter-like pattern: cheap to make, not trivially compressible.

    Encoded and tagged as BT.709 limited range, as online video sources nearly always are.
    """
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    x = np.linspace(0, 255, width, dtype=np.float32)
    with h264_writer(path, width, height, {"preset": "ultrafast", "crf": "28", "g": "60"}) as write:
        for index in range(seconds * SOURCE_FPS):
            shift = (x + index * 4 + seed * 64) % 256
            image = np.empty((height, width, 3), np.uint8)
            image[..., 0] = shift.astype(np.uint8)
            image[..., 1] = (index * 2) % 256
            image[..., 2] = 255 - shift.astype(np.uint8)
            image[(index * 7) % height :: 37] = 255
            image += noise
            write(
                av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                    format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
                )
            )
    return path


def write_config(path: Path, preset: str, width: int = OUT_W, height: int = OUT_H) -> Path:
    """A resize-only, CPU-encoding settings file for the daemon: what the benches run it with."""
    path.write_text(
        f'stages = ["resize"]\n[run]\nstart_delay = 0.0\n[output]\nwidth = {width}\nheight = {height}\n'
        f'[encode]\npreset = "{preset}"\ncodec = "cpu"\n'
    )
    return path


def daemon_command(
    urls: Path,
    clip_dir: Path,
    out: Path,
    temp: Path,
    config: Path,
    workers: int | str,
    python: str = sys.executable,
) -> list[str]:
    """The one-shot CLI; run it with PYTHONPATH=ROOT so that it is this checkout's code that runs."""
    return [
        python, "-m", "daemon", "--urls-file", str(urls), "--input-clip-dir", str(clip_dir),
        "--output-dir", str(out), "--temp-dir", str(temp), "--config", str(config),
        "--workers", str(workers), "--start-delay", "0",
    ]  # fmt: skip


def ffmpeg_clip_command(
    ffmpeg: str, source: Path, start: int, end: int, preset: str, params: str, target: Path, vf: str
) -> list[str]:
    """One clip as a shell loop would cut it: input seek, a frame count, our x265 rate control."""
    return [
        ffmpeg, "-v", "error", "-y", "-ss", f"{start / 30:.6f}", "-i", str(source),
        "-frames:v", str(end - start), "-vf", vf,
        "-c:v", "libx265", "-preset", preset, "-x265-params", params, "-pix_fmt", "yuv420p",
        "-f", "hevc", str(target),
    ]  # fmt: skip


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
    config = write_config(work / "bench.toml", preset)
    with MediaServer() as server:
        url = server.add("src.mp4", source)
        (work / "urls.txt").write_text(url + "\n")
        watcher = PeakWatcher(temp)
        watcher.start()
        command = daemon_command(work / "urls.txt", clip_dir, out, temp, config, workers=1)
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
        target = out / f"src_{start:07d}_{end:07d}.hevc"
        command = ffmpeg_clip_command(
            ffmpeg, source, start, end, preset, params, target, f"fps=30,scale={OUT_W}:{OUT_H}"
        )
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
            f"the rest is start-up: interpreter, imports, worker spawn)"
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
