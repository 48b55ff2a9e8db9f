"""Never lose a clip: full disks pause the run instead of failing its clips, a ledger that cannot be
written stops it cleanly, transient failures are tried again within the run, one output folder has
one run, and two sources never share a name. Real processes, real yt-dlp, real file systems."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import RunSettings
from daemon.diskspace import DiskGate, hold_for
from daemon.failures import Kind, Scope, disk_full, from_exception, permanent, transient
from daemon.policy import BUG_ATTEMPTS, FailurePolicy, GiveUp, RetryLater, WaitFor, worst

from conftest import FAST_CONFIG, ROOT, cli_command, run_cli, run_module, wait_for
from media import decoded_indices, make_video
from server import MediaServer


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `folder` for the test (root only; skipped elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@contextlib.contextmanager
def started(command: list[str]) -> Iterator[subprocess.Popen[str]]:
    """The command running in the background, as a user would start it; killed if still running."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def fill(folder: Path) -> Path:
    """Write a file into `folder` until its file system is full; returns the file."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as handle:
        for size in (1 << 20, 65536, 4096, 512):  # big blocks, then the last few bytes
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * size)
    return filler


def ledger_rows(path: Path, table: str = "urls") -> list[sqlite3.Row]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        return list(db.execute(f"SELECT * FROM {table}"))


def clip_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*/*.hevc"))


# --- the policy, on its own ---------------------------------------------------------------------


def test_the_policy_waits_on_conditions_retries_transient_failures_and_gives_up_on_the_rest() -> None:
    policy = FailurePolicy(RunSettings(url_attempts=3, retry_delay_seconds=10, retry_delay_max_seconds=25))
    full = disk_full("/data/out", "no space left in /data/out")
    assert policy.decide(full, 99) == WaitFor(full)  # a condition charges nothing, whatever the count
    gone = permanent(Scope.URL, "download: HTTP 404")
    assert policy.decide(gone, 1) == GiveUp("download: HTTP 404", retryable=False)
    passing = transient(Scope.URL, "download: timed out")
    first = policy.decide(passing, 1)
    second = policy.decide(passing, 2)
    assert isinstance(first, RetryLater) and 5 <= first.delay_seconds <= 10
    assert isinstance(second, RetryLater) and 10 <= second.delay_seconds <= 20
    assert policy.delay(9) <= 25  # the ceiling
    assert policy.decide(transient(Scope.URL, "x", retry_after_seconds=120), 1).delay_seconds == 120  # type: ignore[union-attr]
    spent = policy.decide(passing, 3)
    assert spent == GiveUp("download: timed out (failed 3 times; gave up)", retryable=False)
    bug = from_exception(KeyError("k"), Scope.URL, Path("/tmp"), "process")
    assert bug.bug and bug.reason == "internal: process: KeyError: 'k'"
    assert isinstance(policy.decide(bug, BUG_ATTEMPTS), GiveUp)  # a bug gets a smaller budget


def test_a_full_disk_is_the_folders_condition_and_decides_for_the_url() -> None:
    enospc = OSError(28, "No space left on device")
    failure = from_exception(enospc, Scope.CLIP, Path("/data/out/v"), "v")
    assert (failure.scope, failure.kind, failure.where) == (Scope.DISK, Kind.CONDITION, "/data/out/v")
    wrapped = RuntimeError("encoder broke")
    wrapped.__cause__ = enospc
    assert from_exception(wrapped, Scope.CLIP, Path("/o"), "v").kind is Kind.CONDITION
    past = permanent(Scope.CLIP, "v clip 0 10: runs past the end of the source")
    encoder = from_exception(OSError(5, "Input/output error"), Scope.CLIP, Path("/o"), "v")
    assert encoder.kind is Kind.TRANSIENT and not encoder.bug
    assert worst([past]) is None  # only impossible clips: the URL is done
    assert worst([past, encoder]) is encoder
    assert worst([encoder, failure, past]) is failure


def test_a_full_disk_reported_after_room_was_made_does_not_hold_the_run(tmp_path: Path) -> None:
    # The writer measures what was free when its write failed; a report that reaches the
    # supervisor after the user freed space must not wait for still more room than that.
    enospc = OSError(28, "No space left on device")
    failure = from_exception(enospc, Scope.CLIP, tmp_path / "v", "v")
    assert failure.free_bytes is not None and failure.free_bytes > 0
    late = DiskGate([], recheck_seconds=0.0)
    late.hold(hold_for(tmp_path / "v", failure.reason, free_bytes_then=0))
    assert late.blocked() is None and not late.holds  # room enough now: work goes on
    unknown = DiskGate([], recheck_seconds=0.0)
    unknown.hold(hold_for(tmp_path / "v", failure.reason))  # measured now: a margin more is needed
    assert unknown.blocked() is not None


# --- full disks ---------------------------------------------------------------------------------

DISK_CONFIG = (
    FAST_CONFIG.replace("[run]\n", "[run]\nstate_dir = '{state}'\nlog_dir = '{logs}'\n")
    + """
