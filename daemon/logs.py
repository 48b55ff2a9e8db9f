"""Log files: the supervisor's and one per worker, each line naming worker, video and stage."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from loguru import logger

from daemon.config import RunSettings

LINE_FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[worker]} | {extra[video_id]} | "
    "{extra[stage]} | {message}"
)
CONSOLE_FORMAT = "<level>{level: <7}</level> | {extra[worker]} | {extra[video_id]} | {message}"


def worker_log_path(log_dir: Path, index: int) -> Path:
    return log_dir / f"worker-{index}.log"


def supervisor_log_path(log_dir: Path) -> Path:
    return log_dir / "supervisor.log"


def configure(
    name: str,
    log_file: Path | None,
    level: str,
    json_lines: bool = False,
    rotation: str = "50 MB",
    retention: int = 5,
    console: TextIO | None = None,
    console_level: str | None = None,
) -> None:
    """(Re)configure loguru for this process: a rotated file, and optionally the terminal."""
    logger.remove()
    logger.configure(extra={"worker": name, "video_id": "-", "stage": "-"})
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.add(
            log_file,
            level=level,
            format=LINE_FORMAT,
            serialize=json_lines,
            rotation=rotation,
            retention=retention,
            enqueue=False,
            encoding="utf-8",
        )
    if console is not None:
        logger.add(console, level=console_level or level, format=CONSOLE_FORMAT, colorize=console.isatty())


def configure_from_settings(
    name: str, log_file: Path, run: RunSettings, console: TextIO | None = None
) -> None:
    configure(
        name,
        log_file,
        run.log_level,
        json_lines=run.log_json,
        rotation=run.log_rotation,
        retention=run.log_retention,
        console=console,
    )


def log_files(log_dir: Path, worker: int | None) -> list[Path]:
    if worker is not None:
        return [worker_log_path(log_dir, worker)]
    files = [supervisor_log_path(log_dir)]
    files += sorted(log_dir.glob("worker-*.log"), key=lambda p: int(p.stem.split("-")[1]))
    return [f for f in files if f.exists()]


def _follow(paths: list[Path], poll_seconds: float) -> Iterator[str]:
    """Like `tail -F`: new lines from every file, surviving rotation and files that appear late."""
    handles: dict[Path, tuple[TextIO, int]] = {}

    def open_at_end(path: Path) -> None:
        handle = path.open("r", encoding="utf-8", errors="replace")
        handle.seek(0, 2)
        handles[path] = (handle, path.stat().st_ino)

    for path in paths:
        if path.exists():
            open_at_end(path)
    while True:
        idle = True
        for path in paths:
            if path not in handles:
                if path.exists():
                    handles[path] = (path.open("r", encoding="utf-8", errors="replace"), path.stat().st_ino)
                continue
            handle, inode = handles[path]
            line = handle.readline()
            while line:
                idle = False
                yield line
                line = handle.readline()
            try:
                rotated = path.stat().st_ino != inode
            except FileNotFoundError:
                rotated = True
            if rotated:
                handle.close()
                del handles[path]
        if idle:
            time.sleep(poll_seconds)


def show_logs(log_dir: Path, worker: int | None, follow: bool, out: TextIO = sys.stdout) -> int:
    paths = log_files(log_dir, worker)
    if worker is not None and not follow and not paths[0].exists():
        print(f"no log for worker {worker} in {log_dir}", file=sys.stderr)
        return 1
    if not paths and not follow:
        print(f"no log files in {log_dir}", file=sys.stderr)
        return 1
    for path in paths:
        if path.exists():
            with path.open(encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    out.write(line)
    out.flush()
    if follow:
        if worker is None:
            paths = [supervisor_log_path(log_dir)] + [worker_log_path(log_dir, i) for i in range(64)]
        try:
            for line in _follow(paths, poll_seconds=0.25):
                out.write(line)
                out.flush()
        except KeyboardInterrupt:
            return 0
    return 0
