"""The SQLite ledger: every URL's state and every clip written. Only the supervisor writes it."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS urls (
    url TEXT PRIMARY KEY,
    video_id TEXT NOT NULL,
    list_path TEXT,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'done', 'skipped', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    crashes INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    retryable INTEGER NOT NULL DEFAULT 0,
    worker INTEGER,
    stage TEXT,
    added_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    download_seconds REAL,
    process_seconds REAL
);
CREATE INDEX IF NOT EXISTS urls_state ON urls(state);
CREATE TABLE IF NOT EXISTS clips (
    video_id TEXT NOT NULL,
    start_frame INTEGER NOT NULL,
    end_frame INTEGER NOT NULL,
    url TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('done', 'failed')),
    path TEXT,
    frames INTEGER,
    bytes INTEGER,
    error TEXT,
    finished_at REAL NOT NULL,
    PRIMARY KEY (video_id, start_frame, end_frame)
);
CREATE TABLE IF NOT EXISTS rejected_lines (
    list_path TEXT NOT NULL,
    line INTEGER NOT NULL,
    text TEXT NOT NULL,
    reason TEXT NOT NULL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (list_path, line)
);
"""

URL_STATES = ("pending", "running", "done", "skipped", "failed")

# Columns added after the first release, so ledgers made before them gain them on open. A column is
# only ever added (SQLite's ADD COLUMN is cheap and keeps old rows, with NULL in the new column).
ADDED_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "urls": [
        ("source_codec", "TEXT"),
        ("source_width", "INTEGER"),
        ("source_height", "INTEGER"),
        ("source_fps", "REAL"),
        ("node", "TEXT"),
    ],
    "clips": [("sha256", "TEXT"), ("width", "INTEGER"), ("height", "INTEGER"), ("fps", "REAL")],
}


@dataclass(frozen=True)
class UrlRow:
    url: str
    video_id: str
    state: str
    crashes: int
    error: str | None
    retryable: bool


@dataclass(frozen=True)
class ClipRow:
    video_id: str
    start_frame: int
    end_frame: int
    state: str
    path: str | None
    frames: int | None
    bytes: int | None
    error: str | None


@dataclass(frozen=True)
class SourceMeta:
    codec: str
    width: int
    height: int
    fps: float | None


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


class Ledger:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL with NORMAL loses at most the last commits on power loss, never consistency;
            # a lost 'clip done' row only means that clip is made again.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._add_columns()
        self._db.row_factory = sqlite3.Row

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})").fetchall()}

    def _add_columns(self) -> None:
        with self._tx() as db:
            for table, columns in ADDED_COLUMNS.items():
                have = self._columns(table)
                for name, kind in columns:
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._db:
            yield self._db

    # --- URLs -------------------------------------------------------------------------------

    def add_url(self, url: str, video_id: str, list_path: str | None) -> UrlRow:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO urls (url, video_id, list_path, added_at) VALUES (?, ?, ?, ?)",
                (url, video_id, list_path, time.time()),
            )
        row = self.url(url)
        assert row is not None
        return row

    def url(self, url: str) -> UrlRow | None:
        row = self._db.execute("SELECT * FROM urls WHERE url = ?", (url,)).fetchone()
        if row is None:
            return None
        return UrlRow(
            url=row["url"],
            video_id=row["video_id"],
            state=row["state"],
            crashes=row["crashes"],
            error=row["error"],
            retryable=bool(row["retryable"]),
        )

    def set_pending(self, url: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE urls SET state='pending', worker=NULL, stage=NULL WHERE url = ?",
                (url,),
            )

    def mark_running(self, url: str, worker: int, node: str = "") -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE urls SET state='running', worker=?, node=?, stage='queued', attempts=attempts+1,"
                " started_at=?, error=NULL WHERE url = ?",
                (worker, node or None, time.time(), url),
            )

    def set_phase(self, url: str, phase: str) -> None:
        """What the URL's worker is doing (download, process); stored in the column `stage`."""
        with self._tx() as db:
            db.execute("UPDATE urls SET stage=? WHERE url = ?", (phase, url))

    def finish(
        self,
        url: str,
        state: str,
        error: str | None = None,
        retryable: bool = False,
        download_seconds: float | None = None,
        process_seconds: float | None = None,
    ) -> None:
        assert state in ("done", "skipped", "failed")
        with self._tx() as db:
            db.execute(
                "UPDATE urls SET state=?, error=?, retryable=?, worker=NULL, stage=NULL, finished_at=?,"
                " download_seconds=COALESCE(?, download_seconds),"
                " process_seconds=COALESCE(?, process_seconds) WHERE url = ?",
                (state, error, int(retryable), time.time(), download_seconds, process_seconds, url),
            )

    def record_crash(self, url: str) -> int:
        with self._tx() as db:
            db.execute("UPDATE urls SET crashes=crashes+1 WHERE url = ?", (url,))
        row = self.url(url)
        return row.crashes if row else 0

    def reset_crashes(self, url: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE urls SET crashes=0 WHERE url = ?", (url,))

    def recover_interrupted(self) -> int:
        """URLs left 'running' by a run that was killed go back to pending."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE urls SET state='pending', worker=NULL, stage=NULL WHERE state='running'"
            )
        return cursor.rowcount

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(URL_STATES, 0)
        for state, count in self._db.execute("SELECT state, COUNT(*) FROM urls GROUP BY state").fetchall():
            counts[state] = count
        return counts

    # --- rejected URL-list lines --------------------------------------------------------------

    def set_rejected_lines(self, list_path: str, lines: list[tuple[int, str, str]]) -> None:
        """The rejected (line, text, reason)s of the list as last read; earlier readings are dropped."""
        now = time.time()
        with self._tx() as db:
            db.execute("DELETE FROM rejected_lines WHERE list_path = ?", (list_path,))
            db.executemany(
                "INSERT OR REPLACE INTO rejected_lines (list_path, line, text, reason, seen_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(list_path, line, text, reason, now) for line, text, reason in lines],
            )

    def rejected_line_count(self) -> int:
        if not self._columns("rejected_lines"):
            return 0  # a ledger from before rejected lines were kept, opened read-only
        return int(self._db.execute("SELECT COUNT(*) FROM rejected_lines").fetchone()[0])

    def set_source(self, url: str, source: SourceMeta) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE urls SET source_codec=?, source_width=?, source_height=?, source_fps=? WHERE url = ?",
                (source.codec, source.width, source.height, source.fps, url),
            )

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

    # --- clips ------------------------------------------------------------------------------

    def record_clip(
        self,
        video_id: str,
        url: str,
        start_frame: int,
        end_frame: int,
        state: str,
        path: str | None = None,
        frames: int | None = None,
        size: int | None = None,
        error: str | None = None,
        sha256: str | None = None,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO clips (video_id, start_frame, end_frame, url, state, path, frames,"
                " bytes, error, finished_at, sha256, width, height, fps)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    video_id,
                    start_frame,
                    end_frame,
                    url,
                    state,
                    path,
                    frames,
                    size,
                    error,
                    time.time(),
                    sha256,
                    width,
                    height,
                    fps,
                ),
            )

    def clips(self, video_id: str) -> list[ClipRow]:
        rows = self._db.execute(
            "SELECT * FROM clips WHERE video_id = ? ORDER BY start_frame, end_frame", (video_id,)
        ).fetchall()
        return [
            ClipRow(
                video_id=r["video_id"],
                start_frame=r["start_frame"],
                end_frame=r["end_frame"],
                state=r["state"],
                path=r["path"],
                frames=r["frames"],
                bytes=r["bytes"],
                error=r["error"],
            )
            for r in rows
        ]
