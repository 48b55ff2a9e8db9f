"""What a new user sees first: the help, the line that says what was loaded, one summary, `status`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import FAST_CONFIG, run_module
from media import make_video


def run_from(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user types it, from `folder`, with no --config."""
    return run_module(*args, cwd=folder)


def test_the_top_level_help_shows_the_run_flags(tmp_path: Path) -> None:
    shown = run_from(tmp_path, "--help")
    assert shown.returncode == 0
    for flag in ("--urls-file", "--input-clip-dir", "--output-dir", "--workers", "--config"):
        assert flag in shown.stdout, flag
    for command in ("run", "logs", "status", "serve", "manifest"):
        assert command in shown.stdout


def small_job(folder: Path) -> list[str]:
    (folder / "clips").mkdir(parents=True)
    source = make_video(folder / "v.mp4", frames=40)
    (folder / "urls.txt").write_text(f"{source}\nnot a url\n")
    (folder / "clips" / "v.txt").write_text("0 10\n20 30\n30 90\n")
    return ["--urls-file", "urls.txt", "--input-clip-dir", "clips", "--output-dir", "out"]


def first_log_line(folder: Path) -> str:
    return (folder / "out" / "logs" / "supervisor.log").read_text().splitlines()[0]


def test_a_run_names_the_config_it_found_in_its_folder(tmp_path: Path) -> None:
    job = tmp_path / "job"
    args = small_job(job)
    (job / "config.toml").write_text(FAST_CONFIG.replace("[run]", "[run]\nworkers = 1"))
    done = run_from(job, *args, "--temp-dir", str(tmp_path / "temp"))
    assert done.returncode == 0, done.stderr
    first = first_log_line(job)
    assert f"config {job / 'config.toml'}" in first
    assert "stages resize" in first and "1 worker(s), each cpu (" in first
    assert f"output {job / 'out'}" in first
    assert first.split(" | ", 5)[-1] in done.stderr.splitlines()[0]  # and first on the terminal too


def test_a_run_from_a_folder_without_config_says_it_uses_the_defaults(tmp_path: Path) -> None:
    job = tmp_path / "elsewhere"
    args = small_job(job)
    done = run_from(job, *args, "--workers", "1", "--start-delay", "0", "--width", "64", "--height", "48")
    assert done.returncode == 0, done.stderr
    first = first_log_line(job)
    assert f"built-in defaults (no --config, and no config.toml in {job})" in first
    assert "stages resize" in first


def test_one_summary_counting_rejected_lines_and_only_written_frames(tmp_path: Path) -> None:
    job = tmp_path / "job"
    args = small_job(job)
    (job / "config.toml").write_text(FAST_CONFIG)
    done = run_from(job, *args, "--workers", "1", "--temp-dir", str(tmp_path / "temp"))
    assert done.returncode == 0, done.stderr
    terminal = (done.stdout + done.stderr).splitlines()
    assert len([line for line in terminal if "summary:" in line]) == 1
    log = (job / "out" / "logs" / "supervisor.log").read_text()
    assert log.count("summary:") == 1
    # 30 90 runs past the 40-frame source: an error, and none of its frames count.
    assert "list lines rejected 1; clips written 2, clip errors 1; frames 20;" in log

    status = run_from(job, "status", "--output-dir", "out", "--json")
    assert json.loads(status.stdout)["rejected_lines"] == 1
    text = run_from(job, "status", "--output-dir", "out").stdout
    assert "failed 0; list lines rejected 1" in text
