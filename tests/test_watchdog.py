"""The supervisor's watchdog: a worker that stops making progress is killed, retried once, failed."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from daemon.ledger_view import LedgerView

from conftest import FAST_CONFIG, run_cli, run_module
from media import decoded_indices, make_video
from server import MediaServer

STALL_CONFIG = FAST_CONFIG.replace("[run]\n", "[run]\nstall_seconds = 2.0\n")


def failed_error(out: Path, url: str) -> str:
    ledger = LedgerView(out / "ledger.sqlite")
    try:
        row = ledger.url(url)
        assert row is not None and row.state == "failed", row
        return row.error or ""
    finally:
        ledger.close()


def test_a_download_that_stops_sending_is_killed_retried_once_and_failed(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    video = make_video(workspace["media"] / "v.mp4", frames=30)
    # Every GET stalls halfway; yt-dlp's own socket timeout (30 s) is far beyond the watchdog's 2 s.
    stuck = server.add("stuck.mp4", video, stall_gets=tuple(range(1, 20)))
    fine = server.add("fine.mp4", video)
    workspace["config"].write_text(STALL_CONFIG)
    workspace["urls"].write_text(f"{stuck}\n{fine}\n")
    for name in ("stuck", "fine"):
        (workspace["clips"] / f"{name}.txt").write_text("0 30\n")
    done = run_cli(workspace, "--workers", "1", timeout=180)
    assert done.returncode == 1, done.stderr  # one URL failed
    assert decoded_indices(workspace["out"] / "fine" / "fine_0000000_0000030.hevc") == list(range(30))
    error = failed_error(workspace["out"], stuck)
    assert error == "stalled: no progress for 2 s in download"
    assert f"{stuck}: failed: stalled: no progress for 2 s in download" in done.stderr
    assert done.stderr.count("stalled: no progress") >= 2  # the first stall, then the retry's
    assert not list(workspace["out"].rglob("*.part"))
    status = run_module("status", "--output-dir", str(workspace["out"]), timeout=60)
    assert status.returncode == 0, status.stderr
    assert "stalled: no progress for 2 s in download" in status.stdout


@contextlib.contextmanager
def pipe_that_blocks(path: Path, data: bytes) -> Iterator[None]:
    """A named pipe: whole data for the first reader (the probe), then half and silence for others."""
    os.mkfifo(path)
    closing = threading.Event()

    def feed(pipe: BinaryIO, whole: bool) -> None:
        with pipe, contextlib.suppress(BrokenPipeError):
            pipe.write(data if whole else data[: len(data) // 2])
            pipe.flush()
            # Hold the pipe (silent) until its reader hangs up, then let go: a writer still open
            # would keep the pipe's buffer, and its leftovers would reach the next reader.
            poller = select.poll()
            poller.register(pipe.fileno(), select.POLLERR)  # a pipe's write end: no reader left
            deadline = time.monotonic() + 60
            while not closing.is_set() and time.monotonic() < deadline and not poller.poll(100):
                pass

    def serve() -> None:
        opened = 0
        while not closing.is_set():
            pipe = open(path, "wb")  # noqa: SIM115 - blocks until a reader opens it; feed closes it
            opened += 1
            # Each worker opens the pipe twice: its probe, then the cutter. Only the cutter starves.
            feed(pipe, whole=opened % 2 == 1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        closing.set()
        with contextlib.suppress(OSError):  # wake a writer still waiting for a reader
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(timeout=5)


def test_a_frame_source_that_blocks_is_killed_retried_once_and_failed(workspace: dict[str, Path]) -> None:
    video = make_video(workspace["media"] / "v.webm", frames=300, codec="libvpx-vp9")
    fine = make_video(workspace["media"] / "fine.mp4", frames=30)
    pipe = workspace["media"] / "piped.webm"
    workspace["config"].write_text(STALL_CONFIG)
    workspace["urls"].write_text(f"{pipe}\n{fine}\n")
    (workspace["clips"] / "piped.txt").write_text("0 300\n")
    (workspace["clips"] / "fine.txt").write_text("0 30\n")
    with pipe_that_blocks(pipe, video.read_bytes()):
        done = run_cli(workspace, "--workers", "1", timeout=180)
    assert done.returncode == 1, done.stderr
    assert decoded_indices(workspace["out"] / "fine" / "fine_0000000_0000030.hevc") == list(range(30))
    assert failed_error(workspace["out"], str(pipe)) == "stalled: no progress for 2 s in process"
    assert not list((workspace["out"] / "piped").glob("*"))  # nothing half-written left behind


@pytest.mark.parametrize("value", ["-1", '"soon"'])
def test_a_bad_stall_setting_stops_the_run_naming_the_key(workspace: dict[str, Path], value: str) -> None:
    workspace["config"].write_text(FAST_CONFIG.replace("[run]\n", f"[run]\nstall_seconds = {value}\n"))
    workspace["urls"].write_text("")
    done = run_cli(workspace)
    assert done.returncode == 2
    assert "run.stall_seconds" in done.stderr and "Traceback" not in done.stderr


def test_workers_that_die_before_they_are_ready_stop_the_run_instead_of_restarting_forever(
    workspace: dict[str, Path],
) -> None:
    # A folder where a worker's log file must go: the log folder itself is fine (the start-up check
    # passes), but every worker dies opening its own log.
    fine = make_video(workspace["media"] / "fine.mp4", frames=30)
    workspace["urls"].write_text(f"{fine}\n")
    (workspace["clips"] / "fine.txt").write_text("0 30\n")
    (workspace["out"] / "logs" / "worker-0.log").mkdir(parents=True)
    done = run_cli(workspace, "--workers", "1", timeout=120)
    assert done.returncode == 1, done.stderr
    assert "workers died 3 times in a row before they were ready" in done.stderr
    assert "worker 0 cannot start: IsADirectoryError" in done.stderr and "Traceback" not in done.stderr
    assert not (workspace["out"] / "fine").exists()  # nothing was processed; the URL stays pending
