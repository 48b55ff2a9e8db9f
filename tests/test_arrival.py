"""Cutting a source while it downloads: the reader waits for bytes not yet written, what it cuts is
what the whole file gives, a download that fails ends the cut with the download's failure, and a
run stops downloading once every clip of a source is cut."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from daemon.arrival import Arrival, arriving
from daemon.backends import cpu_parts
from daemon.clips import Clip
from daemon.cutter import ClipCutter
from daemon.cutting import CutJob
from daemon.download import DownloadFailure
from daemon.lockslots import ProcessingSlots
from daemon.stages import build_stages

from conftest import FAST_CONFIG, ROOT, run_cli
from media import CollectedClips, cut, decoded_indices, make_video, settings
from server import MediaServer

CLIPS = [Clip(0, 30), Clip(60, 90), Clip(200, 230)]


class Feeder:
    """Writes a file into `part` in steps, as a download does, telling `arrival` of each."""

    def __init__(self, source: Path, part: Path) -> None:
        self.data = source.read_bytes()
        self.part = part
        self.arrival = Arrival()
        self.written = 0
        self.file = open(part, "wb")  # noqa: SIM115 - closed by end()

    def write_to(self, fraction: float) -> None:
        upto = int(len(self.data) * fraction)
        self.file.write(self.data[self.written : upto])
        self.file.flush()
        self.written = upto
        self.arrival.wrote(self.part, self.part, True, len(self.data))

    def end(self, error: BaseException | None = None) -> None:
        if error is None:
            self.write_to(1.0)
        self.file.close()
        self.arrival.end(None if error else self.part, error)


def cut_while_arriving(
    feeder: Feeder,
    clips: list[Clip],
    out: Path,
    feed: callable,  # type: ignore[valid-type]
) -> tuple[CollectedClips, BaseException | None]:
    """Cuts `clips` from the arriving file on this thread while `feed(sink)` writes it on another."""
    config = settings()
    parts = cpu_parts(config, build_stages(config, torch.device("cpu")))
    sink = CollectedClips()
    writer = threading.Thread(target=feed, args=(sink,), daemon=True)
    raised: BaseException | None = None
    with arriving(feeder.part, feeder.arrival):
        writer.start()
        try:
            ClipCutter(parts).run(CutJob(feeder.part, "vid", clips, out, sink, arriving=True))
        except DownloadFailure as exc:
            raised = exc
    writer.join(30)
    return sink, raised


def wait_until(condition: callable, seconds: float) -> bool:  # type: ignore[valid-type]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_clips_are_cut_while_the_file_arrives_and_match_the_whole_file(tmp_path: Path) -> None:
    source = make_video(tmp_path / "v.mp4", frames=300, index_first=True)
    feeder = Feeder(source, tmp_path / "v.mp4.part")
    feeder.write_to(0.05)  # the index and a little more: what a download has after a moment
    cut_before_the_rest: list[bool] = []

    def feed(sink: CollectedClips) -> None:
        feeder.write_to(0.45)  # the first two clips' frames, not the third's
        cut_before_the_rest.append(wait_until(lambda: len(sink.results) >= 2, 60))
        feeder.end()

    sink, raised = cut_while_arriving(feeder, CLIPS, tmp_path / "out", feed)
    assert raised is None
    assert cut_before_the_rest == [True]  # two clips written while most of the file was missing
    whole = cut(source, CLIPS, tmp_path / "whole")
    for result in sink.results:
        clip = Clip(result.start_frame, result.end_frame)
        assert result.error is None
        frames = decoded_indices(Path(result.path or ""))
        assert frames == list(range(clip.start_frame, clip.end_frame))
        assert frames == decoded_indices(Path(whole[clip].path or ""))
    assert len(sink.results) == 3


def test_an_index_at_the_end_makes_the_cut_wait_for_the_whole_file(tmp_path: Path) -> None:
    source = make_video(tmp_path / "v.mp4", frames=300)  # moov last
    feeder = Feeder(source, tmp_path / "v.mp4.part")
    feeder.write_to(0.05)
    early: list[bool] = []

    def feed(sink: CollectedClips) -> None:
        feeder.write_to(0.9)
        early.append(wait_until(lambda: bool(sink.results), 2))
        feeder.end()

    sink, raised = cut_while_arriving(feeder, CLIPS, tmp_path / "out", feed)
    assert raised is None
    assert early == [False]
    assert sorted(decoded_indices(Path(r.path or ""))[0] for r in sink.results) == [0, 60, 200]


def test_a_download_failing_half_way_ends_the_cut_with_its_failure_and_keeps_finished_clips(
    tmp_path: Path,
) -> None:
    source = make_video(tmp_path / "v.mp4", frames=300, index_first=True)
    feeder = Feeder(source, tmp_path / "v.mp4.part")
    feeder.write_to(0.05)
    failure = DownloadFailure("http://example/v.mp4", "connection reset", "transient")

    def feed(sink: CollectedClips) -> None:
        feeder.write_to(0.45)
        wait_until(lambda: len(sink.results) >= 2, 60)
        feeder.end(failure)

    out = tmp_path / "out"
    sink, raised = cut_while_arriving(feeder, CLIPS, out, feed)
    assert raised is failure  # the URL fails as its download did: not as a broken source
    assert sorted(r.start_frame for r in sink.results if r.error is None) == [0, 60]
    assert sorted(path.name for path in out.rglob("*") if path.is_file()) == [
        "vid_0000000_0000030.hevc",
        "vid_0000060_0000090.hevc",
    ]  # finished clips kept; nothing half-written left behind


HOLDER = """
import sys
from pathlib import Path
from daemon.lockslots import ProcessingSlots
with ProcessingSlots(Path(sys.argv[1]), 1).hold("other") as busy:
    print(busy, flush=True)
    sys.stdin.readline()
