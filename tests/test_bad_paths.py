"""Bad paths and flags: one line naming what and where, exit status 2, no traceback, nothing fetched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_command, run_command
from media import make_video
from server import MediaServer


@pytest.fixture
def listed(server: MediaServer, workspace: dict[str, Path]) -> dict[str, Path]:
    """A run whose one URL is on the loopback server, so a download would show up as a GET."""
    url = server.add("v.mp4", make_video(workspace["media"] / "v.mp4", frames=10))
    workspace["urls"].write_text(url + "\n")
    (workspace["clips"] / "v.txt").write_text("0 10\n")
    (workspace["media"] / "a-file").write_text("in the way\n")
    return workspace


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return run_command(args, timeout=120)


def assert_usage_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    ("flags", "config_line", "words"),
    [
        (["--output-dir", "{file}/out"], "", ["output folder (--output-dir)", "is a file, not a folder"]),
        (["--temp-dir", "{file}"], "", ["temp folder", "is a file, not a folder"]),
        ([], 'state_dir = "{file}/state"', ["state folder (run.state_dir)", "is a file"]),
        ([], 'log_dir = "{file}/logs"', ["log folder (run.log_dir)", "is a file"]),
    ],
)
def test_a_folder_that_cannot_be_made_stops_the_run_before_any_download(
    server: MediaServer, listed: dict[str, Path], flags: list[str], config_line: str, words: list[str]
) -> None:
    blocker = str(listed["media"] / "a-file")
    if config_line:
        config = (
            listed["config"].read_text().replace("[run]\n", f"[run]\n{config_line.format(file=blocker)}\n")
        )
        listed["config"].write_text(config)
    command = cli_command(listed)
    for flag in flags:  # later flags win over the fixture's
        command.append(flag.format(file=blocker))
    done = run(command)
    assert_usage_error(done, *words, blocker)
    assert server.gets("v.mp4") == 0


def test_a_read_only_output_folder_stops_the_run(server: MediaServer, listed: dict[str, Path]) -> None:
    read_only = listed["media"] / "read-only"
    read_only.mkdir()
    command = [*cli_command(listed), "--output-dir", str(read_only)]
    if os.geteuid() == 0:
        # Root writes through permission bits: mount the folder read-only in a private namespace.
        if shutil.which("unshare") is None or run(["unshare", "-m", "true"]).returncode != 0:
            pytest.skip("root, and no mount namespace to make a read-only folder in")
        script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", script, str(read_only), *command]
    else:
        read_only.chmod(0o555)
    done = run(command)
    assert_usage_error(done, "output folder (--output-dir)", "cannot be written to", str(read_only))
    assert server.gets("v.mp4") == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--config", "{clips}"], ["cannot read the config file"]),
        (["--urls-file", "{clips}"], ["--urls-file", "a folder, not a file"]),
        (["--input-clip-dir", "{urls}"], ["--input-clip-dir", "no such folder"]),
        (["--workers", "0"], ["command line (run.workers = 0): run.workers"]),
        # The flag is named, not the config file, and pydantic's "Value error, " stays out.
        (["--width", "321"], ["command line (output.width = 321): output: width and height must be even"]),
        (["--widht", "3"], ["unrecognized arguments: --widht 3", "see --help"]),  # no usage block
    ],
)
def test_bad_run_flags_get_one_line(
    server: MediaServer, listed: dict[str, Path], args: list[str], words: list[str]
) -> None:
    command = cli_command(listed) + [a.format(clips=listed["clips"], urls=listed["urls"]) for a in args]
    assert_usage_error(run(command), *words)
    assert server.gets("v.mp4") == 0


def test_bad_paths_and_flags_of_the_other_commands_get_one_line(listed: dict[str, Path]) -> None:
    blocker = listed["media"] / "a-file"
    module = [sys.executable, "-m", "daemon"]
    clips, config = str(listed["clips"]), str(listed["config"])
    assert_usage_error(
        run([*module, "serve", "--inbox", f"{blocker}/in", "-c", clips, "-o", "o", "--config", config]),
        "--inbox",
        "is a file, not a folder",
    )
    assert_usage_error(
        run([*module, "serve", "--inbox", "in", "-c", clips, "-o", f"{blocker}/o", "--config", config]),
        "output folder",
    )
    assert_usage_error(run([*module, "status", "--output-dir", str(blocker)]), "no ledger")
    assert_usage_error(
        run([*module, "status", "--output-dir", str(listed["out"]), "--minutes", "-3"]), "--minutes"
    )
    assert_usage_error(run([*module, "logs", "--config", clips, "--output-dir", "x"]), "config file")
