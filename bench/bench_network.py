"""End-to-end throughput on a network-shaped job: ours next to the script users write, and the bound
(issue 25's proof).

    python bench/bench_network.py [--small] [--repeats 3] [--bandwidth-mbs auto] [--connections 2]
                                  [--latency-ms 40] [--loaded] [--index-last] [--svg FILE] [--work DIR]

The job (sources generated here and cached in --work): 8 sources of 1280x720 H.264 high profile with
fresh grain on every frame, 20 to 30 s long at 8 to 12 Mbit/s, a keyframe every 5 s; 4 clips of 90
frames scattered over each, resize-only to 640x360 (x265 ultrafast). Their index (`moov`) comes
first, as in the MP4s web servers serve, so a source can be read while it arrives; `--index-last`
puts it at the end, where nothing can be read before the whole file is there. `--small`: 2 sources
of 12 s, 2 clips each, one repetition, to check that everything runs.

The sources are served by bench/cdn_server.py on 127.0.0.1: HTTP Range, `--latency-ms` per
request, `--bandwidth-mbs` per connection and a link of `--connections` times that. `auto` picks the
bandwidth at which downloading the job takes as long as processing it (network bound = CPU bound,
the case where overlapping the two matters most) from the CPU-seconds measured first.

Sides, alternating within each repetition, median of the repetitions:
  ours --workers auto, 2, 3   the real CLI (`python -m daemon`) of this checkout, URLs from the server
  naive script                per URL, two at a time (`xargs -P 2`): the yt-dlp CLI downloads it,
                              one `ffmpeg -ss … -frames:v 90 -vf scale=640:360 -c:v libx265` per clip
                              (the ffmpeg-loop peer of the other benches), then `rm`
The bound is max(total bytes / (per-connection bandwidth x connections), CPU-seconds of ours
processing the same clips from local files (all processes, from the kernel's resource usage) /
cores). Every figure is printed as seconds, ours also as a fraction of the bound (bound / wall).
The per-worker timeline of the last run of each `ours` side (downloading and processing, from the
worker logs' timestamps) is printed as text, and drawn into `--svg FILE` as a picture.
`--loaded` runs a CPU hog pinned to core 0 (`taskset -c 0 python -c 'while True: pass'`) during
every measured run (not during the CPU-seconds measurement).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import av
import numpy as np
from bench_pipeline import OUT_H, OUT_W, ROOT, daemon_command, ffmpeg_clip_command, write_config
from bench_throughput import (
    FFMPEG,
    FPS,
    PRESET,
    checked_frames,
    count_frames,
    fresh_folder,
    machine,
    make_grain_source,
    scattered_clips,
)
from cdn_server import CdnServer

from daemon.config import auto_workers, load_settings
from daemon.encode import x265_params

CLIP_FRAMES = 90
NAIVE_AT_A_TIME = 2
YT_DLP = str(Path(sys.executable).parent / "yt-dlp")


@dataclass
class Source:
    path: Path
    clips: list[tuple[int, int]]

    @property
    def video_id(self) -> str:
        return self.path.stem


@dataclass
class Sample:
    wall: float
    cpu: float  # user + system seconds of the whole process tree
    frames: int
    served: int  # bytes the server sent during the run
    timeline: list[Interval] = field(default_factory=list)


@dataclass
class Interval:
    worker: str
    kind: str  # "download" or "process"
    video_id: str
    start: float  # seconds since the run started
    end: float


def make_network_source(path: Path, seconds: int, kbits: int, seed: int, index_first: bool) -> Path:
    """1280x720 high profile H.264 at about `kbits` kbit/s, made as the throughput bench makes its
    sources (moving texture, fresh grain on every frame, B-frames), with a keyframe every 5 s; its
    index first (as a web server's MP4 has it) or last."""
    rate = f"bitrate={kbits}:vbv-maxrate={kbits * 5 // 4}:vbv-bufsize={kbits * 2}"
    return make_grain_source(
        path, seconds, 1280, 720, seed=seed, grain=5.0, margin=256, x264_params=rate, index_first=index_first
    )


def build_sources(folder: Path, small: bool, index_first: bool = True) -> list[Source]:
    folder.mkdir(parents=True, exist_ok=True)
    count, clips = (2, 2) if small else (8, 4)
    sources = []
    for index in range(count):
        seconds = 12 if small else 20 + round(10 * index / (count - 1))  # 20 … 30 s
        kbits = 8000 + 4000 * ((index * 3) % count) // (count - 1)  # 8 … 12 Mbit/s, not in step with length
        name = f"net{index}-{seconds}s-{kbits // 1000}M{'' if index_first else '-index-last'}.mp4"
        started = time.monotonic()
        path = make_network_source(folder / name, seconds, kbits, seed=index, index_first=index_first)
        if time.monotonic() - started > 1:
            print(f"(made {name} in {time.monotonic() - started:.0f} s; cached from now on)", flush=True)
        sources.append(Source(path, scattered_clips(seconds * FPS, clips, CLIP_FRAMES, seed=index)))
    return sources


def run_tree(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run a command, output to `log`; returns (wall seconds, CPU-seconds of it and every descendant
    it waited for, from the kernel's resource usage)."""
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"failed ({process.returncode}): {shlex.join(command)}\n{tail}")
    return wall, usage.ru_utime + usage.ru_stime


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def worker_timeline(log_dir: Path, began: float) -> list[Interval]:
    """Download and process intervals per worker, from the worker logs (daemon/logs.py's LINE_FORMAT:
    `time | level | worker | video id | stage | message`). A download runs from `downloading …` to
    `downloaded …` (or `stopped downloading …`: every clip was cut before the end); processing from
    `cutting on …` (a processing slot taken; before there was one, the source's last
    download-stage record, its probe) to its last process-stage record (its last clip written).
    A source cut while it arrives has both at once."""
    intervals: list[Interval] = []
    for path in sorted(log_dir.glob("worker-*.log")):
        open_download: dict[str, float] = {}
        last_download: dict[str, float] = {}
        last_process: dict[str, float] = {}
        cutting: dict[str, float] = {}
        worker = path.stem
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = [part.strip() for part in line.split(" | ", 5)]
            if len(fields) < 6:
                continue
            when, _, _, video, stage, message = fields
            seconds = stamp(when) - began
            if stage == "download":
                if message.startswith("downloading "):
                    open_download[video] = seconds
                elif message.startswith(("downloaded ", "stopped downloading ")) and video in open_download:
                    intervals.append(Interval(worker, "download", video, open_download.pop(video), seconds))
                last_download[video] = seconds
            elif stage == "process":
                last_process[video] = seconds
                if message.startswith("cutting on "):
                    cutting[video] = seconds
        for video, end in last_process.items():
            start = cutting.get(video, last_download.get(video, end))
            intervals.append(Interval(worker, "process", video, start, end))
    return sorted(intervals, key=lambda i: (i.worker, i.start))


class Runner:
    def __init__(self, work: Path, sources: list[Source], loaded: bool) -> None:
        self.work = work
        self.sources = sources
        self.loaded = loaded
        self.config = write_config(work / "network.toml", PRESET)
        self.params = x265_params(load_settings(self.config).encode)
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.count = 0
        self.clip_dir = work / "clips"
        self.clip_dir.mkdir(parents=True, exist_ok=True)
        for source in sources:
            lines = "".join(f"{start} {end}\n" for start, end in source.clips)
            (self.clip_dir / f"{source.video_id}.txt").write_text(lines)
        self.frames = sum(end - start for source in sources for start, end in source.clips)

    def fresh(self, name: str) -> Path:
        self.count += 1
        return fresh_folder(self.work, self.count, name)

    def hog(self) -> subprocess.Popen[bytes] | None:
        if not self.loaded:
            return None
        return subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])

    def measured(
        self, command: list[str], env: dict[str, str], log: Path, load: bool = True
    ) -> tuple[float, float]:
        hog = self.hog() if load else None
        try:
            return run_tree(command, env, log)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()

    def ours(self, workers: str, urls: list[str], server: CdnServer | None, load: bool = True) -> Sample:
        folder = self.fresh(f"ours-{workers}" + ("-local" if server is None else ""))
        url_list = folder / "urls.txt"
        url_list.write_text("".join(f"{url}\n" for url in urls))
        out = folder / "out"
        command = daemon_command(url_list, self.clip_dir, out, folder / "temp", self.config, workers)
        served = server.bytes_served if server else 0
        began = time.time()
        wall, cpu = self.measured(command, self.env, folder / "log.txt", load)
        frames = checked_frames(out, f"ours --workers {workers}")
        timeline = worker_timeline(out / "logs", began)
        shutil.rmtree(folder)
        return Sample(wall, cpu, frames, (server.bytes_served - served) if server else 0, timeline)

    def naive(self, urls: list[str], server: CdnServer) -> Sample:
        """The script a user writes: one small shell script per URL, run two at a time by xargs."""
        folder = self.fresh("naive")
        scripts = []
        for source, url in zip(self.sources, urls, strict=True):
            downloaded = folder / source.video_id / "source.mp4"
            lines = ["set -eu", shlex.join([YT_DLP, "-q", "--no-progress", "-o", str(downloaded), url])]
            for start, end in source.clips:
                target = folder / f"{source.video_id}_{start:07d}_{end:07d}.hevc"
                vf = f"scale={OUT_W}:{OUT_H}"
                lines.append(
                    shlex.join(
                        ffmpeg_clip_command(FFMPEG, downloaded, start, end, PRESET, self.params, target, vf)
                    )
                )
            lines.append(shlex.join(["rm", "-rf", str(downloaded.parent)]))
            script = folder / f"{source.video_id}.sh"
            script.write_text("\n".join(lines) + "\n")
            scripts.append(str(script))
        (folder / "scripts.txt").write_text("".join(f"{script}\n" for script in scripts))
        command = ["xargs", "-a", str(folder / "scripts.txt"), "-P", str(NAIVE_AT_A_TIME), "-n", "1", "bash"]
        served = server.bytes_served
        wall, cpu = self.measured(command, dict(os.environ), folder / "log.txt")
        frames = count_frames(sorted(folder.glob("*.hevc")))
        left = [path.name for path in folder.iterdir() if path.is_dir()]
        if left:
            raise SystemExit(f"naive script left sources behind: {left}")
        shutil.rmtree(folder)
        return Sample(wall, cpu, frames, server.bytes_served - served)


