"""`serve`: a long-running supervisor fed by URL lists dropped into an inbox folder.

A list is claimed by renaming it into `claimed/`, so it is queued once; when every URL of it has
ended it moves to `done/` (or `failed/` when any URL failed or a line was rejected) beside a short
report. Lists still in `claimed/` at start-up are resumed, so a stop or a crash loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import stat
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loguru import logger
from watchdog.events import (
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from daemon import partfile
from daemon.config import Settings
from daemon.events import ClipEnded, Event, FleetSnapshot, UrlEnded
from daemon.folders import STATUS_FILE, RunPaths
from daemon.locking import FolderLocks, try_exclusive_lock
from daemon.signals import install_signal_handlers
from daemon.supervisor import Supervisor
from daemon.urls import parse_url_list

CLAIMED, DONE, FAILED = "claimed", "done", "failed"
REPORT_SUFFIX = ".report.txt"
# Editor swap and backup files, partial downloads and hidden files are never lists.
_IGNORED_PREFIXES = (".", "#")
_IGNORED_SUFFIXES = ("~", ".swp", ".swo", ".swx", ".tmp", ".part", ".crdownload", ".kate-swp", ".bak")
# A file some process keeps open (a reader that never closes) is still taken after this much calm.
OPEN_FALLBACK_FACTOR = 10
IDLE_WAIT_SECONDS = 60.0
BUSY_WAIT_SECONDS = 0.5


class InboxError(Exception):
    pass


def is_list_name(name: str) -> bool:
    return not name.startswith(_IGNORED_PREFIXES) and not name.endswith(_IGNORED_SUFFIXES)


def _unique(folder: Path, name: str) -> Path:
    """`folder/name`, or `folder/stem.2.ext` and so on when a list of that name was there before."""
    target = folder / name
    stem, dot, ext = name.partition(".")
    number = 2
    while target.exists() or (folder / (target.name + REPORT_SUFFIX)).exists():
        target = folder / f"{stem}.{number}{dot}{ext}"
        number += 1
    return target


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Candidate:
    size: int = -1
    mtime_ns: int = -1
    calm_since: float = 0.0  # monotonic time of the last change seen
    open_count: int = 0  # writers (or readers) that opened it and have not closed it yet


class _EventRelay(FileSystemEventHandler):
    """Runs on watchdog's thread: hands file names to the main loop and wakes it."""

    def __init__(self, inbox: Path, events: queue.SimpleQueue[tuple[str, str]], wake_fd: int) -> None:
        self.inbox = inbox
        self.events = events
        self.wake_fd = wake_fd

    def _put(self, kind: str, path: str | bytes) -> None:
        where = Path(os.fsdecode(path))
        if where.parent == self.inbox and is_list_name(where.name):
            self.events.put((kind, where.name))

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileOpenedEvent):
            self._put("opened", event.src_path)
        elif isinstance(event, (FileClosedEvent, FileClosedNoWriteEvent)):
            self._put("closed", event.src_path)
        elif isinstance(event, FileDeletedEvent):
            self._put("gone", event.src_path)
        elif isinstance(event, FileMovedEvent):
            self._put("gone", event.src_path)
            self._put("changed", event.dest_path)
        else:
            self._put("changed", event.src_path)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_fd, b"i")


