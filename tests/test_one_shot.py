"""The one-shot command, run for real: supervisor and worker processes, yt-dlp, the ledger."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_command, run_cli, wait_for
from media import decoded_indices, make_video
from server import MediaServer


def ledger(workspace: dict[str, Path]) -> dict[str, sqlite3.Row]:
    with sqlite3.connect(workspace["out"] / "ledger.sqlite") as db:
        db.row_factory = sqlite3.Row
        return {row["video_id"]: row for row in db.execute("SELECT * FROM urls")}


def outputs(workspace: dict[str, Path]) -> dict[str, Path]:
    return {p.name: p for p in sorted(workspace["out"].glob("*/*.hevc"))}


def no_partial_files(workspace: dict[str, Path]) -> None:
    assert not list(workspace["out"].glob("*/*.part"))


def test_a_url_list_becomes_frame_accurate_clips(server: MediaServer, workspace: dict[str, Path]) -> None:
    media = workspace["media"]
    fast = server.add("fast.mp4", make_video(media / "fast.mp4", fps=60, frames=240))
    slow = server.add("slow.webm", make_video(media / "slow.webm", fps=25, frames=75, codec="libvpx-vp9"))
    missing = server.add("missing.mp4", b"", status=404)
    unlisted = server.add("unlisted.mp4", make_video(media / "unlisted.mp4", frames=10))
    workspace["urls"].write_text(f"# dataset\n{fast}\n{slow}\n\n{missing}\n{unlisted}\nnot a url\n{fast}\n")
    (workspace["clips"] / "fast.txt").write_text("0000010 0000040\n0000090 0000110\nbroken\n")
    (workspace["clips"] / "slow.txt").write_text("0000000 0000030\n0000080 0000100\n")
    (workspace["clips"] / "missing.txt").write_text("0 10\n")

    result = run_cli(workspace, "--workers", "2")

    assert result.returncode == 1, result.stderr  # the 404 URL failed
    summary = [line for line in (result.stdout + result.stderr).splitlines() if "summary:" in line]
    # Once, as a log line; the unreadable line counted; only the written clips' frames (30 + 20 + 30).
    assert len(summary) == 1 and result.stdout == "", result.stdout
    assert (
        "summary: URLs done 2, skipped 1, failed 1; list lines rejected 1; clips written 3, clip errors 1; "
        "frames 80;" in summary[0]
    )
    assert f"{workspace['urls']}:7: neither an http(s) URL nor an existing file" in result.stderr
    assert f"{workspace['clips'] / 'fast.txt'}:3: " in result.stderr
    assert "HTTP 404" in result.stderr and missing in result.stderr
    assert "slow clip 80 100: runs past the end of the source" in result.stderr
    assert server.gets("unlisted.mp4") == 0  # no clip file: never downloaded
    assert server.gets("fast.mp4") == 2  # listed twice, fetched once (look-up + download)

    made = outputs(workspace)
    assert sorted(made) == [
        "fast_0000010_0000040.hevc",
        "fast_0000090_0000110.hevc",
        "slow_0000000_0000030.hevc",
    ]
    assert decoded_indices(made["fast_0000010_0000040.hevc"]) == list(range(20, 80, 2))
    assert decoded_indices(made["slow_0000000_0000030.hevc"]) == [int(k * 25 / 30) for k in range(30)]
    states = {video: row["state"] for video, row in ledger(workspace).items()}
    assert states == {"fast": "done", "slow": "done", "missing": "failed", "unlisted": "skipped"}
    no_partial_files(workspace)
    assert list(workspace["temp"].iterdir()) == []  # sources deleted, worker folders removed


def test_running_again_redoes_nothing_and_makes_only_missing_clips(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    url = server.add("v.mp4", make_video(workspace["media"] / "v.mp4", frames=90))
    workspace["urls"].write_text(url + "\n")
    (workspace["clips"] / "v.txt").write_text("0 20\n30 50\n60 80\n")
    assert run_cli(workspace).returncode == 0
    first = {name: path.stat().st_mtime_ns for name, path in outputs(workspace).items()}
    assert len(first) == 3

    again = run_cli(workspace)
    assert again.returncode == 0
    assert server.gets("v.mp4") == 2  # nothing fetched the second time
    assert "URLs done 1" in again.stderr and "clips written 0" in again.stderr

    outputs(workspace)["v_0000030_0000050.hevc"].unlink()
    (workspace["clips"] / "v.txt").write_text("0 20\n30 50\n60 80\n10 15\n")
    third = run_cli(workspace)
    assert third.returncode == 0 and "clips written 2" in third.stderr
    now = {name: path.stat().st_mtime_ns for name, path in outputs(workspace).items()}
    assert sorted(now) == sorted([*first, "v_0000010_0000015.hevc"])
    assert now["v_0000000_0000020.hevc"] == first["v_0000000_0000020.hevc"]
    assert now["v_0000030_0000050.hevc"] != first["v_0000030_0000050.hevc"]


def test_a_local_file_is_processed_in_place_and_kept(workspace: dict[str, Path]) -> None:
    source = make_video(workspace["media"] / "home video.mp4", frames=40)
    workspace["urls"].write_text(f"{source}\n")
    (workspace["clips"] / "home_video.txt").write_text("5 25\n")
    result = run_cli(workspace)
    assert result.returncode == 0, result.stderr
    assert source.exists()
    assert decoded_indices(outputs(workspace)["home_video_0000005_0000025.hevc"]) == list(range(5, 25))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[output]\nwidht = 640\n", "output.widht: unknown key"),
        ("[run]\nworkers = 0\n", "run.workers"),
        ("[output]\nresize_mode = 'zoom'\n", "output.resize_mode"),
        ("[download]\ncookies_file = '/no/such/cookies.txt'\n", "download.cookies_file"),
        ("stages = ['resize', 'sharpen']\n", "stages"),
    ],
)
def test_bad_settings_stop_before_any_download(
    server: MediaServer, workspace: dict[str, Path], config: str, message: str
) -> None:
    url = server.add("v.mp4", make_video(workspace["media"] / "v.mp4", frames=10))
    workspace["urls"].write_text(url + "\n")
    (workspace["clips"] / "v.txt").write_text("0 5\n")
    workspace["config"].write_text(config)
    result = run_cli(workspace)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert server.gets("v.mp4") == 0


def test_a_flag_overrides_the_settings_file(server: MediaServer, workspace: dict[str, Path]) -> None:
    url = server.add("v.mp4", make_video(workspace["media"] / "v.mp4", frames=20))
    workspace["urls"].write_text(url + "\n")
    (workspace["clips"] / "v.txt").write_text("0 10\n")
    assert run_cli(workspace, "--width", "64", "--height", "48", "--fps", "15").returncode == 0
    import av

    with av.open(str(outputs(workspace)["v_0000000_0000010.hevc"])) as container:
        frames = list(container.decode(video=0))
    assert (frames[0].width, frames[0].height, len(frames)) == (64, 48, 5)


def start_run(workspace: dict[str, Path], *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        cli_command(workspace, *extra),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def worker_pids(workspace: dict[str, Path]) -> list[int]:
    log = workspace["out"] / "logs" / "supervisor.log"
    if not log.exists():
        return []
    return [
        int(line.rsplit("pid ", 1)[1].rstrip(")\n"))
        for line in log.read_text().splitlines()
        if "(pid " in line
    ]


def slow_workload(server: MediaServer, workspace: dict[str, Path], name: str = "long") -> None:
    """One video with many clips, big enough that killing mid-clip is easy to hit."""
    url = server.add(
        f"{name}.mp4", make_video(workspace["media"] / f"{name}.mp4", frames=600, width=256, height=160)
    )
    workspace["urls"].write_text(url + "\n")
    (workspace["clips"] / f"{name}.txt").write_text("".join(f"{s} {s + 60}\n" for s in range(0, 540, 60)))
    workspace["config"].write_text(
        workspace["config"]
        .read_text()
        .replace("width = 128", "width = 256")
        .replace("height = 80", "height = 160")
        .replace('preset = "ultrafast"', 'preset = "medium"')
    )


def assert_all_clips_complete(workspace: dict[str, Path], name: str = "long") -> None:
    made = outputs(workspace)
    assert len(made) == 9
    for start in range(0, 540, 60):
        assert decoded_indices(made[f"{name}_{start:07d}_{start + 60:07d}.hevc"]) == list(
            range(start, start + 60)
        )
    no_partial_files(workspace)


def test_a_killed_run_leaves_no_partial_clip_and_the_next_run_finishes(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    slow_workload(server, workspace)
    run = start_run(workspace, "--workers", "1")
    wait_for(
        "a finished clip and one being encoded",
        lambda: list(workspace["out"].glob("long/*.hevc")) and list(workspace["out"].glob("long/*.part")),
        deadline=120,
    )
    os.killpg(run.pid, signal.SIGKILL)  # supervisor and workers at once, as a power cut would
    run.wait(timeout=30)
    for clip in outputs(workspace).values():  # whatever has a final name is complete
        start, end = (int(x) for x in clip.stem.split("_")[1:])
        assert decoded_indices(clip) == list(range(start, end))
    assert ledger(workspace)["long"]["state"] == "running"

    again = run_cli(workspace)
    assert again.returncode == 0, again.stderr
    assert "interrupted by an earlier run are pending again" in again.stderr
    assert_all_clips_complete(workspace)
    assert ledger(workspace)["long"]["state"] == "done"


def test_a_worker_killed_mid_clip_is_replaced_and_its_url_retried(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    slow_workload(server, workspace)
    run = start_run(workspace, "--workers", "1")
    wait_for("a clip being encoded", lambda: list(workspace["out"].glob("long/*.part")), deadline=120)
    os.kill(worker_pids(workspace)[-1], signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert "worker 0 died (signal 9)" in stderr and "goes back in the queue" in stderr
    assert len(worker_pids(workspace)) == 2
    assert_all_clips_complete(workspace)
    row = ledger(workspace)["long"]
    assert (row["state"], row["crashes"], row["attempts"]) == ("done", 1, 2)


def test_a_url_that_kills_its_worker_twice_is_failed_not_retried_forever(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    slow_workload(server, workspace)
    run = start_run(workspace, "--workers", "1")
    for kills in (1, 2):

        def processing(started: int = kills) -> bool:
            return len(worker_pids(workspace)) == started and bool(list(workspace["out"].glob("long/*.part")))

        wait_for(f"worker {kills} encoding a clip", processing, deadline=120)
        os.kill(worker_pids(workspace)[-1], signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 1
    assert "worker died 2 times while processing this URL (last: signal 9)" in stderr
    assert ledger(workspace)["long"]["state"] == "failed"
    no_partial_files(workspace)


def test_a_second_run_on_the_same_output_is_refused(server: MediaServer, workspace: dict[str, Path]) -> None:
    slow_workload(server, workspace)
    run = start_run(workspace, "--workers", "1")
    try:
        wait_for("the ledger", lambda: (workspace["out"] / "ledger.sqlite").exists(), deadline=120)
        second = run_cli(workspace)
        assert second.returncode == 2 and "another run is already using" in second.stderr
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)


def test_python_dash_m_and_the_console_script_are_the_same_command() -> None:
    script = Path(sys.executable).parent / "download_and_process"
    if not script.exists():
        pytest.skip("console script not installed (package not installed into this environment)")
    helps = [
        subprocess.run([str(script), "--help"], capture_output=True, text=True).stdout,
        subprocess.run(
            [sys.executable, "-m", "daemon", "--help"], capture_output=True, text=True, cwd=ROOT
        ).stdout,
    ]
    assert helps[0] == helps[1] and "logs" in helps[0]


def test_a_truncated_file_fails_its_url_in_one_line_and_the_rest_goes_on(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    whole = make_video(workspace["media"] / "whole.mp4", frames=60)
    broken = server.add("broken.mp4", whole.read_bytes()[: whole.stat().st_size // 2])
    fine = server.add("fine.mp4", whole)
    workspace["urls"].write_text(f"{broken}\n{fine}\n")
    (workspace["clips"] / "broken.txt").write_text("0 10\n")
    (workspace["clips"] / "fine.txt").write_text("0 10\n")
    result = run_cli(workspace)
    assert result.returncode == 1
    failure = [line for line in result.stderr.splitlines() if "failed:" in line and broken in line]
    assert len(failure) == 1 and "broken.mp4: cannot open as video" in failure[0]
    assert sorted(outputs(workspace)) == ["fine_0000000_0000010.hevc"]
    row = ledger(workspace)["broken"]
    assert (row["state"], row["retryable"]) == ("failed", 0)
    assert list(workspace["temp"].iterdir()) == []  # the broken download was deleted too