@dataclass
class Side:
    label: str
    samples: list[Sample] = field(default_factory=list)

    def wall(self) -> float:
        return statistics.median(s.wall for s in self.samples)

    def cpu(self) -> float:
        return statistics.median(s.cpu for s in self.samples)

    def walls(self) -> str:
        return " ".join(f"{s.wall:.1f}" for s in self.samples)


def timeline_text(label: str, intervals: list[Interval], wall: float, cores: int, connections: int) -> str:
    """Per worker: a bar (D downloading, P processing, B both: cutting a source that still
    arrives, . neither), its intervals, and what the
    machine was doing: how long no worker processed, how long fewer workers processed than there are
    cores, how long fewer downloads ran than the link carries at full speed."""
    width = 100
    step = wall / width
    lines = [f"timeline of {label} (last run, {wall:.1f} s wall; one character = {step:.2f} s)"]
    workers = sorted({i.worker for i in intervals})
    for worker in workers:
        bar = ["."] * width
        for interval in (i for i in intervals if i.worker == worker):
            mark = "D" if interval.kind == "download" else "P"
            for cell in range(int(interval.start / step), min(width, int(np.ceil(interval.end / step)))):
                bar[cell] = mark if bar[cell] in (".", mark) else "B"
        lines.append(f"  {worker:<9} |{''.join(bar)}|")
    for worker in workers:
        spans = [
            f"{i.kind[0].upper()} {i.video_id.split('-')[0]} {i.start:.1f}-{i.end:.1f}"
            for i in intervals
            if i.worker == worker
        ]
        lines.append(f"  {worker}: " + ", ".join(spans))
    grid = np.arange(0, wall, 0.01)

    def busy(kind: str) -> np.ndarray:
        count = np.zeros(len(grid))
        for i in (i for i in intervals if i.kind == kind):
            count += (grid >= i.start) & (grid < i.end)
        return count

    downloading, processing = busy("download"), busy("process")
    tick = 0.01  # seconds per grid step
    lines.append(
        f"  no worker processing {tick * np.sum(processing == 0):.1f} s; "
        f"fewer processing than the {cores} cores {tick * np.sum(processing < cores):.1f} s; "
        f"no download {tick * np.sum(downloading == 0):.1f} s; "
        f"fewer downloads than the link's {connections} connections "
        f"{tick * np.sum(downloading < connections):.1f} s; "
        f"mean downloads in flight {downloading.mean():.2f}, mean workers processing {processing.mean():.2f}"
    )
    return "\n".join(lines)


