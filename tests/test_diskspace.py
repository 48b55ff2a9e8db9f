"""Free-space floors: when downloads must wait, and that waiting is logged once, not every check."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from daemon.diskspace import MB, DiskGate, Floor, free_bytes


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(message.record["message"]), level="INFO")
    yield lines
    logger.remove(sink)


def test_free_space_of_a_folder_not_made_yet_is_that_of_its_nearest_parent(tmp_path: Path) -> None:
    later = tmp_path / "download_and_process-x" / "worker-0"
    assert abs(free_bytes(later) - shutil.disk_usage(tmp_path).free) < 64 * MB


def test_a_floor_above_the_free_space_blocks_and_names_the_folder(tmp_path: Path) -> None:
    free_mb = shutil.disk_usage(tmp_path).free / MB
    gate = DiskGate(
        [Floor("temp", tmp_path / "temp", free_mb * 2 + 1024), Floor("output", tmp_path, 1)],
        recheck_seconds=0,
    )
    reason = gate.blocked()
    assert reason is not None
    assert f"temp folder {tmp_path / 'temp'}" in reason and "below the floor" in reason
    assert "output folder" not in reason


def test_floors_below_the_free_space_or_zero_let_downloads_start(tmp_path: Path) -> None:
    assert DiskGate([Floor("temp", tmp_path, 1), Floor("output", tmp_path, 1)], 0).blocked() is None
    assert DiskGate([Floor("temp", tmp_path, 0)], 0).blocked() is None


def test_pause_and_resume_are_each_logged_once(tmp_path: Path, log_lines: list[str]) -> None:
    # The one stand-in in these tests: a real disk cannot be filled and emptied on a shared machine.
    free = {"bytes": 10 * MB}
    gate = DiskGate([Floor("output", tmp_path, 100)], recheck_seconds=0, free=lambda path: free["bytes"])
    for _ in range(5):
        assert gate.blocked() is not None
    free["bytes"] = 500 * MB
    for _ in range(5):
        assert gate.blocked() is None
    assert [line.split(":")[0] for line in log_lines] == ["downloads paused", "downloads resumed"]
    assert "has 10 MB free, below the floor of 100 MB" in log_lines[0]


def test_while_paused_the_disk_is_looked_at_again_only_after_the_recheck_interval(tmp_path: Path) -> None:
    looks: list[Path] = []

    def free(path: Path) -> int:
        looks.append(path)
        return 0

    gate = DiskGate([Floor("temp", tmp_path, 1)], recheck_seconds=3600, free=free)
    for _ in range(10):
        assert gate.blocked() is not None
    assert looks == [tmp_path]


def test_an_unreadable_folder_blocks_with_the_reason(tmp_path: Path) -> None:
    def free(path: Path) -> int:
        raise PermissionError(13, "Permission denied", str(path))

    reason = DiskGate([Floor("temp", tmp_path, 1)], 0, free=free).blocked()
    assert reason is not None and "cannot read free space of temp folder" in reason
