"""Clip timestamp files: `<clip-dir>/<VIDEOID>.txt`, one `<start> <end>` frame pair per line."""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

from daemon.textfiles import shown, text_lines


@dataclass(frozen=True, order=True)
class Clip:
    """Frames [start_frame, end_frame) of a video, counted at the clip file's frame rate."""

    start_frame: int
    end_frame: int

    def start_seconds(self, clip_fps: Fraction) -> Fraction:
        return Fraction(self.start_frame) / clip_fps

    def frame_count(self, clip_fps: Fraction, fps: Fraction) -> int:
        """round((end - start) * fps / clip_fps), halves rounded up, at least one frame."""
        exact = Fraction(self.end_frame - self.start_frame) * fps / clip_fps
        return max(1, int(exact + Fraction(1, 2)))

    def file_name(self, video_id: str, suffix: str = ".hevc") -> str:
        return f"{video_id}_{self.start_frame:07d}_{self.end_frame:07d}{suffix}"


# What a clip file may be. A dataset's densest clip files list a few thousand clips per video; these
# limits are far above that and keep one hostile file (a million lines, /dev/zero) from costing the
# run its memory, its ledger or its logs.
MAX_CLIP_FILE_BYTES = 16 * 1024 * 1024
MAX_CLIPS_PER_VIDEO = 100_000
MAX_CLIP_LINE_BYTES = 1024
PROBLEMS_LISTED = 10  # per file; the rest are counted in one more line


class ClipFileRefused(OSError):
    """The clip file is not something to read: not a regular file, too big, or a symlink out of the
    clip folder. The message says which, in words."""


@dataclass(frozen=True)
class ClipFile:
    path: Path
    clips: list[Clip]
    # One `file:line: reason` per skipped line, the first PROBLEMS_LISTED of them, then one
    # `file: N more …` line when there were more.
    problems: list[str]
    rejected_lines: int = 0  # every skipped line, listed in `problems` or not


def clip_file_path(clip_dir: Path, video_id: str) -> Path:
    return clip_dir / f"{video_id}.txt"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_clip_file(path: Path, clip_dir: Path | None = None) -> BinaryIO:
    """The clip file, opened for reading once it is known to be a regular file within the limits.

    Never blocks: a FIFO is opened without waiting for a writer and then refused.
    Raises FileNotFoundError when missing, ClipFileRefused (an OSError) when it is no clip file.
    """
    folder = (clip_dir or path.parent).resolve()
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(folder):
            raise ClipFileRefused(f"a symlink to {target}, outside the clip folder {folder}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ClipFileRefused(f"{_kind(info.st_mode)}, not a regular file")
        if info.st_size > MAX_CLIP_FILE_BYTES:
            raise ClipFileRefused(
                f"{info.st_size} bytes, more than the {MAX_CLIP_FILE_BYTES // (1024 * 1024)} MiB a clip "
                "file may have"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_clip_file(path: Path, clip_dir: Path | None = None) -> ClipFile:
    """Parse a clip file; bad lines are reported and skipped, the good ones kept in file order.

    Each line is decoded on its own (a stray byte costs its line); a byte-order mark and CRLF line
    ends are accepted. Raises FileNotFoundError when the file is missing and OSError (ClipFileRefused
    among them) when it cannot or must not be read.
    """
    clips: list[Clip] = []
    problems: list[str] = []
    rejected = 0
    seen: set[Clip] = set()

    def reject(where: str, reason: str) -> None:
        nonlocal rejected
        rejected += 1
        if len(problems) < PROBLEMS_LISTED:
            problems.append(f"{where}: {reason}")

    with open_clip_file(path, clip_dir) as handle:
        # The size limit holds for what is read too, should the file grow while it is read.
        data = handle.read(MAX_CLIP_FILE_BYTES + 1)
    if len(data) > MAX_CLIP_FILE_BYTES:
        mib = MAX_CLIP_FILE_BYTES // (1024 * 1024)
        raise ClipFileRefused(f"grew past the {mib} MiB a clip file may have")
    for line in text_lines(io.BytesIO(data), MAX_CLIP_LINE_BYTES):
        where = f"{path}:{line.number}"
        if line.text is None:
            reject(where, str(line.problem))
            continue
        raw = line.text
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        if len(clips) >= MAX_CLIPS_PER_VIDEO:
            reject(where, f"more than {MAX_CLIPS_PER_VIDEO} clips for one video; ignored")
            continue
        fields = text.split()
        if len(fields) != 2:
            reject(where, f"expected '<start> <end>', got {shown(raw.strip())}")
            continue
        try:
            start, end = int(fields[0], 10), int(fields[1], 10)
        except ValueError:
            reject(where, f"not two integers: {shown(raw.strip())}")
            continue
        if start < 0 or end < 0:
            reject(where, f"negative frame index in {shown(raw.strip())}")
            continue
        if end <= start:
            reject(where, f"end {end} is not after start {start}")
            continue
        clip = Clip(start, end)
        if clip in seen:
            reject(where, f"clip {start} {end} listed again")
            continue
        seen.add(clip)
        clips.append(clip)
    if rejected > len(problems):
        problems.append(f"{path}: {rejected - len(problems)} more bad line(s) not listed")
    return ClipFile(path=path, clips=clips, problems=problems, rejected_lines=rejected)
