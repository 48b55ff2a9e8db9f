"""`manifest`: one row per clip written, matching the files on disk, written whole or not at all."""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import pytest

from conftest import run_cli, run_command, without_modules
from media import make_video
from server import MediaServer


def manifest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_command([sys.executable, "-m", "daemon", "manifest", *args], env=env, timeout=120)


@pytest.fixture
def made(server: MediaServer, workspace: dict[str, Path]) -> dict[str, Path]:
    """A run with two sources (one of 25 fps, one of 60) and a clip that fails."""
    fast = server.add(
        "fast.mp4", make_video(workspace["media"] / "fast.mp4", fps=60, frames=120, width=160, height=96)
    )
    local = make_video(workspace["media"] / "slow.mp4", fps=25, frames=50)
    workspace["urls"].write_text(f"{fast}\n{local}\n")
    (workspace["clips"] / "fast.txt").write_text("0 10\n20 45\n")
    (workspace["clips"] / "slow.txt").write_text("5 25\n30 200\n")
    assert run_cli(workspace, "--workers", "2").returncode == 0
    return workspace


def check_rows(rows: list[dict[str, Any]], workspace: dict[str, Path]) -> None:
    on_disk = sorted(workspace["out"].glob("*/*.hevc"))
    assert sorted(Path(row["path"]) for row in rows) == on_disk
    assert [(row["video_id"], int(row["start_frame"]), int(row["end_frame"])) for row in rows] == [
        ("fast", 0, 10),
        ("fast", 20, 45),
        ("slow", 5, 25),
    ]
    for row in rows:
        path = Path(row["path"])
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert int(row["bytes"]) == path.stat().st_size
        with av.open(str(path)) as container:
            decoded = list(container.decode(video=0))
        assert int(row["frames"]) == len(decoded) == int(row["end_frame"]) - int(row["start_frame"])
        assert (int(row["width"]), int(row["height"])) == (decoded[0].width, decoded[0].height) == (128, 80)
        assert float(row["fps"]) == 30.0
        assert row["source_codec"] == "h264"
        fast = row["video_id"] == "fast"
        assert (int(row["source_width"]), int(row["source_height"])) == ((160, 96) if fast else (128, 80))
        assert float(row["source_fps"]) == (60.0 if fast else 25.0)
        assert row["made_at"].endswith("+00:00")
    assert rows[2]["url"] == str(workspace["media"] / "slow.mp4")


def test_jsonl_rows_match_the_files_on_disk(made: dict[str, Path]) -> None:
    done = manifest("--output-dir", str(made["out"]))
    assert done.returncode == 0, done.stderr
    assert "3 clip(s)" in done.stderr
    target = made["out"] / "manifest.jsonl"
    check_rows([json.loads(line) for line in target.read_text().splitlines()], made)
    assert [p.name for p in made["out"].iterdir() if p.name.startswith(".")] == [".download_and_process.lock"]


def test_csv_rows_match_the_files_on_disk(made: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "index" / "clips.csv"
    done = manifest("--output-dir", str(made["out"]), "--format", "csv", "--out", str(target))
    assert done.returncode == 0, done.stderr
    with target.open(newline="") as handle:
        check_rows(list(csv.DictReader(handle)), made)


def test_parquet_rows_match_the_files_on_disk(made: dict[str, Path]) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    done = manifest("--output-dir", str(made["out"]), "--format", "parquet")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(made["out"] / "manifest.parquet")
    assert str(table.schema.field("frames").type) == "int64"
    check_rows(table.to_pylist(), made)


def test_a_ledger_from_before_the_manifest_gains_its_columns(made: dict[str, Path]) -> None:
    """An older ledger (no hash, size or source columns) is migrated on the next run's open, and a
    manifest of its old clips hashes them from the files."""
    ledger = made["out"] / "ledger.sqlite"
    with sqlite3.connect(ledger) as db:
        for table, column in [("clips", c) for c in ("sha256", "width", "height", "fps")] + [
            ("urls", c) for c in ("source_codec", "source_width", "source_height", "source_fps")
        ]:
            db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.execute("DROP TABLE rejected_lines")
    done = manifest("--output-dir", str(made["out"]))  # read-only: the old ledger as it is
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (made["out"] / "manifest.jsonl").read_text().splitlines()]
    assert [row["sha256"] for row in rows] == [
        hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest() for row in rows
    ]
    assert rows[0]["source_codec"] is None
    assert run_cli(made).returncode == 0  # a run opens it for writing: the columns come back
    with sqlite3.connect(ledger) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(clips)")}
    assert {"sha256", "width", "height", "fps"} <= columns


def test_a_missing_ledger_or_pyarrow_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = manifest("--output-dir", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip() == f"download_and_process: manifest: no ledger at {tmp_path / 'ledger.sqlite'}; "
        "give --output-dir or --state-dir of a run"
    )

    env, _ = without_modules(tmp_path, ("pyarrow",))
    done = manifest("--output-dir", str(tmp_path), "--format", "parquet", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "download_and_process: manifest: --format parquet needs pyarrow, which is not installed: "
        "pip install 'download_and_process[parquet]'"
    )
    assert not (tmp_path / "manifest.parquet").exists()
