"""What an operator sees: per-worker log files, the logs command, progress on a terminal or in a file."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ROOT, cli_command, on_terminal, run_cli, run_command, run_module
from media import make_video
from server import MediaServer


def small_run(server: MediaServer, workspace: dict[str, Path]) -> None:
    url = server.add("walk.mp4", make_video(workspace["media"] / "walk.mp4", frames=40))
    workspace["urls"].write_text(url + "\n")
    (workspace["clips"] / "walk.txt").write_text("0 10\n10 20\n")


def test_each_worker_logs_to_its_own_file_naming_worker_video_and_stage(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    small_run(server, workspace)
    assert run_cli(workspace, "--workers", "1").returncode == 0
    lines = (workspace["out"] / "logs" / "worker-0.log").read_text().splitlines()
    wrote = [line for line in lines if "wrote walk_0000000_0000010.hevc" in line]
    assert wrote and " | worker-0 | walk | process | " in wrote[0]
    assert any(" | worker-0 | walk | download | downloading http" in line for line in lines)
    assert (workspace["out"] / "logs" / "supervisor.log").exists()

    shown = run_module("logs", "--output-dir", str(workspace["out"]), "--worker", "0")
    assert shown.returncode == 0 and shown.stdout.splitlines() == lines


def test_logs_follow_prints_lines_as_they_are_written(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "worker-3.log").write_text("old line\n")
    follower = subprocess.Popen(
        [sys.executable, "-m", "daemon", "logs", "--log-dir", str(log_dir), "--worker", "3", "--follow"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "old line\n"
        with (log_dir / "worker-3.log").open("a") as log:
            log.write("new line\n")
        assert follower.stdout.readline() == "new line\n"
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_json_log_lines_carry_the_same_fields(server: MediaServer, workspace: dict[str, Path]) -> None:
    small_run(server, workspace)
    workspace["config"].write_text(
        workspace["config"].read_text().replace("[run]\n", "[run]\nlog_json = true\n", 1)
    )
    assert run_cli(workspace, "--workers", "1").returncode == 0
    records = [
        json.loads(line) for line in (workspace["out"] / "logs" / "worker-0.log").read_text().splitlines()
    ]
    wrote = [r for r in records if "wrote walk_0000010_0000020.hevc" in r["record"]["message"]]
    assert wrote and wrote[0]["record"]["extra"] == {
        "worker": "worker-0",
        "video_id": "walk",
        "stage": "process",
    }


def test_progress_lines_when_output_is_not_a_terminal(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    small_run(server, workspace)
    workspace["config"].write_text(
        workspace["config"].read_text().replace("[run]\n", "[run]\nprogress_interval_seconds = 0.1\n", 1)
    )
    result = run_cli(workspace, "--workers", "1")
    assert result.returncode == 0
    assert re.search(r"progress: [01]/1 URLs, [0-2] clips, [\d.]+ frames/s", result.stderr), result.stderr


def test_a_live_progress_bar_on_a_terminal(server: MediaServer, workspace: dict[str, Path]) -> None:
    small_run(server, workspace)
    status, screen = on_terminal(cli_command(workspace, "--workers", "1"), columns=120)
    text = screen.decode(errors="replace")
    assert status == 0
    assert "URLs" in text and "1/1" in text and "clips 2" in text and "frames/s" in text


def logs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "daemon", "logs", *args]


def run_logs(*args: str) -> subprocess.CompletedProcess[str]:
    return run_command(logs_command(*args), timeout=60)


def stamp(second: int) -> str:
    return f"2026-05-01 10:00:{second:02d}.000"


def test_logs_merges_the_supervisor_and_workers_by_time(tmp_path: Path) -> None:
    """Records interleave by their time; a traceback stays with its record; a rotated file comes first."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "supervisor.log").write_text(
        f"{stamp(0)} | INFO | supervisor | start\n{stamp(9)} | INFO | s end\n"
    )
    (log_dir / "worker-0.2026-05-01_10-00-03_000000.log").write_text(f"{stamp(1)} | INFO | w0 first\n")
    (log_dir / "worker-0.log").write_text(
        f"{stamp(3)} | ERROR | w0 failed\nTraceback (most recent call last):\n  boom\n"
        f"{stamp(7)} | INFO | w0 last\n"
    )
    (log_dir / "worker-1.log").write_text(f"{stamp(2)} | INFO | w1 first\n{stamp(5)} | INFO | w1 last\n")
    (log_dir / "worker-10.log").write_text(f"{stamp(6)} | INFO | w10 only\n")
    (log_dir / "notes.txt").write_text("not a log\n")

    shown = run_logs("--log-dir", str(log_dir))
    assert shown.returncode == 0, shown.stderr
    assert [line.split(" | ")[-1] for line in shown.stdout.splitlines()] == [
        "start",
        "w0 first",
        "w1 first",
        "w0 failed",
        "Traceback (most recent call last):",
        "  boom",
        "w1 last",
        "w10 only",
        "w0 last",
        "s end",
    ]
    one = run_logs("--log-dir", str(log_dir), "--worker", "0")
    assert one.stdout.splitlines()[0].endswith("w0 first") and "w1" not in one.stdout


def test_logs_of_a_real_run_with_two_workers_are_in_time_order(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    for name in ("a", "b"):
        url = server.add(f"{name}.mp4", make_video(workspace["media"] / f"{name}.mp4", frames=40))
        with workspace["urls"].open("a") as listing:
            listing.write(url + "\n")
        (workspace["clips"] / f"{name}.txt").write_text("0 10\n10 20\n")
    assert run_cli(workspace, "--workers", "2").returncode == 0
    log_dir = workspace["out"] / "logs"
    shown = run_logs("--output-dir", str(workspace["out"])).stdout.splitlines()
    every = [line for path in sorted(log_dir.glob("*.log")) for line in path.read_text().splitlines()]
    assert sorted(shown) == sorted(every)
    times = [line[:23] for line in shown]
    assert times == sorted(times)
    assert {line.split(" | ")[2] for line in shown} == {"supervisor", "worker-0", "worker-1"}


def test_logs_follow_goes_on_across_a_loguru_rotation(tmp_path: Path) -> None:
    from loguru import logger

    from daemon import logs

    log_dir = tmp_path / "logs"
    follower = subprocess.Popen(
        logs_command("--log-dir", str(log_dir), "--worker", "0", "--follow"),
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    try:
        # Small enough that loguru renames the file every few lines.
        logs.configure("worker-0", logs.worker_log_path(log_dir, 0), "INFO", rotation="400 B", retention=50)
        for number in range(30):
            logger.info(f"line {number}")
            time.sleep(0.02)
        assert len(list(log_dir.glob("worker-0.*.log"))) >= 3  # it did rotate
        assert follower.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True)
        reader.start()
        seen = [lines.get(timeout=30).rstrip("\n").split(" | ")[-1] for _ in range(30)]
        assert seen == [f"line {number}" for number in range(30)]
    finally:
        logger.remove()
        logger.add(sys.stderr)
        follower.terminate()
        follower.wait(timeout=10)