def draw_timelines(path: Path, timelines: list[tuple[str, list[Interval], float]]) -> None:
    """The timelines as an SVG picture (no plotting library needed): a band per side, a row per
    worker, downloading in blue on its upper half and cutting in orange on its lower half (a source
    cut while it arrives has both), on one time axis in seconds."""
    left, right, row_px, gap_px, scale_px = 90, 20, 18, 40, 14.0
    longest = max(wall for _, _, wall in timelines)
    width = int(left + right + longest * scale_px)
    parts: list[str] = []
    y = 10
    for label, intervals, wall in timelines:
        workers = sorted({i.worker for i in intervals})
        parts.append(f'<text x="4" y="{y + 12}" font-weight="bold">{label}: {wall:.1f} s wall</text>')
        y += 20
        for row, worker in enumerate(workers):
            top = y + row * row_px
            parts.append(f'<text x="4" y="{top + 13}">{worker}</text>')
            for i in (i for i in intervals if i.worker == worker):
                colour = "#1f77b4" if i.kind == "download" else "#ff7f0e"
                half = (row_px - 3) / 2
                offset = 0.0 if i.kind == "download" else half
                parts.append(
                    f'<rect x="{left + i.start * scale_px:.1f}" y="{top + offset}" height="{half}" '
                    f'width="{max(0.5, (i.end - i.start) * scale_px):.1f}" fill="{colour}">'
                    f"<title>{worker} {i.kind} {i.video_id} {i.start:.1f}-{i.end:.1f} s</title></rect>"
                )
        y += len(workers) * row_px
        for second in range(0, int(wall) + 1, 5):
            x = left + second * scale_px
            parts.append(f'<line x1="{x}" x2="{x}" y1="{y}" y2="{y + 4}" stroke="black"/>')
            parts.append(f'<text x="{x - 6}" y="{y + 16}" font-size="10">{second}</text>')
        y += gap_px
    legend = (
        f'<text x="4" y="{y}"><tspan fill="#1f77b4">■ downloading</tspan> '
        '<tspan fill="#ff7f0e">■ cutting</tspan> (seconds since the run started)</text>'
    )
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 10}" '
        f'font-family="sans-serif" font-size="12">\n' + "\n".join([*parts, legend]) + "\n</svg>\n"
    )
    print(f"timelines drawn into {path}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--small", action="store_true", help="2 short sources, 1 repetition: a check that it runs"
    )
    parser.add_argument("--repeats", type=int, help="repetitions (3; 1 with --small)")
    parser.add_argument("--bandwidth-mbs", default="auto", help="per connection, 10^6 bytes/s, or auto")
    parser.add_argument(
        "--connections", type=int, default=2, help="connections the link carries at full speed"
    )
    parser.add_argument("--latency-ms", type=float, default=40.0, help="delay before every response")
    parser.add_argument("--workers", nargs="+", default=["auto", "2", "3"], help="ours' worker counts")
    parser.add_argument("--loaded", action="store_true", help="a CPU hog on core 0 during every measured run")
    parser.add_argument(
        "--index-last",
        action="store_true",
        help="sources with their index at the end (moov last): nothing can be read before all arrived",
    )
    parser.add_argument("--svg", type=Path, help="draw the timelines into this SVG file")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "dap-bench-network",
        help="sources are cached here; each run works in a fresh folder under it",
    )  # fmt: skip
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.small else 3)
    began = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    sources = build_sources(
        args.work / ("sources-small" if args.small else "sources"), args.small, not args.index_last
    )
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.work))
    runner = Runner(run_dir, sources, args.loaded)
    cores = len(os.sched_getaffinity(0))
    total_bytes = sum(source.path.stat().st_size for source in sources)
    seconds_of_video = 0.0
    for source in sources:
        with av.open(str(source.path)) as container:
            seconds_of_video += (container.duration or 0) / 1e6
    print(machine())
    print(
        f"job: {len(sources)} sources 1280x720 H.264 with grain, {seconds_of_video:.0f} s of video, "
        f"{total_bytes / 1e6:.1f} MB ({8 * total_bytes / seconds_of_video / 1e6:.1f} Mbit/s on average); "
        f"{sum(len(s.clips) for s in sources)} clips x {CLIP_FRAMES} frames -> {OUT_W}x{OUT_H}, "
        f"x265 {PRESET}; median of {repeats}; ours: {ROOT}; --workers auto is {auto_workers('cpu', 2)} here"
        + ("; LOADED: a CPU hog on core 0 during every measured run" if args.loaded else "")
    )

    # The CPU bound: ours on the local files, every process's CPU-seconds, over the cores.
    local = [str(source.path.resolve()) for source in sources]
    cpu_runs = [runner.ours("auto", local, None, load=False) for _ in range(repeats)]
    cpu_seconds = statistics.median(s.cpu for s in cpu_runs)
    cpu_bound = cpu_seconds / cores
    print(
        f"CPU-seconds of ours on the local files (--workers auto, unloaded): "
        f"{' '.join(f'{s.cpu:.1f}' for s in cpu_runs)} -> {cpu_seconds:.1f} CPU-s / {cores} cores "
        f"= {cpu_bound:.1f} s "
        f"(wall {' '.join(f'{s.wall:.1f}' for s in cpu_runs)} s)"
    )
    if args.bandwidth_mbs == "auto":
        bandwidth = total_bytes / (cpu_bound * args.connections)
        print(
            f"bandwidth auto: {bandwidth / 1e6:.2f} MB/s per connection, "
            "so that the network bound equals the CPU bound"
        )
    else:
        bandwidth = float(args.bandwidth_mbs) * 1e6
    network_bound = total_bytes / (bandwidth * args.connections)
    bound = max(network_bound, cpu_bound)
    print(
        f"CDN: 127.0.0.1, {bandwidth / 1e6:.2f} MB/s per connection, link {args.connections} x that, "
        f"{args.latency_ms:g} ms per request"
    )
    print(
        f"bound: max(network {total_bytes / 1e6:.1f} MB / "
        f"({bandwidth / 1e6:.2f} MB/s x {args.connections}) = "
        f"{network_bound:.1f} s, CPU {cpu_bound:.1f} s) = {bound:.1f} s"
        + (
            f"; with the hog holding a whole core, CPU {cpu_seconds / max(1, cores - 1):.1f} s"
            if args.loaded
            else ""
        )
    )

    sides = [Side(f"ours --workers {w}") for w in args.workers] + [
        Side(f"naive script (xargs -P {NAIVE_AT_A_TIME})")
    ]
    lifetime = repeats * len(sides) * (4 * bound + 120) + 600  # the server stops by itself after this
    with CdnServer(
        bandwidth, args.connections, args.latency_ms / 1000, lifetime, run_dir / "cdn.log"
    ) as server:
        urls = [server.add(source.path) for source in sources]
        for _ in range(repeats):  # alternating, so that a noisy neighbour hits every side alike
            for workers, side in zip(args.workers, sides[:-1], strict=True):
                side.samples.append(runner.ours(workers, urls, server))
            sides[-1].samples.append(runner.naive(urls, server))
        log_lines = (run_dir / "cdn.log").read_text().count("\n")

    naive = sides[-1]
    print(f"\n{'side':<28} | wall s (median) | runs s           | CPU-s | bound / wall | naive / wall")
    for side in sides:
        print(
            f"{side.label:<28} | {side.wall():15.1f} | {side.walls():<16} | {side.cpu():5.1f} | "
            f"{bound / side.wall():12.2f} | {naive.wall() / side.wall():12.2f}"
        )
    print(f"{'bound':<28} | {bound:15.1f} |")
    frames = {s.frames for side in sides for s in side.samples}
    check = (
        "same on every side" if frames == {runner.frames} else f"MISMATCH {sorted(frames)} vs {runner.frames}"
    )
    print(f"frames written: {runner.frames} per run, {check}")
    served = {side.label: statistics.median(s.served for s in side.samples) for side in sides}
    print(
        f"bytes served per run (the sources are {total_bytes}): "
        + ", ".join(f"{label} {value:.0f}" for label, value in served.items())
        + f"; {log_lines} requests in the CDN log"
    )
    timelines = []
    for side in sides[:-1]:
        last = side.samples[-1]
        print("\n" + timeline_text(side.label, last.timeline, last.wall, cores, args.connections))
        timelines.append((side.label, last.timeline, last.wall))
    if args.svg:
        draw_timelines(args.svg, timelines)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"bench took {time.monotonic() - began:.0f} s")
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if frames == {runner.frames} else 1


if __name__ == "__main__":
    sys.exit(main())