[service]
min_free_temp_mb = 0
min_free_output_mb = 0
disk_check_seconds = 0.2
"""
)


def test_a_full_output_disk_pauses_the_run_and_every_clip_is_made_once_space_returns(
    server: MediaServer, workspace: dict[str, Path], tmp_path: Path
) -> None:
    state, logs = tmp_path / "state", tmp_path / "logs"
    workspace["config"].write_text(DISK_CONFIG.format(state=state, logs=logs))
    names = ("a", "b", "c")
    urls = [server.add(f"{n}.mp4", make_video(workspace["media"] / f"{n}.mp4", frames=90)) for n in names]
    workspace["urls"].write_text("".join(f"{u}\n" for u in urls))
    for name in names:
        (workspace["clips"] / f"{name}.txt").write_text("0 30\n30 60\n60 90\n")
    with small_disk(workspace["out"], "4m") as out:
        filler = fill(out)
        with started(cli_command(workspace, "--workers", "2")) as run:
            ledger = state / "ledger.sqlite"
            # The run says it waits, in its log and in `status`, and records no clip as failed for good.
            log = logs / "supervisor.log"
            wait_for("the pause", lambda: log.exists() and "downloads paused" in log.read_text(), 120)
            shown = run_module("status", "--state-dir", str(state), "--json", timeout=60)
            assert shown.returncode == 0, shown.stderr
            conditions = json.loads(shown.stdout)["conditions"]
            assert [c["scope"] for c in conditions] == ["disk"] and "no space left" in conditions[0]["reason"]
            assert not [r for r in ledger_rows(ledger, "clips") if r["permanent"]]
            assert not [r for r in ledger_rows(ledger) if r["state"] == "failed"]
            filler.unlink()
            stdout, stderr = run.communicate(timeout=180)
        assert run.returncode == 0, stderr
        assert "downloads resumed" in stderr and "Traceback" not in stderr
        expected = [f"{n}_{s:07d}_{s + 30:07d}.hevc" for n in names for s in (0, 30, 60)]
        assert clip_names(out) == expected
        for name in names:
            assert decoded_indices(out / name / f"{name}_0000030_0000060.hevc") == list(range(30, 60))
        assert not list(out.rglob("*.part"))
        assert {r["state"] for r in ledger_rows(ledger)} == {"done"}
        assert {r["state"] for r in ledger_rows(ledger, "clips")} == {"done"}


def test_a_full_temp_disk_pauses_downloads_without_failing_or_charging_the_url(
    server: MediaServer, workspace: dict[str, Path], tmp_path: Path
) -> None:
    state, logs = tmp_path / "state", tmp_path / "logs"
    workspace["config"].write_text(DISK_CONFIG.format(state=state, logs=logs))
    url = server.add("big.mp4", make_video(workspace["media"] / "big.mp4", frames=120))
    workspace["urls"].write_text(f"{url}\n")
    (workspace["clips"] / "big.txt").write_text("0 30\n90 120\n")
    with small_disk(workspace["temp"], "2m") as temp:
        filler = fill(temp)
        with started(cli_command(workspace, "--workers", "1")) as run:
            log = logs / "supervisor.log"
            wait_for("the pause", lambda: log.exists() and "downloads paused" in log.read_text(), 120)
            assert "no space left" in log.read_text()
            filler.unlink()
            _, stderr = run.communicate(timeout=180)
    assert run.returncode == 0, stderr
    assert clip_names(workspace["out"]) == ["big_0000000_0000030.hevc", "big_0000090_0000120.hevc"]
    (row,) = ledger_rows(state / "ledger.sqlite")
    assert (row["state"], row["failed_tries"]) == ("done", 0)


def test_a_ledger_that_cannot_be_created_stops_the_run_in_one_line_and_the_next_run_is_whole(
    server: MediaServer, workspace: dict[str, Path], tmp_path: Path
) -> None:
    state, logs = tmp_path / "state", tmp_path / "logs"
    workspace["config"].write_text(DISK_CONFIG.format(state=state, logs=logs))
    url = server.add("a.mp4", make_video(workspace["media"] / "a.mp4", frames=30))
    workspace["urls"].write_text(f"{url}\n")
    (workspace["clips"] / "a.txt").write_text("0 30\n")
    with small_disk(state, "1m"):
        filler = fill(state)
        refused = run_cli(workspace, "--workers", "1")
        assert refused.returncode == 1, refused.stderr
        assert "Traceback" not in refused.stderr
        lines = [line for line in refused.stderr.splitlines() if "cannot be written" in line]
        assert len(lines) == 1 and f"state folder {state}" in lines[0], refused.stderr
        assert not (state / "ledger.sqlite").exists()  # no ledger without tables
        assert server.gets("a.mp4") == 0  # nothing fetched that could not be recorded
        filler.unlink()
        done = run_cli(workspace, "--workers", "1")
        assert done.returncode == 0, done.stderr
        shown = run_module("status", "--state-dir", str(state), timeout=60)
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
        assert clip_names(workspace["out"]) == ["a_0000000_0000030.hevc"]


def test_a_ledger_disk_that_fills_during_the_run_stops_it_cleanly_and_the_next_run_resumes(
    server: MediaServer, workspace: dict[str, Path], tmp_path: Path
) -> None:
    state, logs = tmp_path / "state", tmp_path / "logs"
    config = DISK_CONFIG.format(state=state, logs=logs).replace(
        "[download]\n", "[download]\nattempts = 1\nsocket_timeout_seconds = 1.5\n"
    )
    workspace["config"].write_text(config)
    video = make_video(workspace["media"] / "v.mp4", frames=30)
    first = server.add("first.mp4", video)
    stuck = server.add("stuck.mp4", video, stall_gets=(1, 2, 3, 4))  # look-ups and downloads stall
    workspace["urls"].write_text(f"{first}\n{stuck}\n")
    for name in ("first", "stuck"):
        (workspace["clips"] / f"{name}.txt").write_text("0 30\n")
    with small_disk(state, "2m"):
        ledger = state / "ledger.sqlite"
        with started(cli_command(workspace, "--workers", "1")) as run:
            wait_for(
                "the first URL done and the second in flight",
                lambda: (
                    ledger.exists()
                    and {r["video_id"]: r["state"] for r in ledger_rows(ledger)}
                    == {"first": "done", "stuck": "running"}
                ),
                120,
            )
            filler = fill(state)
            _, stderr = run.communicate(timeout=120)
        assert run.returncode == 1, stderr
        assert "Traceback" not in stderr
        lines = [line for line in stderr.splitlines() if "cannot be written" in line]
        assert len(lines) == 1 and f"state folder {state}" in lines[0], stderr
        filler.unlink()
        server.routes["/stuck.mp4"].stall_gets = ()
        done = run_cli(workspace, "--workers", "1")
        assert done.returncode == 0, done.stderr
        assert clip_names(workspace["out"]) == ["first_0000000_0000030.hevc", "stuck_0000000_0000030.hevc"]
        assert server.gets("first.mp4") == 2  # the look-up and the download of the first run, no more


# --- retries within the run -----------------------------------------------------------------------

RETRY_CONFIG = FAST_CONFIG.replace(
    "[run]\n", "[run]\nurl_attempts = 3\nretry_delay_seconds = 0.3\nretry_delay_max_seconds = 0.6\n"
).replace("[download]\n", "[download]\nattempts = 1\n")


def test_a_transient_failure_is_tried_again_later_in_the_same_run(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    workspace["config"].write_text(RETRY_CONFIG)
    flaky = server.add("flaky.mp4", make_video(workspace["media"] / "f.mp4", frames=30), fail_first=1)
    workspace["urls"].write_text(f"{flaky}\n")
    (workspace["clips"] / "flaky.txt").write_text("0 30\n")
    done = run_cli(workspace, "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert "try 1 of 3 failed, tried again in" in done.stderr
    assert decoded_indices(workspace["out"] / "flaky" / "flaky_0000000_0000030.hevc") == list(range(30))
    (row,) = ledger_rows(workspace["out"] / "ledger.sqlite")
    assert (row["state"], row["attempts"], row["failed_tries"]) == ("done", 2, 0)


def test_a_url_that_keeps_failing_is_given_up_after_its_budget_which_spans_runs(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    broken = server.add("broken.mp4", b"", status=503)
    workspace["urls"].write_text(f"{broken}\n")
    (workspace["clips"] / "broken.txt").write_text("0 30\n")
    # A first run fails once and is stopped while it waits to try again: that try is spent.
    workspace["config"].write_text(
        RETRY_CONFIG.replace("retry_delay_seconds = 0.3", "retry_delay_seconds = 60")
    )
    with started(cli_command(workspace, "--workers", "1")) as run:
        log = workspace["out"] / "logs" / "supervisor.log"
        wait_for("the first failure", lambda: log.exists() and "try 1 of 3 failed" in log.read_text(), 60)
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr
    workspace["config"].write_text(RETRY_CONFIG)
    second = run_cli(workspace, "--workers", "1")
    assert second.returncode == 1, second.stderr
    assert "try 2 of 3 failed" in second.stderr and "(failed 3 times; gave up)" in second.stderr
    gets = server.gets("broken.mp4")
    again = run_cli(workspace, "--workers", "1")
    assert again.returncode == 1 and "failed earlier, not retried" in again.stderr
    assert server.gets("broken.mp4") == gets  # a spent budget is not tried again by a plain rerun
    retried = run_cli(workspace, "--workers", "1", "--retry-failed")
    assert retried.returncode == 1 and "(failed 3 times; gave up)" in retried.stderr  # a new budget
    assert server.gets("broken.mp4") >= gets + 3


def test_a_clip_that_failed_for_a_passing_reason_is_made_again_by_the_next_run(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    url = server.add("v.mp4", make_video(workspace["media"] / "v.mp4", frames=60))
    workspace["urls"].write_text(f"{url}\n")
    (workspace["clips"] / "v.txt").write_text("0 30\n30 60\n100 130\n")
    assert run_cli(workspace, "--workers", "1").returncode == 0
    lost = workspace["out"] / "v" / "v_0000030_0000060.hevc"
    lost.unlink()
    # As a full disk or an encoder error left it: a failed row that is not permanent.
    with contextlib.closing(sqlite3.connect(workspace["out"] / "ledger.sqlite")) as db, db:
        db.execute(
            "UPDATE clips SET state='failed', path=NULL, permanent=0, error='v: [Errno 5] Input/output error'"
            " WHERE start_frame=30"
        )
    again = run_cli(workspace, "--workers", "1")
    assert again.returncode == 0, again.stderr
    assert "v: 1 clip(s) already made, 1 past the end of the source, 1 to make" in again.stderr
    assert decoded_indices(lost) == list(range(30, 60))


# --- one run per output folder; one name per source ---------------------------------------------


def test_a_second_run_with_another_state_folder_is_refused_and_the_first_is_untouched(
    server: MediaServer, workspace: dict[str, Path], tmp_path: Path
) -> None:
    url = server.add("long.mp4", make_video(workspace["media"] / "long.mp4", frames=300))
    workspace["urls"].write_text(f"{url}\n")
    (workspace["clips"] / "long.txt").write_text("".join(f"{s} {s + 30}\n" for s in range(0, 300, 30)))
    with started(cli_command(workspace, "--workers", "1")) as first:
        log = workspace["out"] / "logs" / "supervisor.log"
        wait_for("the first run to start", lambda: log.exists() and "URL(s) from" in log.read_text(), 60)
        before = log.read_text()
        other = tmp_path / "other.toml"
        other.write_text(FAST_CONFIG.replace("[run]\n", f"[run]\nstate_dir = '{tmp_path / 'state2'}'\n"))
        second = run_cli(workspace, "--workers", "1", "--config", str(other))
        assert second.returncode == 2, second.stderr
        assert "another run is already using" in second.stderr and "run pid" in second.stderr
        assert str(first.pid) in second.stderr
        stdout, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stderr
    assert log.read_text().startswith(before)
    assert "another run" not in log.read_text()  # the refusal wrote nothing into the holder's log
    assert len(clip_names(workspace["out"])) == 10
    assert not (tmp_path / "state2" / "ledger.sqlite").exists()


def test_two_sources_with_one_video_id_never_overwrite_each_other(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    first = server.add("walk.mp4", make_video(workspace["media"] / "walk1.mp4", frames=30))
    second = server.add("sub/walk.mp4", make_video(workspace["media"] / "walk2.mp4", frames=60))
    local = make_video(workspace["media"] / "walk.mp4", frames=20)
    workspace["urls"].write_text(f"{first}\n{second}\n{local}\n")

    def distinct(url: str) -> str:
        return f"walk-{hashlib.sha256(url.encode()).hexdigest()[:8]}"

    (workspace["clips"] / "walk.txt").write_text("0 10\n")
    (workspace["clips"] / f"{distinct(second)}.txt").write_text("40 60\n")
    done = run_cli(workspace, "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert f"video id walk is already {first}'s; this source is {distinct(second)}" in done.stderr
    # The local file's own clip file does not exist: it is skipped, never written under walk/.
    assert f"no clip file {workspace['clips'] / (distinct(str(local)) + '.txt')}" in done.stderr
    assert clip_names(workspace["out"]) == [
        f"{distinct(second)}_0000040_0000060.hevc",
        "walk_0000000_0000010.hevc",
    ]
    assert decoded_indices(
        workspace["out"] / distinct(second) / f"{distinct(second)}_0000040_0000060.hevc"
    ) == list(range(40, 60))
    manifest = run_module("manifest", "--output-dir", str(workspace["out"]), timeout=60)
    assert manifest.returncode == 0, manifest.stderr
    rows = [json.loads(line) for line in (workspace["out"] / "manifest.jsonl").read_text().splitlines()]
    assert sorted((r["video_id"], r["url"]) for r in rows) == sorted(
        [("walk", first), (distinct(second), second)]
    )
    again = run_cli(workspace, "--workers", "2")  # the same ids on every run
    assert again.returncode == 0 and "clips written 0" in again.stderr, again.stderr
    assert clip_names(workspace["out"]) == [
        f"{distinct(second)}_0000040_0000060.hevc",
        "walk_0000000_0000010.hevc",
    ]


# --- inputs the user fixes, and a terminal that closes ------------------------------------------


def test_a_refused_clip_file_is_read_again_by_a_plain_rerun(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    url = server.add("v.mp4", make_video(workspace["media"] / "v.mp4", frames=30))
    workspace["urls"].write_text(f"{url}\n")
    clip_file = workspace["clips"] / "v.txt"
    os.mkfifo(clip_file)
    refused = run_cli(workspace, "--workers", "1")
    assert refused.returncode == 1 and "not a regular file" in refused.stderr, refused.stderr
    assert server.gets("v.mp4") == 0
    clip_file.unlink()
    clip_file.write_text("0 30\n")
    fixed = run_cli(workspace, "--workers", "1")
    assert fixed.returncode == 0, fixed.stderr
    assert "failed earlier" not in fixed.stderr
    assert decoded_indices(workspace["out"] / "v" / "v_0000000_0000030.hevc") == list(range(30))


def test_clip_errors_of_one_url_are_logged_a_few_then_counted(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    url = server.add("short.mp4", make_video(workspace["media"] / "short.mp4", frames=30))
    workspace["urls"].write_text(f"{url}\n")
    (workspace["clips"] / "short.txt").write_text(
        "0 30\n" + "".join(f"{s} {s + 10}\n" for s in range(100, 400, 10))
    )
    done = run_cli(workspace, "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("runs past the end of the source") == 10
    assert f"{url}: 20 more clip error(s) not listed" in done.stderr
    assert "clips written 1, clip errors 30;" in done.stderr
    assert len([r for r in ledger_rows(workspace["out"] / "ledger.sqlite", "clips") if r["permanent"]]) == 30


def test_a_hang_up_of_the_whole_session_lets_clips_in_flight_finish(
    server: MediaServer, workspace: dict[str, Path]
) -> None:
    url = server.add("long.mp4", make_video(workspace["media"] / "long.mp4", frames=300))
    workspace["urls"].write_text(f"{url}\n")
    (workspace["clips"] / "long.txt").write_text("0 300\n")
    process = subprocess.Popen(
        cli_command(workspace, "--workers", "1"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job is
    )
    try:
        ledger = workspace["out"] / "ledger.sqlite"
        wait_for(
            "the clip in flight",
            lambda: ledger.exists() and [r["stage"] for r in ledger_rows(ledger)] == ["process"],
            120,
        )
        os.killpg(process.pid, signal.SIGHUP)  # what a closing terminal sends: to every process in it
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert "SIGHUP: finishing in-flight clips" in (workspace["out"] / "logs" / "supervisor.log").read_text()
    assert "worker 0 died" not in stderr, stderr
    assert decoded_indices(workspace["out"] / "long" / "long_0000000_0000300.hevc") == list(range(300))
    assert process.returncode == 0, stderr