"""


def first_line(process: subprocess.Popen[str], seconds: float = 60) -> str:
    """The process's first line of output, or a failure (not a hang) when it writes none in time."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    assert ready, f"no output within {seconds}s"
    return process.stdout.readline().strip()


def test_a_cut_waiting_for_bytes_lends_its_processing_slot_and_waits_to_take_it_back(
    tmp_path: Path,
) -> None:
    slots = ProcessingSlots(tmp_path, 1)
    with slots.hold("ours"):
        with slots.lent("ours"):
            other = subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(tmp_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={"PYTHONPATH": str(ROOT)},
            )
            assert other.stdin is not None
            assert first_line(other) == "1"  # it got the slot we lent
            threading.Timer(0.5, lambda: (other.stdin.write("\n"), other.stdin.flush())).start()
            started = time.monotonic()
        assert time.monotonic() - started >= 0.4  # we had to wait until it gave the slot back
        assert slots.slots.busy() == 1
    assert other.wait(10) == 0
    assert slots.slots.busy() == 0


@pytest.mark.parametrize("drop", [False, True])
def test_a_run_cuts_a_url_while_it_downloads_and_stops_once_every_clip_is_cut(
    server: MediaServer, workspace: dict[str, Path], drop: bool
) -> None:
    video = make_video(workspace["media"] / "v.mp4", frames=900, width=320, height=180, index_first=True)
    size = video.stat().st_size
    # About 8 s for the whole file, whose clips end before its half: seconds to spare for cutting
    # them before the rest comes. With `drop`, the download's first GET (after the look-up's)
    # breaks a third of the way and the retry goes on from where the file ends.
    url = server.add("v.mp4", video, bytes_per_second=size / 8, drop_gets=(2,) if drop else ())
    (workspace["clips"] / "v.txt").write_text("30 60\n150 180\n400 430\n")  # all in the first half
    workspace["urls"].write_text(url + "\n")
    # yt-dlp's reads made small enough that this small file arrives in many of them.
    workspace["config"].write_text(
        FAST_CONFIG.replace("[download]\n", "[download]\nextra_options = { buffersize = 8192 }\n")
    )
    done = run_cli(workspace, "--workers", "1")
    assert done.returncode == 0, done.stderr
    for start, end in ((30, 60), (150, 180), (400, 430)):
        path = workspace["out"] / "v" / f"v_{start:07d}_{end:07d}.hevc"
        assert decoded_indices(path) == list(range(start, end))
    log = (workspace["out"] / "logs" / "worker-0.log").read_text()
    assert "processing slots busy), while it downloads" in log
    assert "stopped downloading" in log and "downloaded v.mp4" not in log
    if drop:
        assert "attempt 1 failed (transient)" in log
    assert server.routes["/v.mp4"].served_bytes < size  # the rest of the file was never fetched
    assert not list(workspace["temp"].glob("*/worker-*/*"))  # the partial source deleted


INTERRUPTED = """
import signal, sys, threading
from pathlib import Path
sys.path[:0] = [sys.argv[3], sys.argv[4]]
from test_arrival import Feeder, settings
from daemon.arrival import arriving
from daemon.backends import cpu_parts
from daemon.clips import Clip
from daemon.cutter import ClipCutter
from daemon.cutting import CutJob
from media import CollectedClips

def terminate(signum, frame):
    raise SystemExit(128 + signum)

signal.signal(signal.SIGTERM, terminate)
feeder = Feeder(Path(sys.argv[1]), Path(sys.argv[1] + ".part"))
feeder.write_to(0.3)  # then nothing more: every read past it waits
config = settings()
clips = [Clip(0, 30), Clip(250, 280)]
job = CutJob(feeder.part, "vid", clips, Path(sys.argv[2]), CollectedClips(), arriving=True)
with arriving(feeder.part, feeder.arrival):
    print("cutting", flush=True)
    try:
        ClipCutter(cpu_parts(config)).run(job)
    except SystemExit as exc:
        print(f"stopped by {exc.code}", flush=True)
        raise
"""


def test_a_signal_while_a_read_waits_for_bytes_stops_the_cut_as_itself(tmp_path: Path) -> None:
    source = make_video(tmp_path / "v.mp4", frames=300, index_first=True)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            INTERRUPTED,
            str(source),
            str(tmp_path / "out"),
            str(ROOT / "tests"),
            str(ROOT),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    try:
        assert first_line(child) == "cutting"
        # The first clip is cut from what came; the second's frames never come: the cut waits.
        deadline = time.monotonic() + 60
        while not (tmp_path / "out" / "vid" / "vid_0000000_0000030.hevc").exists():
            assert time.monotonic() < deadline, "the first clip was never written"
            time.sleep(0.05)
        time.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    # SIGTERM's SystemExit came out of the read that waited, through FFmpeg, as itself: the cut
    # ended there (its half-written clip removed), not as an end of file with clips "past the end".
    assert "stopped by 143" in out
    assert child.returncode == 143
    assert [path.name for path in (tmp_path / "out" / "vid").iterdir()] == ["vid_0000000_0000030.hevc"]
