"""Log files: the supervisor's and one per worker, each line naming worker, video and stage."""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from loguru import logger

if TYPE_CHECKING:
    from rich.console import Console

from daemon.config import RunSettings

LINE_FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[worker]} | {extra[video_id]} | "
    "{extra[stage]} | {message}"
)
CONSOLE_FORMAT = "<level>{level: <7}</level> | {extra[worker]} | {extra[video_id]} | {message}"
# loguru's levels, lowest first (CRITICAL is never written by the program, but can be asked for).
LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


def close_and_leave(code: int = 0) -> NoReturn:
    """Ends a process that has nothing left to save at once, without the interpreter's teardown
    (freeing the modules it loaded takes tenths of a second, at the end of every run). Its log
    files are closed first, so that their last lines are there, and its standard streams flushed."""
    logger.remove()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def worker_log_path(log_dir: Path, index: int) -> Path:
    return log_dir / f"worker-{index}.log"


def supervisor_log_path(log_dir: Path) -> Path:
    return log_dir / "supervisor.log"


class ConsoleSink:
    """The terminal's log sink. While a live progress display holds the terminal, records go through
    its console, which prints them above the bar, each on its own line; otherwise straight to the
    stream. (Two writers on one terminal glue a record onto the bar, or the bar's redraw erases it.)"""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live: Console | None = None

    def write(self, message: Any) -> None:
        live = self.live
        if live is not None:
            from rich.text import Text

            live.print(Text.from_ansi(str(message).rstrip("\n")), soft_wrap=True, highlight=False)
            return
        self.stream.write(str(message))
        self.stream.flush()


_console_sink: ConsoleSink | None = None


def route_console_through(console: Console | None) -> None:
    """Send terminal log records through `console` (a live display's), or, with None, straight on."""
    if _console_sink is not None:
        _console_sink.live = console


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
    global _console_sink
    logger.remove()
    _console_sink = None
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
        _console_sink = ConsoleSink(console)
        logger.add(
            _console_sink.write,
            level=console_level or level,
            format=CONSOLE_FORMAT,
            colorize=console.isatty(),
        )


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


# A log file's name: the supervisor's or a worker's, current ("worker-0.log") or rotated away by loguru
# ("worker-0.2026-05-01_10-00-00_000000.log").
_LOG_NAME = re.compile(r"^(?P<stream>supervisor|worker-(?P<worker>\d+))(?P<rotated>\..+)?\.log$")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \|")


def log_streams(log_dir: Path, worker: int | None) -> dict[str, list[Path]]:
    """Each process's log files, oldest first (rotated ones, then the current one): stream -> files."""
    streams: dict[str, list[Path]] = {}
    if log_dir.is_dir():
        for path in log_dir.iterdir():
            match = _LOG_NAME.match(path.name)
            if match is None:
                continue
            if worker is not None and match["worker"] != str(worker):
                continue
            streams.setdefault(match["stream"], []).append(path)
    for files in streams.values():
        # The current file has no suffix and is always the newest; rotated names sort by date.
        files.sort(key=lambda path: (path.name.count(".") == 1, path.name))

    def order(stream: str) -> tuple[int, int]:
        return (0, 0) if stream == "supervisor" else (1, int(stream.split("-")[1]))

    return {stream: streams[stream] for stream in sorted(streams, key=order)}


