"""GPU slots are OS file locks held by real processes: death frees them, waiting is logged, and work
that needs no slot (downloading) is never held up by them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from daemon.config import load_settings
from daemon.download import download
from daemon.gpu.slots import GpuSlots

from conftest import ROOT
from media import make_video
from server import MediaServer

HOLDER = """
import sys, time
from pathlib import Path
from daemon.gpu.slots import GpuSlots
slots = GpuSlots(Path(sys.argv[1]), 0, int(sys.argv[2]))
with slots.hold("test holder") as index:
    print(index, flush=True)
    time.sleep(600)
"""


def start_holder(slot_dir: Path, count: int) -> tuple[subprocess.Popen[str], int]:
    """A separate process that takes a slot and keeps it; returns it and the slot index it holds."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(slot_dir), str(count)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip().isdigit(), "holder did not get a slot"
    return process, int(line)


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG", format="{message}")
    yield lines
    logger.remove(sink)


def test_a_slot_held_by_a_killed_process_is_free_at_once(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    slots = GpuSlots(tmp_path, device_id=0, count=1)
    holder, index = start_holder(tmp_path, 1)
    holders.append(holder)
    assert index == 0
    assert slots.try_take() is None  # held by the other process

    holder.send_signal(signal.SIGKILL)
    holder.wait()

    taken = slots.try_take()
    assert taken is not None and taken[0] == 0
    os.close(taken[1])


def test_slots_are_per_device_and_counted(tmp_path: Path, holders: list[subprocess.Popen[str]]) -> None:
    first, second = start_holder(tmp_path, 2), start_holder(tmp_path, 2)
    holders += [first[0], second[0]]
    assert {first[1], second[1]} == {0, 1}
    assert GpuSlots(tmp_path, device_id=0, count=2).try_take() is None
    other_device = GpuSlots(tmp_path, device_id=1, count=2).try_take()
    assert other_device is not None
    os.close(other_device[1])


def test_a_waiting_worker_blocks_and_logs_while_downloads_go_on(
    tmp_path: Path,
    holders: list[subprocess.Popen[str]],
    log_lines: list[str],
    server: MediaServer,
) -> None:
    slot_dir = tmp_path / "slots"
    for _ in range(2):
        holders.append(start_holder(slot_dir, 2)[0])
    slots = GpuSlots(slot_dir, device_id=0, count=2, wait_initial_seconds=0.05, wait_max_seconds=0.2)
    got: list[int] = []
    waiting = threading.Thread(target=lambda: got.append(slots.hold("test clip").__enter__()), daemon=True)
    waiting.start()

    # Downloading takes no slot: it finishes while every slot is held and the worker waits.
    settings = load_settings(None)
    url = server.add("v.mp4", make_video(tmp_path / "v.mp4", frames=10))
    fetched = download(url, tmp_path / "dl", settings.download, settings.output, lambda *_: None)
    assert fetched.stat().st_size > 0
    assert waiting.is_alive() and got == []
    expected = "waiting for a GPU slot for test clip: all 2 slot(s) of GPU 0 are busy"
    assert any(expected in line for line in log_lines)

    holders[0].kill()
    holders[0].wait()
    waiting.join(timeout=30)
    assert got and got[0] in (0, 1)
    assert any("for test clip after waiting" in line for line in log_lines)


def test_low_free_memory_keeps_a_worker_waiting(tmp_path: Path, log_lines: list[str]) -> None:
    readings = iter([100.0, 100.0, 5000.0])
    sleeps: list[float] = []
    slots = GpuSlots(
        tmp_path,
        device_id=0,
        count=1,
        wait_initial_seconds=0.5,
        wait_max_seconds=0.75,
        min_free_memory_mb=2048,
        free_memory=lambda device: next(readings),
        sleep=sleeps.append,
    )
    with slots.hold("memory test") as index:
        assert index == 0
    assert sleeps == [0.5, 0.75]  # doubled, then capped
    assert any("100 MiB free, 2048 MiB wanted" in line for line in log_lines)
