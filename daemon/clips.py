"""Clip timestamp files: `<clip-dir>/<VIDEOID>.txt`, one `<start> <end>` frame pair per line."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path


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


@dataclass(frozen=True)
class ClipFile:
    path: Path
    clips: list[Clip]
    problems: list[str]  # one `file:line: reason` per skipped line


def clip_file_path(clip_dir: Path, video_id: str) -> Path:
    return clip_dir / f"{video_id}.txt"


def read_clip_file(path: Path) -> ClipFile:
    """Parse a clip file; bad lines are reported and skipped, the good ones kept in file order.

    Raises FileNotFoundError when the file is missing and OSError/UnicodeDecodeError when unreadable.
    """
    clips: list[Clip] = []
    problems: list[str] = []
    seen: set[Clip] = set()
    text = path.read_text(encoding="utf-8")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{path}:{number}"
        if len(fields) != 2:
            problems.append(f"{where}: expected '<start> <end>', got {raw.strip()!r}")
            continue
        try:
            start, end = int(fields[0], 10), int(fields[1], 10)
        except ValueError:
            problems.append(f"{where}: not two integers: {raw.strip()!r}")
            continue
        if start < 0 or end < 0:
            problems.append(f"{where}: negative frame index in {raw.strip()!r}")
            continue
        if end <= start:
            problems.append(f"{where}: end {end} is not after start {start}")
            continue
        clip = Clip(start, end)
        if clip in seen:
            problems.append(f"{where}: clip {start} {end} listed again")
            continue
        seen.add(clip)
        clips.append(clip)
    return ClipFile(path=path, clips=clips, problems=problems)
