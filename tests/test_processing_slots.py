"""Workers that download while others cut: processing slots shared through lock files, the cores
shared by the workers that hold one, and `--workers auto` starting a downloader per cutter."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from daemon.budget import CpuBudget, auto_workers, processing_workers
from daemon.config import load_settings
from daemon.lockslots import ProcessingSlots
from daemon.messages import Task
from daemon.sites import SiteBreakers
from daemon.workqueue import WorkQueue

from conftest import FAST_CONFIG, ROOT, run_cli, wait_for
from media import decoded_indices, make_video
from server import MediaServer

CORES = len(os.sched_getaffinity(0))

HOLDER = """
import sys, time
from pathlib import Path
from daemon.lockslots import ProcessingSlots
from daemon.messages import Task
from daemon.sites import SiteBreakers
from daemon.workqueue import WorkQueue
slots = ProcessingSlots(Path(sys.argv[1]), int(sys.argv[2]))
with slots.hold("test") as busy:
    print(busy, flush=True)
    time.sleep(float(sys.argv[3]))
"""


def settings(**run: object):  # type: ignore[no-untyped-def]
    return load_settings(None, {"run": run, "encode": {"codec": "cpu"}})


def holder(folder: Path, count: int, seconds: float) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(count), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert process.stdout is not None
    process.stdout.readline()  # it holds its slot from here
    return process


def test_the_cores_go_to_the_workers_that_cut_not_to_every_worker() -> None:
    even = max(2, CORES // 4)
    assert processing_workers(settings(workers=1)) == 1
    assert processing_workers(settings(workers=3)) == min(3, even)
    assert processing_workers(settings(workers=8, processing_workers=3)) == 3
    assert processing_workers(settings(workers=2, processing_workers=5)) == 2  # never more than workers
    assert auto_workers(gpu_present=False, max_gpu_jobs=2) == 2 * even
    assert auto_workers(gpu_present=True, max_gpu_jobs=9) == max(2 * even, 10)
    # Three workers, two cutting: each cuts on half the cores, not a third of them.
    config = settings(workers=3, processing_workers=2)
    assert CpuBudget.of_process(config).cpus == max(1, CORES // 2)
    # Alone, a cutter takes the cores the others leave, up to twice its even share.
    assert CpuBudget.of_source(config, processing_now=1).cpus == min(CORES, 2 * max(1, CORES // 2))
    assert CpuBudget.of_source(config, processing_now=2).cpus == max(1, CORES // 2)
    # Settings still override the rules.
    pinned = load_settings(None, {"run": {"workers": 3}, "encode": {"codec": "cpu", "threads": 3}})
    assert CpuBudget.of_source(pinned, 1).encoder_threads(1) == 3


def test_a_slot_is_waited_for_across_processes_and_freed_when_its_holder_is_killed(tmp_path: Path) -> None:
    first = holder(tmp_path, 2, 60)
    second = holder(tmp_path, 2, 60)
    slots = ProcessingSlots(tmp_path, 2)
    assert slots.slots.busy() == 2
    waits: list[float] = []
    try:
        os.kill(second.pid, signal.SIGKILL)  # the kernel drops its lock: nothing leaks
        second.wait()
        started = time.monotonic()
        with slots.hold("ours", waits.append) as busy:
            assert busy == 2  # the first holder and us
        assert time.monotonic() - started < 5
        # Both held: a wait until one is given back, told to the watchdog meanwhile.
        third = holder(tmp_path, 2, 1.5)
        started = time.monotonic()
        with slots.hold("ours", waits.append) as busy:
            waited = time.monotonic() - started
        third.wait()
        assert 0.5 < waited < 10
        assert waits and all(seconds > 0 for seconds in waits)
    finally:
        for process in (first, second):
            process.kill()
            process.wait()


def test_a_stop_ends_the_wait_for_a_slot(tmp_path: Path) -> None:
    first = holder(tmp_path, 1, 60)
    try:
        asked = time.monotonic() + 0.5
        started = time.monotonic()
        with ProcessingSlots(tmp_path, 1).hold("ours", should_stop=lambda: time.monotonic() > asked) as busy:
            assert busy is None  # no slot: the body must cut nothing
        assert time.monotonic() - started < 5
    finally:
        first.kill()
        first.wait()


def stamp(text: str) -> float:
    return datetime.strptime(text.strip(), "%Y-%m-%d %H:%M:%S.%f").timestamp()


def process_intervals(log_dir: Path) -> list[tuple[float, float, str]]:
    """(start, end, worker) of each source's cutting: from its `cutting on` line to its last line."""
    intervals = []
    for path in sorted(log_dir.glob("worker-*.log")):
        start: dict[str, float] = {}
        end: dict[str, float] = {}
        for line in path.read_text().splitlines():
            fields = [part.strip() for part in line.split(" | ", 5)]
            if len(fields) < 6 or fields[4] != "process":
                continue
            when = stamp(fields[0])
            if fields[5].startswith("cutting on "):
                start[fields[3]] = when
            end[fields[3]] = when
        intervals += [(start[video], end[video], path.stem) for video in start]
    return sorted(intervals)


