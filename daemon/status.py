"""`status`: what the ledger says, read-only, so it works while a run or the service is writing."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.folders import LOCK_NAME, STATUS_FILE
from daemon.ledger import UrlState
from daemon.ledger_view import LedgerView
from daemon.locking import held_here


class StatusError(Exception):
    pass


@dataclass(frozen=True)
class WorkerNow:
    worker: int
    url: str
    video_id: str
    phase: str | None  # queued, download or process; "stage" in the JSON (as scripts read it)
    running_seconds: float
    node: str | None = None


@dataclass(frozen=True)
class Throughput:
    minutes: float
    urls_ended: int
    clips_written: int
    clip_errors: int
    frames: int
    bytes: int
    # Of the window, the seconds work went on: from the first URL started in it (or the window's
    # start) to its last clip written (or now, while a worker is busy). A 40 s run is not averaged
    # over the 10 minutes it did not run.
    busy_seconds: float = 0.0

    @property
    def frames_per_second(self) -> float:
        # At least a second: a clip finished a moment after its URL started is not a rate.
        return self.frames / max(self.busy_seconds, 1.0) if self.frames else 0.0


@dataclass(frozen=True)
class Failure:
    """A failed URL (start_frame None) or a failed clip of a URL, with its reason."""

    url: str
    start_frame: int | None
    end_frame: int | None
    error: str
    at: float  # Unix time

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ErrorRow:
    url: str
    error: str
    at: float  # Unix time


@dataclass(frozen=True)
class WaitingOn:
    """A condition the run waits for: a full disk, a site that blocks us."""

    scope: str  # "disk" or "site"
    key: str
    reason: str
    since: float  # Unix time
    next_try: float | None  # Unix time
    waiting: int  # URLs held back


@dataclass(frozen=True)
class Status:
    ledger: str
    counts: dict[str, int]
    rejected_lines: int  # URL-list lines that named nothing to fetch, as the lists were last read
    workers: list[WorkerNow]
    throughput: Throughput
    errors: list[ErrorRow]
    service: dict[str, Any] | None  # what a running service last published; None when none runs
    conditions: list[WaitingOn] = field(default_factory=list)  # what the run waits for now

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["throughput"]["frames_per_second"] = round(self.throughput.frames_per_second, 3)
        for worker in document["workers"]:
            worker["stage"] = worker.pop("phase")  # the ledger's column name, which scripts read
        return document


def _service_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATUS_FILE
    try:
        document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        os.kill(int(document["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no file, a stale one from a killed service, or one being replaced
    return document


def read_status(ledger_path: Path, minutes: float = 10.0, error_count: int = 5) -> Status:
    if not ledger_path.is_file():
        raise StatusError(f"no ledger at {ledger_path}; give --output-dir or --state-dir of a run")
    now = time.time()
    since = now - minutes * 60
    try:
        ledger = LedgerView(ledger_path)
        try:
            counts = ledger.counts()
            rejected = ledger.rejected_line_count()
            workers = [
                WorkerNow(r.worker, r.url, r.video_id, r.phase, now - (r.started_at or now), r.node)
                for r in ledger.running()
            ]
            ended = ledger.urls_ended_since(since)
            clips = ledger.clip_totals_since(since)
            busy = ledger.busy_seconds(since, now, bool(workers))
            errors = [ErrorRow(url, error, at) for url, error, at in ledger.recent_errors(error_count)]
            conditions = [
                WaitingOn(c.scope, c.key, c.reason, c.since, c.next_try, c.waiting)
                for c in ledger.conditions()
            ]
        finally:
            ledger.close()
    except sqlite3.Error as exc:
        raise StatusError(f"cannot read the ledger {ledger_path}: {exc}") from exc
    throughput = Throughput(minutes, ended, clips.written, clips.failed, clips.frames, clips.bytes, busy)
    return Status(
        ledger=str(ledger_path),
        counts={state.value: counts.get(state, 0) for state in UrlState},
        rejected_lines=rejected,
        workers=workers,
        throughput=throughput,
        errors=errors,
        service=_service_state(ledger_path.parent),
        # What a run that is no longer alive waited for says nothing now.
        conditions=conditions if held_here(ledger_path.parent / LOCK_NAME) else [],
    )


def read_failures(ledger_path: Path) -> list[Failure]:
    """Every failed URL and clip, oldest first, each with its reason."""
    if not ledger_path.is_file():
        raise StatusError(f"no ledger at {ledger_path}; give --output-dir or --state-dir of a run")
    try:
        ledger = LedgerView(ledger_path)
        try:
            return [Failure(*row) for row in ledger.failures()]
        finally:
            ledger.close()
    except sqlite3.Error as exc:
        raise StatusError(f"cannot read the ledger {ledger_path}: {exc}") from exc


def format_failures(failures: list[Failure]) -> str:
    urls = sum(1 for failure in failures if failure.start_frame is None)
    lines = [f"failed: {urls} URL(s), {len(failures) - urls} clip(s)"]
    for failure in failures:
        clip = "" if failure.start_frame is None else f" clip {failure.start_frame} {failure.end_frame}"
        lines.append(f"{failure.url}{clip}: {failure.error}")
    return "\n".join(lines)


def _ago(at: float) -> str:
    seconds = max(0, int(time.time() - at))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def format_status(status: Status) -> str:
    lines = [f"ledger: {status.ledger}"]
    if status.service is not None:
        lines.append(f"service: running (pid {status.service['pid']}): {status.service.get('status', '')}")
    lines.append(
        "URLs: "
        + ", ".join(f"{state} {count}" for state, count in status.counts.items())
        + f"; list lines rejected {status.rejected_lines}"
    )
    for condition in status.conditions:
        next_try = f"; next try in {_ago(2 * time.time() - condition.next_try)}" if condition.next_try else ""
        lines.append(
            f"paused ({condition.scope} {condition.key}) for {_ago(condition.since)}: {condition.reason}"
            f"{next_try}"
        )
    if status.workers:
        for worker in status.workers:
            on = f" on {worker.node}" if worker.node else ""
            lines.append(
                f"worker {worker.worker}{on}: {worker.phase or '-'} {worker.url} "
                f"({worker.video_id}, {_ago(time.time() - worker.running_seconds)})"
            )
    else:
        lines.append("workers: none busy")
    t = status.throughput
    lines.append(
        f"last {t.minutes:g} min: {t.urls_ended} URL(s) ended, {t.clips_written} clip(s) written, "
        f"{t.clip_errors} clip error(s), {t.frames} frames "
        f"({t.frames_per_second:.1f}/s over {t.busy_seconds:.0f}s busy), "
        f"{t.bytes / 1e6:.1f} MB"
    )
    if status.errors:
        lines.append("last errors:")
        for error in status.errors:
            lines.append(f"  {_ago(error.at)} ago  {error.url}: {error.error}")
    return "\n".join(lines)
