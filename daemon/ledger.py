"""The SQLite ledger: every URL's state and every clip written. Only the supervisor writes it."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from daemon import partfile

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
CREATE TABLE IF NOT EXISTS conditions (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    next_try REAL,
    waiting INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, key)
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


class UrlState(StrEnum):
    """Where a URL stands in the ledger (its `state` column)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


ENDED_STATES = (UrlState.DONE, UrlState.SKIPPED, UrlState.FAILED)

# Columns added after the first release, so ledgers made before them gain them on open. A column is
# only ever added (SQLite's ADD COLUMN is cheap and keeps old rows, with NULL in the new column).
ADDED_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "urls": [
        ("source_codec", "TEXT"),
        ("source_width", "INTEGER"),
        ("source_height", "INTEGER"),
        ("source_fps", "REAL"),
        ("node", "TEXT"),
        # Tries that failed for a passing reason since the URL was last done, over every run: its
        # retry budget (run.url_attempts). `attempts` counts every try, the successful ones too.
        ("failed_tries", "INTEGER NOT NULL DEFAULT 0"),
    ],
    "clips": [
        ("sha256", "TEXT"),
        ("width", "INTEGER"),
        ("height", "INTEGER"),
        ("fps", "REAL"),
        # 1: the clip can never be made (it runs past the end of its source); 0: it failed for a
        # passing reason and is made again. NULL in ledgers from before: see `_PERMANENT_CLIP`.
        ("permanent", "INTEGER"),
    ],
}

# A failed clip row without the `permanent` column's answer: only "past the end" was permanent.
_PERMANENT_CLIP = "(permanent = 1 OR (permanent IS NULL AND error LIKE '%runs past the end%'))"


class LedgerError(Exception):
    """The ledger cannot be read or written (its disk is full, say): the run cannot go on safely.
    The message names the ledger's file and what SQLite said."""


@dataclass(frozen=True)
class UrlRow:
    url: str
    video_id: str
    state: str
    crashes: int
    attempts: int  # every try, over every run
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
    permanent: bool  # a failed clip that can never be made; False for one made again


@dataclass(frozen=True)
class SourceMeta:
    codec: str
    width: int
    height: int
    fps: float | None


class LedgerReader:
    """What both the supervisor's ledger and a read-only view read: a URL's row, a video's clips."""

    path: Path
    _db: sqlite3.Connection

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})").fetchall()}

    def close(self) -> None:
        self._db.close()

    def url(self, url: str) -> UrlRow | None:
        row = self._db.execute("SELECT * FROM urls WHERE url = ?", (url,)).fetchone()
        if row is None:
            return None
        return UrlRow(
            url=row["url"],
            video_id=row["video_id"],
            state=row["state"],
            crashes=row["crashes"],
            attempts=row["attempts"],
            error=row["error"],
            retryable=bool(row["retryable"]),
        )

    def url_with_video_id(self, video_id: str, other_than: str) -> str | None:
        """Another URL that already holds `video_id`, if one does."""
        row = self._db.execute(
            "SELECT url FROM urls WHERE video_id = ? AND url != ? ORDER BY added_at LIMIT 1",
            (video_id, other_than),
        ).fetchone()
        return None if row is None else str(row[0])

    def clips(self, video_id: str) -> list[ClipRow]:
        rows = self._db.execute(
            f"SELECT *, {_PERMANENT_CLIP} AS is_permanent FROM clips WHERE video_id = ?"
            " ORDER BY start_frame, end_frame",
            (video_id,),
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
                permanent=r["state"] == "failed" and bool(r["is_permanent"]),
            )
            for r in rows
        ]