class Inbox:
    """The folder lists are dropped into; decides when a dropped file is complete and claims it."""

    def __init__(self, folder: Path, settle_seconds: float, wake_fd: int) -> None:
        self.folder = folder
        self.claimed = folder / CLAIMED
        self.settle_seconds = settle_seconds
        self.wake_fd = wake_fd
        self.candidates: dict[str, _Candidate] = {}
        self.events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._observer: Any = None
        self._lock: Any = None

    def open(self) -> None:
        for sub in (CLAIMED, DONE, FAILED):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        lock_path = self.claimed / ".lock"
        self._lock = try_exclusive_lock(lock_path)
        if self._lock is None:
            raise InboxError(f"another service already watches the inbox {self.folder} (lock {lock_path})")
        # Watch first, then list: a file dropped in between is seen by one or the other, or both.
        self._observer = Observer()
        self._observer.schedule(_EventRelay(self.folder, self.events, self.wake_fd), str(self.folder))
        self._observer.daemon = True
        self._observer.start()
        self.rescan()

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._lock is not None:
            self._lock.close()

    def rescan(self) -> None:
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if is_list_name(entry.name) and entry.is_file(follow_symlinks=False):
                    self.candidates.setdefault(entry.name, _Candidate(calm_since=time.monotonic()))

    def claimed_lists(self) -> list[Path]:
        """Lists claimed by an earlier run that did not finish them, oldest claim first."""
        found = [p for p in self.claimed.iterdir() if is_list_name(p.name) and p.is_file()]
        return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def _drain_events(self, now: float) -> None:
        while True:
            try:
                kind, name = self.events.get_nowait()
            except queue.Empty:
                return
            if kind == "gone":
                self.candidates.pop(name, None)
                continue
            candidate = self.candidates.setdefault(name, _Candidate(calm_since=now))
            if kind == "opened":
                candidate.open_count += 1
            elif kind == "closed":
                candidate.open_count = max(0, candidate.open_count - 1)
            candidate.calm_since = now

    def ready(self) -> list[str]:
        """Names of files that are complete: unchanged for the settle period and not open."""
        now = time.monotonic()
        self._drain_events(now)
        names = []
        for name, candidate in list(self.candidates.items()):
            try:
                info = os.lstat(self.folder / name)
            except FileNotFoundError:
                del self.candidates[name]
                continue
            if not stat.S_ISREG(info.st_mode):
                del self.candidates[name]
                continue
            if (info.st_size, info.st_mtime_ns) != (candidate.size, candidate.mtime_ns):
                candidate.size, candidate.mtime_ns, candidate.calm_since = info.st_size, info.st_mtime_ns, now
            calm = now - candidate.calm_since
            if calm < self.settle_seconds:
                continue
            if candidate.open_count and calm < max(self.settle_seconds * OPEN_FALLBACK_FACTOR, 60.0):
                continue
            names.append(name)
        return sorted(names)

    def seconds_to_next_check(self) -> float | None:
        """How long until a file still settling could become ready; None when none is settling."""
        if not self.candidates:
            return None
        now = time.monotonic()
        soonest = min(c.calm_since for c in self.candidates.values()) + self.settle_seconds
        # At least a little: an open file is checked again every settle period, not in a tight loop.
        return max(soonest - now, min(self.settle_seconds, 1.0), 0.05)

    def claim(self, name: str) -> Path | None:
        """Move a ready list into claimed/ (one atomic rename); None when it vanished meanwhile."""
        self.candidates.pop(name, None)
        target = _unique(self.claimed, name)
        try:
            os.rename(self.folder / name, target)
        except FileNotFoundError:
            return None
        return target


@dataclass
class ListRun:
    path: Path  # in claimed/
    urls: list[str] = field(default_factory=list)
    outcomes: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    clip_errors: dict[str, list[str]] = field(default_factory=dict)  # url -> "start end: error" per clip
    claimed_at: str = field(default_factory=_now_text)

    @property
    def finished(self) -> bool:
        return len(self.outcomes) == len(self.urls)

    @property
    def failed(self) -> bool:
        return (
            bool(self.problems)
            or bool(self.clip_errors)
            or any(state == "failed" for state, _ in self.outcomes.values())
        )

    def state_of(self, url: str) -> str:
        """done, skipped or failed as the ledger has it; `partial` for a URL done with failed clips."""
        state = self.outcomes[url][0]
        return "partial" if state == "done" and self.clip_errors.get(url) else state

    def report(self) -> str:
        counts = {state: 0 for state in ("done", "partial", "skipped", "failed")}
        for url in self.urls:
            counts[self.state_of(url)] += 1
        clip_errors = sum(len(errors) for errors in self.clip_errors.values())
        lines = [
            f"list: {self.path.name}",
            f"claimed: {self.claimed_at}",
            f"finished: {_now_text()}",
            f"result: {'failed' if self.failed else 'done'}: {len(self.urls)} URL(s): "
            + ", ".join(f"{count} {state}" for state, count in counts.items())
            + f"; {clip_errors} clip error(s)",
        ]
        lines += [f"rejected line: {problem}" for problem in self.problems]
        for url in self.urls:
            _, error = self.outcomes[url]
            lines.append(f"{self.state_of(url)}\t{url}" + (f"\t{error}" if error else ""))
            lines += [f"clip error\t{url}\t{clip}" for clip in self.clip_errors.get(url, [])]
        return "\n".join(lines) + "\n"


