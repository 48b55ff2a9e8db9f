"""Throughput per job shape, ours next to a shell loop over ffmpeg, in one run (issue 10's proof).

    python bench/bench_throughput.py [--jobs one-url list-2-workers 1080p-short-clips] [--repeats 3]
                                     [--no-auto] [--work DIR]

Job shapes (sources generated here and cached in --work):
  one-url            one 60 s 1280x720 H.264 source, 6 clips x 150 frames -> 640x360; ours --workers 1
                     vs the 6 `ffmpeg -ss … -i SRC -frames:v N -vf scale … -c:v libx265` one after another
  list-2-workers     4 such sources, 24 clips; ours --workers 2 vs the 24 commands two at a time
  1080p-short-clips  one 60 s 1920x1080 H.264 high-profile source (B-frames, a keyframe every 5 s,
                     per-frame grain), 24 clips of 60 frames scattered over it -> 640x360; ours --workers 1
                     vs the 24 commands one after another, and two at a time

Ours is the real CLI (`python -m daemon`) of the checkout this file lives in, with a resize-only,
ultrafast, CPU-encoding config; the peer gets the same x265 rate control (`x265_params`). Each
repetition alternates ours, ours with `--workers auto` (left out with --no-auto) and the peer(s),
each in a fresh output folder; tables give the medians, and auto's speed over the job's fixed count.
Frames per second = frames written / wall seconds; both sides' outputs are counted and must agree.
Also printed: the encode-only bound (libx265 on raw 640x360 frames in memory), our start-up time
(a 3-frame job) and the peak RSS of the largest process of each side.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.frame import PictureType
from bench_pipeline import (
    OUT_H,
    OUT_W,
    ROOT,
    clip_lines,
    daemon_command,
    ffmpeg_clip_command,
    h264_writer,
    make_source,
    write_config,
)

from daemon.config import load_settings
from daemon.encode import x265_params

FFMPEG = "/usr/bin/ffmpeg"
PRESET = "ultrafast"
FPS = 30
JOBS = ("one-url", "list-2-workers", "1080p-short-clips")
BOUND_FRAMES = 300


@dataclass
class Job:
    name: str
    title: str
    sources: list[tuple[Path, list[tuple[int, int]]]]
    workers: int
    peers: list[tuple[str, int]]  # (label, commands at a time)

    @property
    def frames(self) -> int:
        return sum(end - start for _, clips in self.sources for start, end in clips)


@dataclass
class Sample:
    wall: float
    frames: int
    rss_mb: float


@dataclass
class Side:
    label: str
    samples: list[Sample] = field(default_factory=list)

    def fps(self) -> float:
        return statistics.median(s.frames / s.wall for s in self.samples)

    def walls(self) -> str:
        return " ".join(f"{s.wall:.1f}" for s in self.samples)


def make_grain_source(
    path: Path,
    seconds: int = 60,
    width: int = 1920,
    height: int = 1080,
    *,
    seed: int = 10,
    grain: float = 4.0,
    margin: int = 512,
    x264_params: str = "crf=21",
    index_first: bool = False,
) -> Path:
    """Moving smooth texture plus fresh grain on every frame: high profile, B-frames, GOP of 150.

    The grain makes every frame carry real residuals, so that decoding it costs about what decoding
    camera footage of the same size and bitrate costs. `x264_params` sets the rate (a CRF, or a
    bitrate with its VBV)."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)

    def texture(h: int, w: int) -> np.ndarray:
        coarse = rng.integers(40, 216, (h // 16 + 2, w // 16 + 2)).astype(np.float32)
        fine = np.kron(coarse, np.ones((16, 16), np.float32))[:h, :w]
        for axis in (0, 1):  # a box blur, cheap and enough to take the blocks' edges off
            fine = sum(np.roll(fine, shift, axis) for shift in range(-8, 8)) / 16
        return fine.astype(np.int16)

    luma = texture(height + margin, width + margin)
    chroma = [texture((height + margin) // 2, (width + margin) // 2) // 2 + 64 for _ in range(2)]
    grains = [rng.normal(0, grain, (height + 64, width + 64)).astype(np.int16) for _ in range(8)]
    options = {
        "preset": "veryfast",
        "profile": "high",
        "x264-params": f"keyint=150:min-keyint=150:scenecut=0:bframes=3:b-adapt=0:{x264_params}",
    }
    with h264_writer(path, width, height, options, index_first=index_first) as write:
        for index in range(seconds * FPS):
            dy, dx = (index * 2) % margin, (index * 3) % margin
            gy, gx = rng.integers(0, 64, 2)
            y = luma[dy : dy + height, dx : dx + width] + grains[index % 8][gy : gy + height, gx : gx + width]
            planes = [np.clip(y, 16, 235).astype(np.uint8).ravel()]
            for plane in chroma:
                planes.append(plane[dy // 2 : dy // 2 + height // 2, dx // 2 : dx // 2 + width // 2].ravel())
            image = np.concatenate(planes).astype(np.uint8).reshape(height * 3 // 2, width)
            write(av.VideoFrame.from_ndarray(image, format="yuv420p"))
    return path


def scattered_clips(frames: int, count: int, length: int, seed: int = 1) -> list[tuple[int, int]]:
    """`count` non-overlapping clips of `length` frames at random places, sorted, on no particular grid."""
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.choice(frames - count * length, count, replace=False))
    return [(int(o) + i * length, int(o) + (i + 1) * length) for i, o in enumerate(offsets)]


def build_jobs(names: list[str], sources: Path) -> list[Job]:
    sources.mkdir(parents=True, exist_ok=True)
    spread = clip_lines(60, 6, 5, "sparse")  # 6 clips x 150 frames, evenly over the minute
    jobs = []
    if set(names) & {"one-url", "list-2-workers"}:
        hd = [make_source(sources / f"hd{i}.mp4", 60, 1280, 720, seed=i) for i in range(4)]
    if "one-url" in names:
        title = "one 60 s 1280x720 source, 6 clips x 150 frames -> 640x360, --workers 1"
        jobs.append(Job("one-url", title, [(hd[0], spread)], 1, [("ffmpeg loop", 1)]))
    if "list-2-workers" in names:
        title = "4 sources 1280x720 60 s, 24 clips x 150 frames -> 640x360, --workers 2"
        jobs.append(Job("list-2-workers", title, [(s, spread) for s in hd], 2, [("ffmpeg loop -P 2", 2)]))
    if "1080p-short-clips" in names:
        started = time.monotonic()
        grain = make_grain_source(sources / "grain1080.mp4")
        if time.monotonic() - started > 1:
            print(f"(made the 1080p source in {time.monotonic() - started:.0f} s; cached from now on)")
        title = (
            "one 60 s 1920x1080 high-profile source, 24 scattered clips x 60 frames -> 640x360, --workers 1"
        )
        peers = [("ffmpeg loop", 1), ("ffmpeg loop -P 2", 2)]
        jobs.append(Job("1080p-short-clips", title, [(grain, scattered_clips(60 * FPS, 24, 60))], 1, peers))
    return jobs


def tree_rss_mb(pid: int) -> float:
    """The largest resident set among `pid` and its descendants now, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            status = (entry / "status").read_text()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(entry.name)] = int(line.split()[1]) / 1024
    largest, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        largest = max(largest, rss.get(current, 0.0))
        stack.extend(children.get(current, []))
    return largest


def run_measured(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run a command, output to `log`; returns (wall seconds, peak RSS MB of its largest process).

    The RSS is sampled from /proc every 50 ms over the process tree: getrusage's ru_maxrss would
    count the pages a child shares with this (large) process between fork and exec."""
    started = time.monotonic()
    peak = 0.0
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        while process.poll() is None:
            peak = max(peak, tree_rss_mb(process.pid))
            time.sleep(0.05)
    wall = time.monotonic() - started
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}\n{tail}")
    return wall, peak


def count_frames(paths: list[Path]) -> int:
    """Frames in raw HEVC files: one access unit per frame, counted by the demuxer's parser."""
    total = 0
    for path in paths:
        with av.open(str(path), format="hevc") as container:
            total += sum(1 for packet in container.demux(video=0) if packet.size)
    return total


def checked_frames(out: Path, side: str) -> int:
    """Frames in a run of ours' outputs, which must be what its ledger says it wrote."""
    frames = count_frames(sorted(out.glob("*/*.hevc")))
    with sqlite3.connect(out / "ledger.sqlite") as db:
        (ledger,) = db.execute("SELECT COALESCE(SUM(frames), 0) FROM clips WHERE state = 'done'").fetchone()
    if ledger != frames:
        raise SystemExit(f"{side}: the ledger says {ledger} frames, the files hold {frames}")
    return frames


def fresh_folder(work: Path, number: int, name: str) -> Path:
    """An empty folder for one run, numbered in the order the runs happen."""
    folder = work / f"{number:03d}-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


class Runner:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.config = write_config(work / "throughput.toml", PRESET)
        self.params = x265_params(load_settings(self.config).encode)
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.count = 0

    def fresh(self, name: str) -> Path:
        self.count += 1
        return fresh_folder(self.work, self.count, name)

    def inputs(self, job: Job) -> tuple[Path, Path]:
        """The URL list (absolute local paths) and the clip folder of a job."""
        clip_dir = self.work / "inputs" / job.name
        clip_dir.mkdir(parents=True, exist_ok=True)
        for source, clips in job.sources:
            (clip_dir / f"{source.stem}.txt").write_text("".join(f"{s} {e}\n" for s, e in clips))
        urls = self.work / "inputs" / f"{job.name}.urls"
        urls.write_text("".join(f"{source.resolve()}\n" for source, _ in job.sources))
        return urls, clip_dir

    def ours(self, job: Job, workers: int | str | None = None) -> Sample:
        """Ours on the job, with the job's worker count or `workers` ("auto" included)."""
        urls, clip_dir = self.inputs(job)
        folder = self.fresh(f"{job.name}-ours")
        out = folder / "out"
        chosen = job.workers if workers is None else workers
        command = daemon_command(urls, clip_dir, out, folder / "temp", self.config, chosen)
        wall, rss = run_measured(command, self.env, folder / "log.txt")
        frames = checked_frames(out, job.name)
        shutil.rmtree(folder)
        return Sample(wall, frames, rss)

    def peer(self, job: Job, at_a_time: int) -> Sample:
        folder = self.fresh(f"{job.name}-ffmpeg-P{at_a_time}")
        vf = f"scale={OUT_W}:{OUT_H}"
        clips = [(source, start, end) for source, listed in job.sources for start, end in listed]
        targets = [folder / f"{source.stem}_{start:07d}_{end:07d}.hevc" for source, start, end in clips]
        commands = [
            ffmpeg_clip_command(FFMPEG, source, start, end, PRESET, self.params, target, vf)
            for (source, start, end), target in zip(clips, targets, strict=True)
        ]

        def one(command: list[str]) -> tuple[float, float]:
            return run_measured(command, dict(os.environ), Path(command[-1]).with_suffix(".log"))

        started = time.monotonic()
        with ThreadPoolExecutor(at_a_time) as pool:
            results = list(pool.map(one, commands))
        wall = time.monotonic() - started
        frames = count_frames(targets)
        shutil.rmtree(folder)
        return Sample(wall, frames, max(rss for _, rss in results))

    def startup(self, source: Path) -> Sample:
        job = Job("startup", "", [(source, [(0, 3)])], 1, [])
        return self.ours(job)


def bound_frames(source: Path, count: int) -> list[av.VideoFrame]:
    """Raw 640x360 yuv420p frames in memory, the pictures both sides hand their encoder."""
    frames = []
    with av.open(str(source)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.reformat(width=OUT_W, height=OUT_H, format="yuv420p"))
            if len(frames) == count:
                break
    return frames


def encode_frames(frames: list[av.VideoFrame], params: str) -> tuple[float, float]:
    """libx265 on frames in memory, nothing written; returns (start, end) on the monotonic clock."""
    context = av.CodecContext.create("libx265", "w")
    context.width, context.height, context.pix_fmt = OUT_W, OUT_H, "yuv420p"
    context.time_base = Fraction(1, FPS)
    context.framerate = Fraction(FPS)
    context.options = {"preset": PRESET, "x265-params": params}
    started = time.monotonic()
    for index, frame in enumerate(frames):
        frame.pts, frame.pict_type = index, PictureType.NONE
        context.encode(frame)
    context.encode(None)
    return started, time.monotonic()


def _bound_worker(frames: list[av.VideoFrame], params: str, barrier, results) -> None:
    barrier.wait()
    results.put(encode_frames(frames, params))


def encode_bound(frames: list[av.VideoFrame], config: Path, processes: int) -> float:
    """frames/s of one encoder with default threads (processes=1), or of `processes` single-threaded
    encoders (pools=1:frame-threads=1) side by side, one per process, started together."""
    if processes == 1:
        started, ended = encode_frames(frames, x265_params(load_settings(config).encode))
        return len(frames) / (ended - started)
    params = x265_params(load_settings(config, {"encode.threads": 1}).encode)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    children = [
        ctx.Process(target=_bound_worker, args=(frames, params, barrier, results)) for _ in range(processes)
    ]
    for child in children:
        child.start()
    spans = [results.get() for _ in children]
    for child in children:
        child.join()
    return processes * len(frames) / (max(e for _, e in spans) - min(s for s, _ in spans))


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ffmpeg = subprocess.run([FFMPEG, "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    libavcodec = ".".join(map(str, av.library_versions["libavcodec"]))
    return (
        f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {model}, "
        f"{platform.system()} {platform.release()}\n"
        f"Python {platform.python_version()}, PyAV {av.__version__} (libavcodec {libavcodec}), "
        f"{ffmpeg.split(' Copyright')[0]} ({FFMPEG})\n"
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def print_job(job: Job, ours: Side, peers: list[Side], auto: Side | None = None) -> None:
    print(f"\n{job.name}: {job.title}")
    rows = [
        (f"{job.name} vs {peer.label}", ours.fps(), peer.fps(), ours.fps() / peer.fps()) for peer in peers
    ]
    if auto is not None:
        rows += [
            (f"{job.name} --workers auto vs {peer.label}", auto.fps(), peer.fps(), auto.fps() / peer.fps())
            for peer in peers
        ]
    width = max(len(r[0]) for r in rows)
    print(f"{'job':<{width}} | ours fps | peer fps | ratio")
    for name, mine, theirs, ratio in rows:
        print(f"{name:<{width}} | {mine:8.1f} | {theirs:8.1f} | {ratio:5.2f}")
    frames = {s.frames for side in (ours, *peers) for s in side.samples}
    check = "same on both sides" if frames == {job.frames} else f"MISMATCH {sorted(frames)} vs {job.frames}"
    print(f"  frames written: {job.frames} per run, {check}")
    for side in (ours, *peers, *([auto] if auto else [])):
        rss = max(s.rss_mb for s in side.samples)
        print(f"  {side.label:<18} wall s {side.walls():<20} peak RSS {rss:5.0f} MB (largest process)")
    if auto is not None:
        print(f"  --workers auto / --workers {job.workers}: {auto.fps() / ours.fps():.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-auto", action="store_true", help="leave out the side of ours with --workers auto"
    )
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "dap-bench-throughput",
        help="sources are cached here; each run works in a fresh folder under it",
    )  # fmt: skip
    args = parser.parse_args()
    began = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.work))
    print(machine())
    print(f"x265 preset {PRESET}, output {OUT_W}x{OUT_H}, median of {args.repeats}; ours: {ROOT}")
    jobs = build_jobs(args.jobs, args.work / "sources")
    runner = Runner(run_dir)
    mismatch = False
    for job in jobs:
        ours = Side("ours")
        auto = None if args.no_auto else Side("ours auto")
        peers = [Side(label) for label, _ in job.peers]
        for _ in range(args.repeats):  # alternating, so that a noisy neighbour hits every side alike
            ours.samples.append(runner.ours(job))
            if auto is not None:
                auto.samples.append(runner.ours(job, "auto"))
            for side, (_, at_a_time) in zip(peers, job.peers, strict=True):
                side.samples.append(runner.peer(job, at_a_time))
        print_job(job, ours, peers, auto)
        sides = (ours, *peers, *([auto] if auto else []))
        mismatch |= any(s.frames != job.frames for side in sides for s in side.samples)

    first = make_source(args.work / "sources" / "hd0.mp4", 60, 1280, 720, seed=0)
    frames = bound_frames(first, BOUND_FRAMES)
    bounds: dict[int, list[float]] = {1: [], 2: []}
    starts: list[Sample] = []
    for _ in range(args.repeats):
        for processes, values in bounds.items():
            values.append(encode_bound(frames, runner.config, processes))
        starts.append(runner.startup(first))
    median: Callable[[list[float]], float] = statistics.median
    print(f"\nencode-only bound, libx265 {PRESET} {OUT_W}x{OUT_H} from {BOUND_FRAMES} raw frames in memory:")
    for label, processes in (
        ("one encoder, default threads", 1),
        ("two single-threaded encoders side by side", 2),
    ):
        print(f"  {label:<42} {median(bounds[processes]):6.1f} fps")
    print(
        f"start-up: a 3-frame job takes {median([s.wall for s in starts]):.2f} s wall "
        f"({' '.join(f'{s.wall:.2f}' for s in starts)}); peak RSS of its largest process "
        f"{max(s.rss_mb for s in starts):.0f} MB"
    )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"bench took {time.monotonic() - began:.0f} s")
    shutil.rmtree(run_dir, ignore_errors=True)
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