class Ledger(LedgerReader):
    """The supervisor's ledger, the only writer: opened (and created, whole) read-write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                _create(path)
            self._db = sqlite3.connect(path, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL with NORMAL loses at most the last commits on power loss, never consistency;
            # a lost 'clip done' row only means that clip is made again.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._add_columns()
        except (sqlite3.Error, OSError) as exc:
            raise self._error(exc) from exc
        self._db.row_factory = sqlite3.Row

    def _error(self, exc: BaseException) -> LedgerError:
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return LedgerError(f"ledger {self.path} cannot be written: {what} (state folder {self.path.parent})")

    def _add_columns(self) -> None:
        with self._tx() as db:
            for table, columns in ADDED_COLUMNS.items():
                have = self._columns(table)
                for name, kind in columns:
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction; any SQLite failure (a full disk, an I/O error) is a LedgerError."""
        try:
            with self._db:
                yield self._db
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

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

    def added_before(self, url: str, other: str) -> bool:
        """Whether `url` was first seen before `other` (the earlier one keeps a shared id)."""
        row = self._db.execute(
            "SELECT (SELECT added_at FROM urls WHERE url = ?) < (SELECT added_at FROM urls WHERE url = ?)",
            (url, other),
        ).fetchone()
        return bool(row[0])

    def set_video_id(self, url: str, video_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE urls SET video_id=? WHERE url = ?", (video_id, url))

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
            if state == "done":
                db.execute("UPDATE urls SET failed_tries=0 WHERE url = ?", (url,))
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

    def charge_failed_try(self, url: str, error: str) -> int:
        """A try of `url` failed for a passing reason: returns its failed tries, over every run,
        since it was last done. A try a condition ended (a full disk, a blocked site) is not
        charged, and a try that ends done starts the count again."""
        with self._tx() as db:
            db.execute("UPDATE urls SET failed_tries=failed_tries+1, error=? WHERE url = ?", (error, url))
        row = self._db.execute("SELECT failed_tries FROM urls WHERE url = ?", (url,)).fetchone()
        return int(row[0]) if row else 0

    def reset_attempts(self, url: str) -> None:
        """--retry-failed: a URL given up on starts its budget again."""
        with self._tx() as db:
            db.execute("UPDATE urls SET failed_tries=0, crashes=0 WHERE url = ?", (url,))

    def recover_interrupted(self) -> int:
        """URLs left 'running' by a run that was killed go back to pending."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE urls SET state='pending', worker=NULL, stage=NULL WHERE state='running'"
            )
            # What an earlier run waited for is looked at afresh by this one.
            db.execute("DELETE FROM conditions")
        return cursor.rowcount

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

    # --- conditions: what the run waits for (a full disk, a blocked site) -------------------

    def set_condition(
        self, scope: str, key: str, reason: str, next_try: float | None = None, waiting: int = 0
    ) -> None:
        """Says (for `status`) that work needing `key` waits; `next_try` in Unix time."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO conditions (scope, key, reason, since, next_try, waiting)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (scope, key) DO UPDATE SET reason=excluded.reason, next_try=excluded.next_try,"
                " waiting=excluded.waiting",
                (scope, key, reason, time.time(), next_try, waiting),
            )

    def clear_condition(self, scope: str, key: str | None = None) -> None:
        with self._tx() as db:
            if key is None:
                db.execute("DELETE FROM conditions WHERE scope = ?", (scope,))
            else:
                db.execute("DELETE FROM conditions WHERE scope = ? AND key = ?", (scope, key))

    def set_source(self, url: str, source: SourceMeta) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE urls SET source_codec=?, source_width=?, source_height=?, source_fps=? WHERE url = ?",
                (source.codec, source.width, source.height, source.fps, url),
            )

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
        permanent: bool = False,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO clips (video_id, start_frame, end_frame, url, state, path, frames,"
                " bytes, error, finished_at, sha256, width, height, fps, permanent)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    int(permanent),
                ),
            )


def _create(path: Path) -> None:
    """A new ledger appears whole or not at all: its tables are made in a part file that is
    published under its name, so a disk that fills during creation leaves no ledger without tables."""
    with partfile.writing(path) as part:
        db = sqlite3.connect(part)
        try:
            db.executescript(SCHEMA)
            db.commit()
        finally:
            db.close()