class Notifier:
    """sd_notify: READY=1 once started, STATUS= lines as things change, STOPPING=1 on the way out."""

    def __init__(self) -> None:
        self._last_status = ""
        self._notifier: Any = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()
            if self._notifier.socket is not None:
                # A listener that stops reading must not stall the service; a lost STATUS= is harmless.
                self._notifier.socket.setblocking(False)

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")


class Service:
    def __init__(
        self,
        settings: Settings,
        paths: RunPaths,
        inbox: Path,
        metrics_address: str = "",
        lock: FolderLocks | None = None,
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.inbox_dir = inbox
        self.supervisor = Supervisor(settings, paths, on_event=self._on_event, lock=lock)
        self.supervisor.give_up_on_blocks = False  # a service waits out a site's block, however long
        self.notifier = Notifier()
        self.lists: dict[Path, ListRun] = {}
        self.lists_by_url: dict[str, list[ListRun]] = {}
        self.metrics: Any = None
        self._metrics_address = metrics_address
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.inbox = Inbox(inbox, settings.service.settle_seconds, self._wake_w)
        self._status_path = paths.state_dir / STATUS_FILE
        self._status_written = ""

    # --- events -------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if self.metrics is not None:
            self.metrics.on_event(event)
        match event:
            case UrlEnded() if event.final:
                for run in self.lists_by_url.get(event.url, []):
                    run.outcomes[event.url] = (event.state.value, event.error)
            case ClipEnded(error=str(error)):
                clip = f"{event.start_frame} {event.end_frame}: {error}"
                for run in self.lists_by_url.get(event.url, []):
                    run.clip_errors.setdefault(event.url, []).append(clip)

    # --- lists --------------------------------------------------------------------------------

    def _queue_list(self, path: Path, resumed: bool) -> None:
        run = ListRun(path=path)
        self.lists[path] = run
        try:
            # Bytes: each line is decoded on its own, so a stray byte costs its line, not the list.
            text = path.read_bytes()
        except OSError as exc:
            run.problems.append(f"{path.name}: cannot read the list: {exc}")
            logger.error(run.problems[-1])
            return
        # Relative local paths in a list mean relative to the folder it was dropped into.
        url_list = parse_url_list(self.inbox_dir / path.name, text)
        run.problems = url_list.problems
        for problem in url_list.problems:
            logger.warning(problem)
        self.supervisor.reject_lines(str(self.inbox_dir / path.name), url_list.rejected)
        run.urls = [source.url for source in url_list.sources]
        for url in run.urls:
            self.lists_by_url.setdefault(url, []).append(run)
        how = "resuming" if resumed else "claimed"
        logger.info(f"{how} list {path.name}: {len(run.urls)} URL(s)")
        for source in url_list.sources:
            self.supervisor.submit(source)

    def _finish_lists(self) -> None:
        for path, run in list(self.lists.items()):
            if not run.finished:
                continue
            folder = self.inbox_dir / (FAILED if run.failed else DONE)
            target = _unique(folder, path.name)
            # Report first: a crash between the two leaves the list in claimed/, to be redone.
            partfile.write_text(target.with_name(target.name + REPORT_SUFFIX), run.report())
            os.rename(path, target)
            del self.lists[path]
            for url in run.urls:
                runs = self.lists_by_url.get(url, [])
                if run in runs:
                    runs.remove(run)
                if not runs:
                    self.lists_by_url.pop(url, None)
            logger.info(f"list {path.name} ended: moved to {folder.name}/{target.name}")

    # --- status -------------------------------------------------------------------------------

    def _status_text(self, fleet: FleetSnapshot) -> str:
        if fleet.draining:
            return "stopping: finishing in-flight clips" if not fleet.urgent else "stopping now"
        ended = fleet.ended
        # Since this service started; the ledger's counts (`status`'s URLs: line) are over all time.
        text = (
            f"{len(self.lists)} list(s) open; {fleet.queued} URL(s) queued, {fleet.running} running; "
            f"since start: done {ended['done']}, failed {ended['failed']}, skipped {ended['skipped']}, "
            f"clip errors {fleet.clip_errors}"
        )
        if fleet.sites_paused:
            text = f"paused sites (they block us): {', '.join(fleet.sites_paused)}; {text}"
        if fleet.disk_paused:
            text = f"downloads paused: {fleet.disk_paused}; {text}"
        return text

    def _publish_status(self) -> None:
        fleet = self.supervisor.snapshot()
        text = self._status_text(fleet)
        self.notifier.status(text)
        if text == self._status_written:
            return
        self._status_written = text
        document = {
            "pid": os.getpid(),
            "inbox": str(self.inbox_dir),
            "status": text,
            "paused": fleet.disk_paused,
            "open_lists": sorted(p.name for p in self.lists),
            "updated_at": time.time(),
        }
        with contextlib.suppress(OSError):
            # Rewritten whenever the service's state changes: atomic, but not fsynced each time.
            partfile.write_text(self._status_path, json.dumps(document, indent=1) + "\n", durable=False)

    # --- the loop -----------------------------------------------------------------------------

    def _wait_seconds(self, rescan_due: float) -> float:
        supervisor = self.supervisor
        if supervisor.busy or supervisor.draining:
            return BUSY_WAIT_SECONDS
        wait = min(IDLE_WAIT_SECONDS, max(0.05, rescan_due - time.monotonic()))
        settling = self.inbox.seconds_to_next_check()
        return wait if settling is None else min(wait, settling)

    def _drain_wake_pipe(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def run(self) -> None:
        supervisor = self.supervisor
        supervisor.open()
        previous_wakeup = -1
        try:
            install_signal_handlers(supervisor)
            # A signal writes to the pipe, which ends the supervisor's wait at once.
            previous_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            supervisor.wake_fds.append(self._wake_r)
            if self._metrics_address:
                from daemon.metrics import Metrics

                self.metrics = Metrics(self._metrics_address)
                logger.info(f"metrics on http://{self._metrics_address}/metrics")
            self.inbox.open()
            for path in self.inbox.claimed_lists():
                self._queue_list(path, resumed=True)
            logger.info(f"watching {self.inbox_dir} for URL lists")
            self.notifier.send("READY=1", f"STATUS=watching {self.inbox_dir}")
            self._loop()
        finally:
            self.notifier.send("STOPPING=1")
            self.inbox.close()
            supervisor.close()
            signal.set_wakeup_fd(previous_wakeup)
            with contextlib.suppress(OSError):
                self._status_path.unlink()
            partfile.part_path(self._status_path).unlink(missing_ok=True)  # a write cut short
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            if self.metrics is not None:
                self.metrics.close()
        left = sorted(p.name for p in self.lists)
        if left:
            logger.info(f"stopped; lists resumed at the next start: {', '.join(left)}")
        else:
            logger.info("stopped")

    def _loop(self) -> None:
        supervisor = self.supervisor
        rescan_due = time.monotonic() + self.settings.service.rescan_seconds
        stopping_announced = False
        while True:
            self._drain_wake_pipe()
            if supervisor.draining:
                if not stopping_announced:
                    stopping_announced = True
                    self.notifier.send("STOPPING=1")
                if not supervisor.fleet:
                    break
            else:
                if time.monotonic() >= rescan_due:
                    self.inbox.rescan()
                    rescan_due = time.monotonic() + self.settings.service.rescan_seconds
                for name in self.inbox.ready():
                    claimed = self.inbox.claim(name)
                    if claimed is not None:
                        self._queue_list(claimed, resumed=False)
            self._finish_lists()
            if self.metrics is not None:
                self.metrics.observe(supervisor.snapshot())
            self._publish_status()
            supervisor.step(self._wait_seconds(rescan_due))
        self._finish_lists()
