"""The first hour, second pass: what a newcomer trips on, each through the real command line."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST_CONFIG, ROOT, cli_command, on_terminal, run_cli, run_module, wait_for
from media import make_video
from server import MediaServer


def render(output: bytes, columns: int) -> list[str]:
    """What a terminal `columns` wide shows after `output`: the few controls rich's live display uses
    (carriage return, erase line, cursor up), the rest of the escape sequences dropped."""
    lines: list[list[str]] = [[]]
    row = col = 0
    text = output.decode(errors="replace")
    position = 0
    control = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
    while position < len(text):
        match = control.match(text, position)
        if match:
            argument, command = match.groups()
            if command == "A":
                row = max(0, row - int(argument or 1))
            elif command == "K" and argument == "2":
                lines[row] = []
            position = match.end()
            continue
        char = text[position]
        position += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
            col = 0
            while len(lines) <= row:
                lines.append([])
        elif char >= " ":
            if col >= columns:  # the terminal wraps
                row, col = row + 1, 0
                while len(lines) <= row:
                    lines.append([])
            line = lines[row]
            line.extend(" " * (col - len(line) + 1) if len(line) <= col else "")
            line[col] = char
            col += 1
    return ["".join(line).rstrip() for line in lines]


def terminal_job(folder: Path) -> list[str]:
    (folder / "clips").mkdir(parents=True)
    make_video(folder / "v.mp4", frames=40)
    make_video(folder / "w.mp4", frames=40)
    (folder / "urls.txt").write_text("v.mp4\nw.mp4\nnot a url\n")
    (folder / "clips" / "v.txt").write_text("0 10\n20 30\n")
    (folder / "clips" / "w.txt").write_text("0 10\nbad line\n")
    (folder / "config.toml").write_text(FAST_CONFIG)
    return [sys.executable, "-m", "daemon", "-u", "urls.txt", "-c", "clips", "-o", "out", "--workers", "1"]


@pytest.mark.parametrize("columns", [80, 160])
def test_log_lines_on_a_terminal_are_never_glued_to_the_progress_bar(tmp_path: Path, columns: int) -> None:
    status, output = on_terminal(terminal_job(tmp_path), columns, cwd=tmp_path)
    assert status == 0, output.decode(errors="replace")
    screen = render(output, columns)
    log = (tmp_path / "out" / "logs" / "supervisor.log").read_text().splitlines()
    for record in log:
        message = record.split(" | ", 5)[-1]
        if message.startswith("started worker"):
            continue  # names a pid, the same on both, but short: covered by the others
        # Every record the terminal got is there whole, starting a line of its own.
        shown = "\n".join(screen)
        flat = message if len(message) < columns - 40 else message[: columns - 40]
        assert any(line.split(" | ", 3)[-1].startswith(flat) for line in screen), (message, shown)
    for line in screen:
        assert not ("frames/s" in line and " | supervisor | " in line), line
    assert any(line.startswith("URLs ") and "2/2" in line for line in screen), screen


# --- the command line itself ----------------------------------------------------------------------------


def test_the_bare_command_shows_the_usage_and_the_commands(tmp_path: Path) -> None:
    bare = run_module(cwd=tmp_path)
    assert bare.returncode == 2
    assert "required" not in bare.stderr
    assert bare.stderr.startswith("usage: download_and_process [run] -u URLS_FILE -c CLIP_DIR -o OUTPUT_DIR")
    for command in ("run", "serve", "status", "logs", "manifest"):
        assert re.search(rf"^  {command} ", bare.stderr, re.MULTILINE), command


def test_version(tmp_path: Path) -> None:
    from daemon import __version__

    shown = run_module("--version", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"download_and_process {__version__}"


def test_every_flag_is_explained(tmp_path: Path) -> None:
    run_help = run_module("run", "--help", cwd=tmp_path).stdout
    assert "TRACE, DEBUG, INFO, SUCCESS, WARNING or ERROR" in run_help
    for flag in ("--dry-run", "--stages", "--preset", "--clip-fps", "--resize-mode"):
        assert flag in run_help, flag
    for command in ("status", "logs", "manifest"):
        shown = run_module(command, "--help", cwd=tmp_path).stdout
        assert re.search(r"--config CONFIG\s+settings file", shown), (command, shown)


# --- logs -------------------------------------------------------------------------------------------------


HOUR_AGO = int(time.time()) - 3600  # the test logs' records start here, one second apart


def stamp(second: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(HOUR_AGO + second)) + ".000"


def write_log(folder: Path, lines: int = 5000) -> Path:
    folder.mkdir(parents=True)
    levels = ["INFO", "WARNING", "DEBUG", "ERROR"]
    (folder / "supervisor.log").write_text(
        "".join(
            f"{stamp(i % 3600)} | {levels[i % 4]: <7} | supervisor | - | - | line {i}\n" for i in range(lines)
        )
    )
    return folder


def test_logs_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "logs", lines=200_000)
    piped = subprocess.run(
        [
            "bash",
            "-c",
            f"{sys.executable} -m daemon logs --log-dir {logs} | head -n 1; exit ${{PIPESTATUS[0]}}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )
    assert piped.stdout.count("\n") == 1 and "line 0" in piped.stdout
    assert piped.stderr == ""
    assert piped.returncode == 0


def test_logs_since_and_level(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "logs", lines=40)
    warnings = run_module("logs", "--log-dir", str(logs), "--level", "warning", cwd=tmp_path)
    assert warnings.returncode == 0, warnings.stderr
    shown = warnings.stdout.splitlines()
    assert [line.split(" | ")[1].strip() for line in shown] == ["WARNING", "ERROR"] * 10
    # The file's records are one second apart, starting an hour ago.
    recent = run_module("logs", "--log-dir", str(logs), "--since", "2h", cwd=tmp_path).stdout.splitlines()
    assert len(recent) == 40
    none = run_module("logs", "--log-dir", str(logs), "--since", "1s", cwd=tmp_path)
    assert none.stdout == ""
    cut = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(HOUR_AGO + 30))
    later = run_module("logs", "--log-dir", str(logs), "--since", cut, cwd=tmp_path).stdout.splitlines()
    assert [line.rsplit(" ", 1)[1] for line in later] == [str(n) for n in range(30, 40)]
    bad = run_module("logs", "--log-dir", str(logs), "--since", "yesterday", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


# --- status -----------------------------------------------------------------------------------------------


def failing_job(server: MediaServer, workspace: dict[str, Path]) -> None:
    gone = server.add("gone.mp4", b"", status=404)
    good = server.add("good.mp4", make_video(workspace["media"] / "good.mp4", frames=40))
    (workspace["clips"] / "good.txt").write_text("0 10\n20 30\n30 90\n")  # 30 90 runs past the end
    (workspace["clips"] / "gone.txt").write_text("0 10\n")
    workspace["urls"].write_text(f"{good}\n{gone}\n")


def test_status_failed_lists_every_failure_with_its_reason(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    failing_job(server, workspace)
    done = run_cli(workspace, "--workers", "1")
    assert done.returncode == 1, done.stderr
    out = ["--output-dir", str(workspace["out"])]
    text = run_module("status", *out, "--failed", cwd=workspace["out"].parent)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "failed: 1 URL(s), 1 clip(s)"
    assert any(line.startswith(f"{server.base}/gone.mp4: ") and "404" in line for line in lines), lines
    assert any(line.startswith(f"{server.base}/good.mp4 clip 30 90: ") for line in lines), lines
    document = json.loads(
        run_module("status", *out, "--failed", "--json", cwd=workspace["out"].parent).stdout
    )
    assert {(row["url"].rsplit("/", 1)[1], row["start_frame"]) for row in document["failed"]} == {
        ("gone.mp4", None),
        ("good.mp4", 30),
    }
    assert all(row["error"] for row in document["failed"])


def test_status_right_after_a_short_run_gives_the_rate_it_ran_at(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    failing_job(server, workspace)
    assert run_cli(workspace, "--workers", "1").returncode == 1
    document = json.loads(run_module("status", "-o", str(workspace["out"]), "--json").stdout)
    throughput = document["throughput"]
    assert throughput["frames"] == 20
    assert 0 < throughput["busy_seconds"] < 120  # a run of seconds, not the 10-minute window
    assert throughput["frames_per_second"] == pytest.approx(20 / max(throughput["busy_seconds"], 1), rel=0.01)
    text = run_module("status", "-o", str(workspace["out"])).stdout
    assert re.search(r"20 frames \([\d.]+/s over \d+s busy\)", text), text


# --- run: --dry-run, the per-job flags, start-up checks ----------------------------------------------------


def test_dry_run_says_what_would_happen_and_fetches_nothing(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    failing_job(server, workspace)
    (workspace["clips"] / "good.txt").write_text("0 10\nten 20\n")
    dry = run_cli(workspace, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert server.gets("good.mp4") == 0 and server.gets("gone.mp4") == 0
    assert not workspace["out"].exists()
    lines = dry.stdout.splitlines()
    assert f"fetch {server.base}/good.mp4 (good): 1 clip(s) to make" in lines
    assert "        0 10 -> good/good_0000000_0000010.hevc" in lines
    assert any(line.startswith("rejected: ") and "good.txt:2: not two integers" in line for line in lines)
    assert lines[-1].startswith("dry run: 2 URL(s), 2 to fetch, 2 clip(s) to make")

    # After a run, what is made is said to be made.
    (workspace["clips"] / "gone.txt").unlink()
    assert run_cli(workspace, "--workers", "1").returncode == 0
    again = run_cli(workspace, "--dry-run").stdout.splitlines()
    assert f"done  {server.base}/good.mp4 (good): all 1 clip(s) made" in again
    assert any(line.startswith(f"skip  {server.base}/gone.mp4 (gone): no clip file") for line in again)


def test_the_per_job_flags(server: MediaServer, workspace: dict[str, Path]) -> None:
    url = server.add("v.mp4", make_video(workspace["media"] / "v.mp4", frames=60, fps=30))
    workspace["urls"].write_text(url + "\n")
    (workspace["clips"] / "v.txt").write_text("0 10\n")  # at --clip-fps 10: one second, 30 output frames
    done = run_cli(
        workspace,
        "--workers", "1", "--stages", "resize", "--preset", "superfast", "--clip-fps", "10",
        "--resize-mode", "stretch",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "stages resize;" in done.stderr
    row = sqlite3.connect(workspace["out"] / "ledger.sqlite").execute("SELECT frames FROM clips").fetchone()
    assert row == (30,)
    bad = run_cli(workspace, "--preset", "superduperfast")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "encode.preset" in bad.stderr, bad.stderr
    stages = run_cli(workspace, "--stages", "matte")
    assert stages.returncode == 2 and "'resize' must be one of the stages" in stages.stderr


@pytest.mark.parametrize(
    ("line", "bad", "named"),
    [
        ("[run]", '[run]\nlog_rotation = "banana"', "run.log_rotation"),
        ('preset = "ultrafast"', 'preset = "superduperfast"', "encode.preset"),
        ("start_delay = 0.0", "start_delay = -5", "run.start_delay"),
    ],
)
def test_a_bad_setting_is_one_line_before_any_download(
    server: MediaServer, workspace: dict[str, Path], line: str, bad: str, named: str
) -> None:
    failing_job(server, workspace)
    workspace["config"].write_text(FAST_CONFIG.replace(line, bad))
    done = run_cli(workspace)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and named in done.stderr, done.stderr
    assert server.gets("good.mp4") == 0


def test_an_encoder_is_opened_at_start_up_with_the_configured_options() -> None:
    """What the settings' own checks let through and libx265 refuses stops the run before any
    download: here a preset unknown to libx265, put past the checks."""
    from daemon.checks import check_encoder
    from daemon.config import ConfigError, EncodeSettings, Settings

    settings = Settings()
    check_encoder(settings, "cpu (decode cpu, stages on cpu, encode x265)")  # the defaults open
    fields = {**settings.encode.model_dump(), "preset": "superduperfast"}
    bad = settings.model_copy(update={"encode": EncodeSettings.model_construct(**fields)})
    with pytest.raises(ConfigError, match="libx265 refuses the configured options"):
        check_encoder(bad, "cpu (decode cpu, stages on cpu, encode x265)")
    check_encoder(bad, "gpu (decode nvdec, stages on cuda, encode nvenc)")  # libx265 is not used


# --- SIGHUP ------------------------------------------------------------------------------------------------


def stalled_job(server: MediaServer, workspace: dict[str, Path]) -> str:
    url = server.add(
        "slow.mp4", make_video(workspace["media"] / "slow.mp4", frames=200), stall_gets=(1, 2, 3)
    )
    (workspace["clips"] / "slow.txt").write_text("0 10\n")
    workspace["urls"].write_text(url + "\n")
    workspace["config"].write_text(FAST_CONFIG.replace("grace_seconds = 20.0", "grace_seconds = 2.0"))
    return url


def download_stalled(server: MediaServer) -> bool:
    """The download's own GET (after yt-dlp's look at the URL) has its half body and waits. What
    yt-dlp read is not on disk yet: it writes a read once it is whole."""
    return server.routes["/slow.mp4"].gets >= 2


def leftovers(workspace: dict[str, Path]) -> list[str]:
    return sorted(
        str(path.relative_to(workspace["temp"])) for path in workspace["temp"].rglob("*") if path.is_file()
    )


def test_sighup_stops_a_run_as_sigterm_does(server: MediaServer, workspace: dict[str, Path]) -> None:
    url = stalled_job(server, workspace)
    process = subprocess.Popen(
        cli_command(workspace, "--workers", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    wait_for("the download to stall", lambda: download_stalled(server), deadline=120)
    process.send_signal(signal.SIGHUP)
    _, err = process.communicate(timeout=120)
    assert "SIGHUP: finishing in-flight clips, then stopping" in err, err
    assert process.returncode == 130, err
    assert leftovers(workspace) == []
    status = run_module("status", "-o", str(workspace["out"]), "--json")
    document = json.loads(status.stdout)
    assert document["workers"] == [] and document["counts"]["running"] == 0
    assert document["counts"]["pending"] == 1, url


def test_closing_the_terminal_stops_a_run_and_leaves_nothing_behind(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    stalled_job(server, workspace)
    # The run is a session leader with the pseudo-terminal as its own: closing the terminal's side
    # hangs it up, as closing a terminal window or an SSH session does.
    pid, leader = pty.fork()
    if pid == 0:  # the child: the run itself
        os.environ["PYTHONPATH"] = str(ROOT)
        command = cli_command(workspace, "--workers", "1")
        os.execv(command[0], command)
    wait_for("the download to stall", lambda: download_stalled(server), deadline=120)
    os.close(leader)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 130
    log = (workspace["out"] / "logs" / "supervisor.log").read_text()
    assert "SIGHUP: finishing in-flight clips, then stopping" in log
    assert "summary:" in log
    assert leftovers(workspace) == []
    document = json.loads(run_module("status", "-o", str(workspace["out"]), "--json").stdout)
    assert document["workers"] == []


# --- the manifest -------------------------------------------------------------------------------------------


def test_the_manifest_is_as_readable_as_the_clips_and_names_alpha_streams(tmp_path: Path) -> None:
    from daemon.ledger import Ledger
    from daemon.manifest import write_manifest

    out = tmp_path / "out"
    clip = out / "v" / "v_0000000_0000010.hevc"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"clip")
    clip.with_name("v_0000000_0000010.alpha.hevc").write_bytes(b"alpha")
    plain = out / "w" / "w_0000000_0000010.hevc"
    plain.parent.mkdir(parents=True)
    plain.write_bytes(b"clip")
    ledger = Ledger(out / "ledger.sqlite")
    for video_id, path in (("v", clip), ("w", plain)):
        ledger.add_url(f"http://h/{video_id}.mp4", video_id, None)
        ledger.record_clip(
            video_id, f"http://h/{video_id}.mp4", 0, 10, "done", path=str(path), frames=10, size=4
        )
    ledger.close()
    old_mask = os.umask(0o022)
    try:
        clip_mode = 0o666 & ~0o022
        for fmt in ("jsonl", "csv"):
            target = out / f"manifest.{fmt}"
            write_manifest(out / "ledger.sqlite", target, fmt)
            assert target.stat().st_mode & 0o777 == clip_mode, oct(target.stat().st_mode)
    finally:
        os.umask(old_mask)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [row["alpha_path"] for row in rows] == [str(clip.with_name("v_0000000_0000010.alpha.hevc")), None]
    assert "alpha_path" in (out / "manifest.csv").read_text().splitlines()[0]


# --- serve ------------------------------------------------------------------------------------------


def test_serve_first_says_what_it_loaded(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    config = tmp_path / "config.toml"
    config.write_text(FAST_CONFIG)
    command = [sys.executable, "-m", "daemon", "serve", "--config", str(config)]
    command += ["-i", str(tmp_path / "inbox"), "-c", str(tmp_path / "clips"), "-o", str(tmp_path / "out")]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=tmp_path
    )
    log = tmp_path / "out" / "logs" / "supervisor.log"
    wait_for("the service to watch", lambda: log.exists() and "watching" in log.read_text(), deadline=120)
    process.send_signal(signal.SIGHUP)  # and a hang-up stops it as SIGTERM does
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    first = log.read_text().splitlines()[0]
    assert f"config {config}; stages resize; 2 worker(s), each cpu (" in first, first
    assert "SIGHUP: finishing in-flight clips, then stopping" in err


def test_the_service_report_names_clip_errors_and_its_status_says_since_when(
    tmp_path: Path, server: MediaServer
) -> None:
    from test_service import Workspace

    ws = Workspace(tmp_path, server)
    good = ws.video("good", [(0, 10)])
    short = ws.video("short", [(0, 10), (30, 90)], frames=40)  # 30 90 runs past the end
    service = ws.start()
    try:
        ws.drop("mixed.txt", [good, short])
        report = wait_for("mixed.txt in failed/", lambda: ws.filed("failed", "mixed.txt"))
        assert "result: failed: 2 URL(s): 1 done, 1 partial, 0 skipped, 0 failed; 1 clip error(s)" in report
        assert f"done\t{good}\n" in report
        assert f"partial\t{short}\n" in report
        assert re.search(rf"clip error\t{re.escape(short)}\t30 90: .*past the end", report), report
        shown = run_module("status", "-o", str(ws.out), cwd=ws.root).stdout
        assert "since start: done 2, failed 0, skipped 0, clip errors 1" in shown, shown
    finally:
        assert ws.stop(service, signal.SIGTERM) == 0
