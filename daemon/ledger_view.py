"""A read-only view of a run's ledger: what `status`, `manifest` and `--dry-run` report.

Opened read-only, so it works while a run or the service is writing; the supervisor's own
`Ledger` is the only writer.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from daemon.ledger import ADDED_COLUMNS, LedgerReader, UrlState


@dataclass(frozen=True)
class Condition:
    """Something larger than one URL that work waits for: a full disk, a site that blocks us."""

    scope: str  # "disk" or "site"
    key: str  # the folder, or the site
    reason: str
    since: float  # Unix time
    next_try: float | None  # Unix time of the next look or probe, where known
    waiting: int  # URLs held back by it


@dataclass(frozen=True)
class RunningUrl:
    worker: int
    url: str
    video_id: str
    phase: str | None  # queued, download or process
    started_at: float | None  # Unix time
    node: str | None  # the machine the worker runs on


@dataclass(frozen=True)
class ClipTotals:
    written: int
    failed: int
    frames: int  # of the clips written
    bytes: int


@dataclass(frozen=True)
class WrittenClip:
    """A clip written, with what is known of its source: one row of the dataset's manifest."""

    video_id: str
    url: str
    start_frame: int
    end_frame: int
    path: str
    frames: int | None
    fps: float | None
    width: int | None
    height: int | None
    bytes: int | None
    sha256: str | None
    source_codec: str | None
    source_width: int | None
    source_height: int | None
    source_fps: float | None
    made_at: float  # Unix time the clip was finished


class LedgerView(LedgerReader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        self._db.row_factory = sqlite3.Row

    def conditions(self) -> list[Condition]:
        if not self._columns("conditions"):
            return []  # a ledger from before conditions were kept, opened read-only
        rows = self._db.execute(
            "SELECT scope, key, reason, since, next_try, waiting FROM conditions ORDER BY since"
        ).fetchall()
        return [Condition(*row) for row in rows]

    def written_clips(self) -> list[WrittenClip]:
        """Every clip recorded as written, by video and frame; read-only ledgers from before the
        newer columns existed give None there."""
        clip_cols, url_cols = self._columns("clips"), self._columns("urls")

        def column(table: str, name: str, have: set[str]) -> str:
            return f"{table}.{name}" if name in have else f"NULL AS {name}"

        added = [column("c", name, clip_cols) for name, _ in ADDED_COLUMNS["clips"]]
        added += [column("u", name, url_cols) for name, _ in ADDED_COLUMNS["urls"]]
        rows = self._db.execute(
            "SELECT c.video_id, c.url, c.start_frame, c.end_frame, c.path, c.frames, c.bytes,"
            f" c.finished_at, {', '.join(added)}"
            " FROM clips AS c LEFT JOIN urls AS u ON u.url = c.url"
            " WHERE c.state = 'done' AND c.path IS NOT NULL"
            " ORDER BY c.video_id, c.start_frame, c.end_frame"
        ).fetchall()
        return [
            WrittenClip(
                video_id=r["video_id"],
                url=r["url"],
                start_frame=r["start_frame"],
                end_frame=r["end_frame"],
                path=r["path"],
                frames=r["frames"],
                fps=r["fps"],
                width=r["width"],
                height=r["height"],
                bytes=r["bytes"],
                sha256=r["sha256"],
                source_codec=r["source_codec"],
                source_width=r["source_width"],
                source_height=r["source_height"],
                source_fps=r["source_fps"],
                made_at=r["finished_at"],
            )
            for r in rows
        ]

    # --- what `status` reports ---------------------------------------------------------------

    def running(self) -> list[RunningUrl]:
        """URLs a worker holds now, by worker."""
        # A ledger from before nodes were recorded, opened read-only, has no column to read.
        node = "node" if "node" in self._columns("urls") else "NULL AS node"
        rows = self._db.execute(
            f"SELECT worker, url, video_id, stage, started_at, {node} FROM urls"
            " WHERE state = 'running' ORDER BY worker"
        )
        return [
            RunningUrl(r["worker"], r["url"], r["video_id"], r["stage"], r["started_at"], r["node"])
            for r in rows
        ]

    def urls_ended_since(self, since: float) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM urls WHERE state IN ('done', 'skipped', 'failed') AND finished_at >= ?",
            (since,),
        ).fetchone()
        return int(row[0])

    def clip_totals_since(self, since: float) -> ClipTotals:
        row = self._db.execute(
            "SELECT COALESCE(SUM(state = 'done'), 0), COALESCE(SUM(state = 'failed'), 0),"
            " COALESCE(SUM(CASE WHEN state = 'done' THEN frames END), 0),"
            " COALESCE(SUM(CASE WHEN state = 'done' THEN bytes END), 0)"
            " FROM clips WHERE finished_at >= ?",
            (since,),
        ).fetchone()
        return ClipTotals(*(int(value) for value in row))

    def recent_errors(self, limit: int) -> list[tuple[str, str, float]]:
        """(url, error, Unix time) of the latest failed URLs and clips, newest first."""
        rows = self._db.execute(
            "SELECT url, error, at FROM ("
            " SELECT url, error, finished_at AS at FROM urls WHERE state = 'failed' AND error IS NOT NULL"
            " UNION ALL"
            " SELECT url, error, finished_at AS at FROM clips WHERE state = 'failed'"
            ") ORDER BY at DESC LIMIT ?",
            (limit,),
        )
        return [(r["url"], r["error"], r["at"]) for r in rows]

    def failures(self) -> list[tuple[str, int | None, int | None, str, float]]:
        """(url, start_frame, end_frame, error, Unix time) of every failed URL (frames None) and every
        failed clip, oldest first: `status --failed`."""
        rows = self._db.execute(
            "SELECT url, start_frame, end_frame, error, at FROM ("
            " SELECT url, NULL AS start_frame, NULL AS end_frame, COALESCE(error, '') AS error,"
            "  COALESCE(finished_at, added_at) AS at FROM urls WHERE state = 'failed'"
            " UNION ALL"
            " SELECT url, start_frame, end_frame, COALESCE(error, ''), finished_at FROM clips"
            "  WHERE state = 'failed'"
            ") ORDER BY at, url, start_frame"
        )
        return [(r["url"], r["start_frame"], r["end_frame"], r["error"], r["at"]) for r in rows]

    def counts(self) -> dict[UrlState, int]:
        """URLs in each state, every state named (0 where none is)."""
        counts = dict.fromkeys(UrlState, 0)
        for state, count in self._db.execute("SELECT state, COUNT(*) FROM urls GROUP BY state").fetchall():
            counts[UrlState(state)] = count
        return counts

    def rejected_line_count(self) -> int:
        if not self._columns("rejected_lines"):
            return 0  # a ledger from before rejected lines were kept, opened read-only
        return int(self._db.execute("SELECT COUNT(*) FROM rejected_lines").fetchone()[0])

    def busy_seconds(self, since: float, now: float, running: bool) -> float:
        """The seconds of [since, now] in which work went on: from the first URL started in the
        window (or still running) to now while one runs, else to the last URL or clip that ended."""
        first, last_url = self._db.execute(
            "SELECT MIN(started_at), MAX(finished_at) FROM urls"
            " WHERE started_at IS NOT NULL AND (state = 'running' OR finished_at >= ?)",
            (since,),
        ).fetchone()
        (last_clip,) = self._db.execute(
            "SELECT MAX(finished_at) FROM clips WHERE finished_at >= ?", (since,)
        ).fetchone()
        if first is None:
            return 0.0
        end = now if running else max(value for value in (last_url, last_clip, first) if value is not None)
        return max(0.0, min(end, now) - max(first, since))