def test_workers_beyond_the_processing_slots_download_while_one_cuts_at_a_time(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    workspace["config"].write_text(FAST_CONFIG.replace("[run]\n", "[run]\nprocessing_workers = 1\n"))
    urls = []
    for index in range(6):
        video = make_video(workspace["media"] / f"v{index}.mp4", frames=240, width=320, height=180)
        # Downloads slower than cuts, so that a lone worker could not take the whole list.
        urls.append(server.add(f"v{index}.mp4", video, delay_seconds=0.5))
        (workspace["clips"] / f"v{index}.txt").write_text("0 60\n90 150\n180 240\n")
    workspace["urls"].write_text("".join(f"{url}\n" for url in urls))
    done = run_cli(workspace, "--workers", "3")
    assert done.returncode == 0, done.stderr
    for index in range(6):
        path = workspace["out"] / f"v{index}" / f"v{index}_0000090_0000150.hevc"
        assert decoded_indices(path) == list(range(90, 150))
    intervals = process_intervals(workspace["out"] / "logs")
    assert len(intervals) == 6
    assert len({worker for _, _, worker in intervals}) >= 2  # more than one worker took URLs
    for (_, end, _), (start, _, _) in itertools.pairwise(intervals):
        assert end <= start, intervals  # one source cut at a time: the slot was held throughout
    logs = "".join(path.read_text() for path in (workspace["out"] / "logs").glob("worker-*.log"))
    assert f"cutting on {CORES} core(s) (1 of 1 processing slots busy)" in logs
    # The downloaders started once the first worker was cutting, not with it.
    first_cut = min(start for start, _, _ in intervals)
    for name in ("worker-1.log", "worker-2.log"):
        first_line = (workspace["out"] / "logs" / name).read_text().splitlines()[0]
        assert stamp(first_line.split(" | ")[0]) >= first_cut, first_line
    assert not list(workspace["temp"].glob("*/worker-*/*"))  # every source deleted


def test_a_list_of_local_files_starts_only_the_workers_that_cut(workspace: dict[str, Path]) -> None:
    workspace["config"].write_text(FAST_CONFIG.replace("[run]\n", "[run]\nprocessing_workers = 1\n"))
    videos = [make_video(workspace["media"] / f"local{index}.mp4", frames=30) for index in range(3)]
    for video in videos:
        (workspace["clips"] / f"{video.stem}.txt").write_text("0 30\n")
    workspace["urls"].write_text("".join(f"{video}\n" for video in videos))
    done = run_cli(workspace, "--workers", "4")
    assert done.returncode == 0, done.stderr
    wait_for("the outputs", lambda: len(list(workspace["out"].glob("*/*.hevc"))) == 3, 5)
    assert [path.name for path in (workspace["out"] / "logs").glob("worker-*.log")] == ["worker-0.log"]


def test_the_queue_knows_whether_a_download_waits_without_scanning_it() -> None:
    queue = WorkQueue(SiteBreakers(load_settings(None).download))
    local = Task("/data/a.mp4", "a", ((0, 30),), local=True)
    remote = Task("http://127.0.0.1:9/b.mp4", "b", ((0, 30),), local=False)
    queue.add(local)
    assert queue.ready_count == 1 and not queue.downloads_ready
    queue.add(remote)
    assert queue.ready_count == 2 and queue.downloads_ready
    assert queue.take(time.monotonic()) == local and queue.downloads_ready
    assert queue.take(time.monotonic()) == remote and not queue.downloads_ready
    queue.later(remote, 0)
    assert not queue.downloads_ready  # waiting for its retry delay, not ready
    queue.release_due(time.monotonic() + 1)
    assert queue.downloads_ready and queue.ready_count == 1
