"""What an operator sees: per-worker log files, the logs command, progress on a terminal or in a file."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, cli_command, run_cli
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

    shown = subprocess.run(
        [sys.executable, "-m", "daemon", "logs", "--output-dir", str(workspace["out"]), "--worker", "0"],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
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
    leader, follower = pty.openpty()
    run = subprocess.Popen(
        cli_command(workspace, "--workers", "1"),
        stdin=follower, stdout=follower, stderr=follower, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120", TERM="xterm"),
    )  # fmt: skip
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
        elif run.poll() is not None:
            break
    run.wait(timeout=30)
    os.close(leader)
    text = screen.decode(errors="replace")
    assert run.returncode == 0
    assert "URLs" in text and "1/1" in text and "clips 2" in text and "frames/s" in text
