"""Lists and clip files as people and programs hand them over: byte-order marks, CRLF, stray bytes,
hostile sizes and file kinds, and lists from pipes. Each bad input costs one line; the run goes on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from daemon.clips import (
    MAX_CLIP_FILE_BYTES,
    MAX_CLIPS_PER_VIDEO,
    PROBLEMS_LISTED,
    Clip,
    ClipFileRefused,
    read_clip_file,
)
from daemon.urls import MAX_URL_LINE_BYTES, parse_url_list

from conftest import ROOT, cli_command, run_cli, run_command, wait_for
from media import make_video
from server import MediaServer

BOM = b"\xef\xbb\xbf"


def test_a_bom_and_crlf_are_accepted_in_clip_files(tmp_path: Path) -> None:
    path = tmp_path / "v.txt"
    path.write_bytes(BOM + b"0 30\r\n40 50\r\n")
    parsed = read_clip_file(path)
    assert parsed.clips == [Clip(0, 30), Clip(40, 50)]
    assert parsed.problems == []


def test_a_bom_and_crlf_are_accepted_in_url_lists(tmp_path: Path) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_bytes(BOM + b"http://127.0.0.1:9/a.mp4\r\nhttp://127.0.0.1:9/b.mp4\r\n")
    parsed = parse_url_list(listing)
    assert [source.url for source in parsed.sources] == [
        "http://127.0.0.1:9/a.mp4",
        "http://127.0.0.1:9/b.mp4",
    ]
    assert parsed.problems == []


def test_a_stray_byte_costs_its_line_only(tmp_path: Path) -> None:
    clips = tmp_path / "v.txt"
    clips.write_bytes(b"0 10\n\xff0 20\n30 40\n")
    parsed = read_clip_file(clips)
    assert parsed.clips == [Clip(0, 10), Clip(30, 40)]
    assert len(parsed.problems) == 1 and parsed.rejected_lines == 1
    assert parsed.problems[0].startswith(f"{clips}:2: not UTF-8 text (byte 0xff at column 1)")

    listing = tmp_path / "urls.txt"
    listing.write_bytes(b"http://127.0.0.1:9/a\xe9.mp4\nhttp://127.0.0.1:9/b.mp4\n")
    urls = parse_url_list(listing)
    assert [source.url for source in urls.sources] == ["http://127.0.0.1:9/b.mp4"]
    assert urls.problems[0].startswith(f"{listing}:1: not UTF-8 text (byte 0xe9 at column 21)")


def test_a_huge_url_line_is_one_short_line(tmp_path: Path) -> None:
    listing = tmp_path / "urls.txt"
    long_name = "a" * 300  # longer than a file name may be: Errno 36 once
    listing.write_text("x" * 100_000 + f"\n{long_name}\nhttp://127.0.0.1:9/b.mp4\n")
    parsed = parse_url_list(listing)
    assert [source.line for source in parsed.sources] == [3]
    assert parsed.problems[0] == (
        f"{listing}:1: line of 100001 bytes, longer than the {MAX_URL_LINE_BYTES} allowed"
    )
    assert "neither an http(s) URL nor an existing file" in parsed.problems[1]
    assert all(len(problem) < 300 for problem in parsed.problems)


def test_clip_files_that_are_no_regular_files_are_refused_without_reading(tmp_path: Path) -> None:
    clip_dir = tmp_path / "clips"
    clip_dir.mkdir()
    (clip_dir / "zero.txt").symlink_to("/dev/zero")
    with pytest.raises(ClipFileRefused, match="a symlink to /dev/zero, outside the clip folder"):
        read_clip_file(clip_dir / "zero.txt")
    os.mkfifo(clip_dir / "fifo.txt")
    with pytest.raises(ClipFileRefused, match="a FIFO, not a regular file"):
        read_clip_file(clip_dir / "fifo.txt")  # returns at once: no writer is waited for
    big = clip_dir / "big.txt"
    big.write_bytes(b"0 10\n" * (MAX_CLIP_FILE_BYTES // 5 + 1))
    with pytest.raises(ClipFileRefused, match="MiB a clip file may have"):
        read_clip_file(big)
    # A symlink within the clip folder is a clip file like any other.
    (clip_dir / "real.txt").write_text("0 10\n")
    (clip_dir / "alias.txt").symlink_to("real.txt")
    assert read_clip_file(clip_dir / "alias.txt").clips == [Clip(0, 10)]


def test_a_million_line_clip_file_keeps_its_limit_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "many.txt"
    path.write_text("".join(f"{i} {i + 1}\n" for i in range(1_000_000)) + "ten 20\n")
    assert path.stat().st_size < MAX_CLIP_FILE_BYTES
    script = (
        "import re, sys\n"
        "from pathlib import Path\n"
        "from daemon.clips import read_clip_file\n"
        "parsed = read_clip_file(Path(sys.argv[1]))\n"
        # This process's peak (ru_maxrss would carry over the parent's across exec).
        "peak_kb = int(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text())[1])\n"
        "print(len(parsed.clips), parsed.rejected_lines, len(parsed.problems), peak_kb // 1024)\n"
    )
    done = run_command([sys.executable, "-c", script, str(path)])
    assert done.returncode == 0, done.stderr
    clips, rejected, listed, peak_mb = (int(value) for value in done.stdout.split())
    assert clips == MAX_CLIPS_PER_VIDEO
    assert rejected == 1_000_001 - MAX_CLIPS_PER_VIDEO
    assert listed == PROBLEMS_LISTED + 1  # and one line counting the rest
    assert peak_mb < 150, peak_mb


def hostile_job(folder: Path) -> dict[str, Path]:
    """A run whose list and clip files hold every hostile input, and one good video."""
    workspace = {
        "clips": folder / "clips",
        "out": folder / "out",
        "temp": folder / "temp",
        "config": folder / "config.toml",
        "urls": folder / "urls.txt",
    }
    from conftest import FAST_CONFIG

    workspace["clips"].mkdir(parents=True)
    workspace["config"].write_text(FAST_CONFIG)
    names = ["good", "zero", "fifo", "huge"]
    for name in names:
        make_video(folder / f"{name}.mp4", frames=40)
    (workspace["clips"] / "good.txt").write_bytes(BOM + b"0 10\r\n\xff 1\r\n20 30\r\n")
    (workspace["clips"] / "zero.txt").symlink_to("/dev/zero")
    os.mkfifo(workspace["clips"] / "fifo.txt")
    with (workspace["clips"] / "huge.txt").open("w") as handle:
        handle.writelines(f"{i:010d} {i + 30:010d}\n" for i in range(1_000_000))
    workspace["urls"].write_bytes(
        BOM + b"x" * 100_000 + b"\r\n" + b"".join(f"{name}.mp4\r\n".encode() for name in names)
    )
    return workspace


def test_hostile_inputs_cost_one_line_each_and_the_run_goes_on(tmp_path: Path) -> None:
    workspace = hostile_job(tmp_path)
    done = run_cli(workspace, "--workers", "1", timeout=240)
    assert done.returncode == 1, done.stderr  # three URLs failed, each for its own reason
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    clips = workspace["clips"]
    for expected in (
        f"{workspace['urls']}:1: line of 100002 bytes, longer than the 8192 allowed",
        f"{clips}/good.txt:2: not UTF-8 text (byte 0xff at column 1)",
        f"zero.mp4: failed: cannot read clip file {clips}/zero.txt: a symlink to /dev/zero, outside",
        f"fifo.mp4: failed: cannot read clip file {clips}/fifo.txt: a FIFO, not a regular file",
        f"huge.mp4: failed: cannot read clip file {clips}/huge.txt: 22000000 bytes, more than the 16 MiB",
    ):
        assert sum(expected in line for line in lines) == 1, (expected, done.stderr)
    assert sorted(path.name for path in (workspace["out"] / "good").iterdir()) == [
        "good_0000000_0000010.hevc",
        "good_0000020_0000030.hevc",
    ]
    assert "URLs done 1, skipped 0, failed 3; list lines rejected 1" in done.stderr


def test_a_fifo_clip_file_does_not_hang_the_run_or_its_signals(tmp_path: Path) -> None:
    workspace = hostile_job(tmp_path)
    workspace["urls"].write_text("fifo.mp4\n")
    # Nobody writes into the FIFO: reading it would wait for ever.
    done = run_cli(workspace, "--workers", "1", timeout=60)
    assert "a FIFO, not a regular file" in done.stderr, done.stderr


def list_run(workspace: dict[str, Path], urls_flag: str, **popen: object) -> subprocess.CompletedProcess[str]:
    command = cli_command(workspace, "--workers", "1")
    command[command.index("--urls-file") + 1] = urls_flag
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=workspace["clips"].parent,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
        **popen,  # type: ignore[arg-type]
    )


@pytest.fixture
def one_video(tmp_path: Path) -> dict[str, Path]:
    workspace = hostile_job(tmp_path)
    return workspace


def written(workspace: dict[str, Path]) -> list[str]:
    return sorted(path.name for path in (workspace["out"] / "good").glob("*.hevc"))


def test_the_list_from_standard_input(one_video: dict[str, Path]) -> None:
    done = list_run(one_video, "-", input="good.mp4\n")
    assert done.returncode == 0, done.stderr
    assert "1 URL(s) from <stdin>" in done.stderr
    assert len(written(one_video)) == 2


def test_the_list_from_dev_stdin_on_a_pipe(one_video: dict[str, Path]) -> None:
    done = list_run(one_video, "/dev/stdin", input="good.mp4\n")
    assert done.returncode == 0, done.stderr
    assert len(written(one_video)) == 2


def test_the_list_from_a_process_substitution(one_video: dict[str, Path]) -> None:
    command = " ".join(f"'{part}'" for part in cli_command(one_video, "--workers", "1"))
    command = command.replace(f"'{one_video['urls']}'", "<(echo good.mp4)")
    done = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=one_video["clips"].parent,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(written(one_video)) == 2


def test_the_list_from_a_fifo(one_video: dict[str, Path]) -> None:
    fifo = one_video["clips"].parent / "list.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with fifo.open("w") as writer:
            writer.write("good.mp4\n")

    feeder = threading.Thread(target=feed)
    feeder.start()
    done = list_run(one_video, str(fifo))
    feeder.join(timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"1 URL(s) from {fifo}" in done.stderr
    assert len(written(one_video)) == 2


def test_a_list_that_is_not_there_or_a_folder_is_one_line(one_video: dict[str, Path]) -> None:
    missing = list_run(one_video, "nowhere.txt")
    assert missing.returncode == 2
    assert missing.stderr.strip() == "download_and_process: --urls-file nowhere.txt: no such file"
    folder = list_run(one_video, "clips")
    assert folder.returncode == 2
    assert folder.stderr.strip() == "download_and_process: --urls-file clips: a folder, not a file"


def test_the_service_reads_a_dropped_list_per_line(tmp_path: Path, server: MediaServer) -> None:
    from test_service import Workspace

    ws = Workspace(tmp_path, server)
    good = ws.video("good", [(0, 10)])
    service = ws.start()
    try:
        staging = tmp_path / "list.staging"
        staging.write_bytes(BOM + good.encode() + b"\r\nhttp://127.0.0.1:9/\xff.mp4\r\n")
        os.rename(staging, ws.inbox / "bytes.txt")
        report = wait_for("bytes.txt in failed/", lambda: ws.filed("failed", "bytes.txt"))
        assert f"done\t{good}\n" in report
        assert "bytes.txt:2: not UTF-8 text (byte 0xff at column 20)" in report, report
    finally:
        assert ws.stop(service, signal.SIGTERM) == 0


def test_a_fixed_list_forgets_the_lines_it_rejected_before(tmp_path: Path) -> None:
    workspace = hostile_job(tmp_path)
    workspace["urls"].write_text("good.mp4\nnot a url\n")
    assert run_cli(workspace, "--workers", "1").returncode == 0
    status = run_command([sys.executable, "-m", "daemon", "status", "-o", str(workspace["out"]), "--json"])
    assert '"rejected_lines": 1' in status.stdout
    workspace["urls"].write_text("good.mp4\n")
    assert run_cli(workspace, "--workers", "1").returncode == 0
    status = run_command([sys.executable, "-m", "daemon", "status", "-o", str(workspace["out"]), "--json"])
    assert '"rejected_lines": 0' in status.stdout
