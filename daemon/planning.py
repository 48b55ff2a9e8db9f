"""Planning: what a source needs before it is handed out (its id, its clip file, its missing clips).

Runs in the supervisor, the ledger's only writer, and records each source it is given.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from daemon.clips import Clip, clip_file_path, read_clip_file
from daemon.ledger import Ledger, LedgerReader, UrlRow, UrlState
from daemon.messages import Task
from daemon.urls import Source


@dataclass(frozen=True)
class Planned:
    """Clips to make: hand `task` to a worker."""

    task: Task
    problems: list[str]  # the clip file's rejected lines, one line each (the first few, then a count)
    rejected_lines: int = 0  # all of them


@dataclass(frozen=True)
class Settled:
    """Nothing to hand out: the source ends now, in `state`."""

    state: UrlState  # done, skipped or failed
    error: str | None
    problems: list[str]
    recorded: bool = False  # the ledger already says so (a failure from an earlier run)
    rejected_lines: int = 0
    retryable: bool = False  # a failure the next run looks at again (a clip file the user can fix)


def distinct_video_id(video_id: str, url: str) -> str:
    """The id of a second source whose id another URL already holds: the id and 8 hex digits of
    the URL's SHA-256, the same on every run and machine."""
    return f"{video_id}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


class Planner:
    def __init__(self, ledger: Ledger, clip_dir: Path, retry_failed: bool) -> None:
        self.ledger = ledger
        self.clip_dir = clip_dir
        self.retry_failed = retry_failed

    def video_id(self, source: Source, row: UrlRow) -> str:
        """The source's id in this output folder (`row`: its ledger row): its own, unless another
        URL took it first; never two sources under one name, so neither overwrites the other's
        clips."""
        owner = self.ledger.url_with_video_id(row.video_id, source.url)
        if owner is None or self.ledger.added_before(source.url, owner):
            return row.video_id
        distinct = distinct_video_id(source.video_id, source.url)
        self.ledger.set_video_id(source.url, distinct)
        logger.warning(
            f"{source.url}: video id {source.video_id} is already {owner}'s; this source is "
            f"{distinct} (clip file {clip_file_path(self.clip_dir, distinct).name})"
        )
        return distinct

    def plan(self, source: Source) -> Planned | Settled:
        row = self.ledger.add_url(source.url, source.video_id, source.list_path)
        if row.state == UrlState.FAILED and not row.retryable and not self.retry_failed:
            error = f"failed earlier, not retried ({row.error}); use --retry-failed"
            return Settled(UrlState.FAILED, error, [], recorded=True)
        video_id = self.video_id(source, row)
        clip_path = clip_file_path(self.clip_dir, video_id)
        try:
            clip_file = read_clip_file(clip_path, self.clip_dir)
        except FileNotFoundError:
            return Settled(UrlState.SKIPPED, f"no clip file {clip_path}", [])
        except (OSError, UnicodeDecodeError) as exc:
            # Read again by the next run: nothing was fetched, and the user may fix the file.
            return Settled(UrlState.FAILED, f"cannot read clip file {clip_path}: {exc}", [], retryable=True)
        if not clip_file.clips:
            reason = f"clip file {clip_path} has no valid clip line"
            return Settled(
                UrlState.SKIPPED, reason, clip_file.problems, rejected_lines=clip_file.rejected_lines
            )
        made, impossible = finished_clips(self.ledger, video_id)
        missing = [clip for clip in clip_file.clips if clip not in made and clip not in impossible]
        if not missing:
            return Settled(UrlState.DONE, None, clip_file.problems, rejected_lines=clip_file.rejected_lines)
        if made or impossible:
            past = f", {len(impossible)} past the end of the source" if impossible else ""
            logger.info(f"{video_id}: {len(made)} clip(s) already made{past}, {len(missing)} to make")
        if row.state == "failed":
            if self.retry_failed and not row.retryable:
                self.ledger.reset_attempts(source.url)
            self.ledger.reset_crashes(source.url)
        self.ledger.set_pending(source.url)
        task = Task(
            url=source.url,
            video_id=video_id,
            clips=tuple((c.start_frame, c.end_frame) for c in missing),
            local=source.is_local,
        )
        return Planned(task, clip_file.problems, clip_file.rejected_lines)


def finished_clips(ledger: LedgerReader, video_id: str) -> tuple[set[Clip], set[Clip]]:
    """Clips made (and still on disk), and clips that can never be made (past the source's end).
    A clip that failed for any other reason is neither: it is made again."""
    made: set[Clip] = set()
    impossible: set[Clip] = set()
    for row in ledger.clips(video_id):
        clip = Clip(row.start_frame, row.end_frame)
        if row.state == "failed" and row.permanent:
            impossible.add(clip)
        elif row.state == "done" and row.path and Path(row.path).is_file():
            made.add(clip)
    return made, impossible