def line_time(line: str) -> float | None:
    """When a log line was written, for a line that starts a record (text or JSON); else None."""
    match = _STAMP.match(line)
    if match:
        return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S.%f").timestamp()
    if line.startswith("{"):
        try:
            return float(json.loads(line)["record"]["time"]["timestamp"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def record_level(text: str) -> str | None:
    """The level of a record (text or JSON), or None when it names none."""
    if text.startswith("{"):
        try:
            return str(json.loads(text.splitlines()[0])["record"]["level"]["name"])
        except (ValueError, KeyError, TypeError, IndexError):
            return None
    fields = text.split(" | ", 2)
    return fields[1].strip() if len(fields) > 2 else None


class RecordFilter:
    """--since and --level: which records `logs` prints."""

    def __init__(self, since: float | None = None, level: str | None = None) -> None:
        self.since = since
        self.lowest = LEVELS.index(level) if level else 0

    def __call__(self, record: tuple[float, str]) -> bool:
        stamp, text = record
        if self.since is not None and stamp < self.since:
            return False
        if self.lowest:
            level = record_level(text)
            return level in LEVELS and LEVELS.index(level) >= self.lowest
        return True


class _Records:
    """Turns one stream's lines into (time, text) records; a traceback's lines stay with its record."""

    def __init__(self) -> None:
        self.last = float("-inf")

    def __call__(self, lines: Iterable[str]) -> Iterator[tuple[float, str]]:
        current: list[str] = []
        for line in lines:
            stamp = line_time(line)
            if stamp is not None and current:
                yield self.last, "".join(current)
                current = []
            if stamp is not None:
                self.last = stamp
            current.append(line)
        if current:
            yield self.last, "".join(current)


def _lines(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        try:
            with path.open(encoding="utf-8", errors="replace") as handle:
                yield from handle
        except FileNotFoundError:
            continue  # rotated away and removed by retention while we read


class _Tail:
    """New complete lines of one log file, like `tail -F`: survives rotation and a file that appears late."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: TextIO | None = None
        self.inode = 0
        self.partial = ""
        self.records = _Records()
        self.seen: set[int] = set()  # inodes read, so a rotated file is never read twice

    def _open(self) -> bool:
        try:
            self.handle = self.path.open("r", encoding="utf-8", errors="replace")
            self.inode = os.fstat(self.handle.fileno()).st_ino
        except FileNotFoundError:
            return False
        self.seen.add(self.inode)
        return True

    def _missed(self) -> list[str]:
        """Lines of files that were created and rotated away between two polls."""
        found: list[str] = []
        stem = self.path.name.removesuffix(".log")
        for path in sorted(self.path.parent.glob(f"{stem}.*.log")):
            try:
                if path.stat().st_ino in self.seen:
                    continue
                self.seen.add(path.stat().st_ino)
                found += path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
            except FileNotFoundError:
                continue
        return found

    def lines(self) -> list[str]:
        if self.handle is None and not self._open():
            return []
        assert self.handle is not None
        found = self._read()
        try:
            rotated = self.path.stat().st_ino != self.inode
        except FileNotFoundError:
            rotated = True
        if rotated:
            found += self._read()  # the last lines written before the rename
            if self.partial:
                found.append(self.partial + "\n")
                self.partial = ""
            self.handle.close()
            self.handle = None
            found += self._missed()
            if self._open():
                found += self._read()
        return found

    def _read(self) -> list[str]:
        assert self.handle is not None
        found = []
        for line in self.handle.readlines():
            line = self.partial + line
            self.partial = ""
            if line.endswith("\n"):
                found.append(line)
            else:
                self.partial = line  # the writer is mid-line; the rest comes on a later read
        return found


def show_logs(
    log_dir: Path,
    worker: int | None,
    follow: bool,
    out: TextIO = sys.stdout,
    since: float | None = None,
    level: str | None = None,
) -> int:
    """Every process's log, merged by time (or one worker's); with `follow`, new lines as they come.

    A closed reader (`logs | head`) raises BrokenPipeError, which the command line turns into a
    quiet exit."""
    wanted = RecordFilter(since, level)
    streams = log_streams(log_dir, worker)
    if worker is not None and not follow and f"worker-{worker}" not in streams:
        print(f"no log for worker {worker} in {log_dir}", file=sys.stderr)
        return 1
    if not streams and not follow:
        print(f"no log files in {log_dir}", file=sys.stderr)
        return 1
    if not follow:
        merged = heapq.merge(*(_Records()(_lines(files)) for files in streams.values()), key=lambda r: r[0])
        for _, text in filter(wanted, merged):
            out.write(text)
        out.flush()
        return 0
    # The current files are read through their tails, so nothing written meanwhile is missed.
    tails: dict[str, _Tail] = {}

    def current(stream: str) -> Path:
        return supervisor_log_path(log_dir) if stream == "supervisor" else log_dir / f"{stream}.log"

    first: list[Iterator[tuple[float, str]]] = []
    for stream, files in streams.items():
        tail = tails[stream] = _Tail(current(stream))
        rotated = [path for path in files if path != tail.path]
        tail.seen.update(path.stat().st_ino for path in rotated if path.exists())
        first.append(tail.records([*_lines(rotated), *tail.lines()]))
    if worker is not None and f"worker-{worker}" not in tails:
        tails[f"worker-{worker}"] = _Tail(worker_log_path(log_dir, worker))
    try:
        for _, text in filter(wanted, heapq.merge(*first, key=lambda r: r[0])):
            out.write(text)
        out.flush()
        while True:
            if worker is None:
                for stream in log_streams(log_dir, None):
                    if stream not in tails:  # a worker started since
                        tails[stream] = _Tail(current(stream))
            batch = [record for tail in tails.values() for record in tail.records(tail.lines())]
            if not batch:
                time.sleep(0.25)
                continue
            # Sorted by time within what arrived together; the sort is stable, so equal times keep
            # the supervisor first and each file's own order.
            for _, text in filter(wanted, sorted(batch, key=lambda r: r[0])):
                out.write(text)
            out.flush()
    except KeyboardInterrupt:
        return 0
