"""`download_and_process status`: counts, busy workers, recent throughput and errors, from the ledger."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from daemon.cli import EXIT_OK, EXIT_USAGE, main
from daemon.folders import LEDGER_NAME
from daemon.ledger import Ledger

DONE, FAILED, RUNNING, PENDING = (f"https://example.test/{name}" for name in ("done", "bad", "busy", "wait"))


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ledger:
    """A ledger as a run leaves it, kept open for writing as a running service keeps it."""
    monkeypatch.chdir(tmp_path)  # no ./config.toml
    writer = Ledger(tmp_path / "out" / LEDGER_NAME)
    for url in (DONE, FAILED, RUNNING, PENDING):
        writer.add_url(url, url.rsplit("/", 1)[1], None)
    writer.mark_running(DONE, 0)
    writer.record_clip("done", DONE, 0, 30, "done", path="/o/done_0.hevc", frames=30, size=5000)
    writer.record_clip("done", DONE, 40, 50, "failed", error="done clip 40 50: runs past the end")
    writer.finish(DONE, "done")
    writer.mark_running(FAILED, 1)
    writer.finish(FAILED, "failed", error="download: HTTP 404: Not Found")
    writer.mark_running(RUNNING, 1)
    writer.set_phase(RUNNING, "process")
    return writer


def status_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["status", *args, "--json"]) == EXIT_OK
    return json.loads(capsys.readouterr().out)


def test_counts_busy_workers_throughput_and_errors(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = status_json(capsys, "--output-dir", str(tmp_path / "out"))
    assert status["counts"] == {"pending": 1, "running": 1, "done": 1, "skipped": 0, "failed": 1}
    assert [(w["worker"], w["url"], w["stage"]) for w in status["workers"]] == [(1, RUNNING, "process")]
    throughput = status["throughput"]
    assert (throughput["urls_ended"], throughput["clips_written"], throughput["clip_errors"]) == (2, 1, 1)
    assert (throughput["frames"], throughput["bytes"]) == (30, 5000)
    # Over the seconds work went on in the window, not over the whole window.
    assert 0 < throughput["busy_seconds"] < 60
    assert throughput["frames_per_second"] == pytest.approx(30 / max(throughput["busy_seconds"], 1), rel=0.01)
    errors = {(e["url"], e["error"]) for e in status["errors"]}
    assert errors == {
        (FAILED, "download: HTTP 404: Not Found"),
        (DONE, "done clip 40 50: runs past the end"),
    }
    assert status["service"] is None  # no service runs on this folder


def test_only_the_last_minutes_count_towards_throughput(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(tmp_path / "out" / LEDGER_NAME) as db:
        db.execute("UPDATE clips SET finished_at = ?", (time.time() - 3600,))
        db.execute("UPDATE urls SET finished_at = ? WHERE url = ?", (time.time() - 3600, DONE))
    status = status_json(capsys, "--output-dir", str(tmp_path / "out"), "--minutes", "5")
    throughput = status["throughput"]
    assert (throughput["urls_ended"], throughput["clips_written"], throughput["frames"]) == (1, 0, 0)
    assert status["counts"]["done"] == 1  # counts are for all time


def test_the_newest_errors_come_first_and_their_number_is_capped(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger.finish(PENDING, "failed", error="source: not a video")
    status = status_json(capsys, "--state-dir", str(tmp_path / "out"), "--errors", "1")
    assert [(e["url"], e["error"]) for e in status["errors"]] == [(PENDING, "source: not a video")]


def test_text_output_names_each_busy_worker_and_error(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--output-dir", str(tmp_path / "out")]) == EXIT_OK
    text = capsys.readouterr().out
    assert "URLs: pending 1, running 1, done 1, skipped 0, failed 1" in text
    assert f"worker 1: process {RUNNING}" in text
    assert f"{FAILED}: download: HTTP 404: Not Found" in text


def test_the_ledger_is_found_through_the_config_file(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "service.toml"
    config.write_text(f'[service]\noutput_dir = "{tmp_path / "out"}"\n')
    assert status_json(capsys, "--config", str(config))["counts"]["running"] == 1


def test_a_missing_ledger_is_a_clear_error_and_is_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--output-dir", str(tmp_path / "nothing")]) == EXIT_USAGE
    assert f"no ledger at {tmp_path / 'nothing' / LEDGER_NAME}" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_status_without_a_folder_says_what_to_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == EXIT_USAGE
    assert "give --output-dir" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--json"], []], ids=["json", "text"])
def test_status_cut_short_by_a_full_disk_says_so_and_does_not_exit_0(
    ledger: Ledger, tmp_path: Path, extra: list[str]
) -> None:
    """Output that cannot be written, in the middle (the JSON) or at the last flush (the text, which
    fits the buffer), fails the command with one line saying so, never a traceback or exit 0."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "daemon", "status", "--output-dir", str(tmp_path / "out")]
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            command + extra,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=str(root)),
            timeout=120,
        )
    assert result.returncode == 1, result.stderr
    assert "download_and_process: cannot write the output" in result.stderr, result.stderr
    assert "No space left on device" in result.stderr
    assert "Traceback" not in result.stderr
