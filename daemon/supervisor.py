"""The supervisor: owns the ledger, hands URLs to workers on request, replaces workers that die."""

from __future__ import annotations

import shutil
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.clips import Clip, clip_file_path, read_clip_file
from daemon.config import Settings
from daemon.diskspace import DiskGate, Floor
from daemon.encode import remove_partial_files
from daemon.folders import LOCK_NAME, PART_SUFFIX, RunPaths
from daemon.ledger import Ledger, SourceMeta
from daemon.links import Launcher, ProcessLauncher, WorkerLink
from daemon.locking import try_exclusive_lock
from daemon.messages import (
    Assign,
    ClipFinished,
    FramesEncoded,
    FromWorker,
    Heartbeat,
    PhaseChanged,
    Ready,
    SourceProbed,
    Stop,
    Task,
    UrlFinished,
    WorkerPaths,
)
from daemon.urls import Rejected, Source

CRASH_LIMIT = 2
# Workers that die before they ever ask for work, one after another: the cause is the machine or
# the settings (a log file that cannot be opened, a broken install), and restarting cannot help.
STARTUP_DEATH_LIMIT = 3


class AlreadyRunning(Exception):
    pass


@dataclass
class Totals:
    """What this run did; the summary printed at the end."""

    urls: dict[str, int] = field(default_factory=lambda: {"done": 0, "skipped": 0, "failed": 0})
    rejected_lines: int = 0  # URL-list lines that named nothing to fetch
    clips_written: int = 0
    clips_failed: int = 0
    frames: int = 0  # of the clips written; a clip that failed part-way adds none
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def line(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        return (
            f"URLs done {self.urls['done']}, skipped {self.urls['skipped']}, failed {self.urls['failed']}; "
            f"list lines rejected {self.rejected_lines}; "
            f"clips written {self.clips_written}, clip errors {self.clips_failed}; frames {self.frames}; "
            f"{self.bytes / 1e6:.1f} MB; {self.seconds:.1f}s wall; {fps:.1f} frames/s"
        )


@dataclass
class _WorkerHandle:
    index: int
    link: WorkerLink
    task: Task | None = None
    idle: bool = False
    phase: str = "starting"  # what it is doing: starting, queued, download, process
    stop_sent: bool = False
    # Watchdog: when the worker last showed progress, and how long it said it would wait on purpose.
    last_progress: float = field(default_factory=time.monotonic)
    announced_wait: float = 0.0
    stalled: str | None = None  # why the watchdog killed it
    ready_seen: bool = False  # asked for work at least once
    node: str = ""  # the machine it runs on, as it said when ready


class Supervisor:
    """Single writer of the ledger. Feed it sources with `submit`, then drive it with `step`."""

    def __init__(
        self,
        settings: Settings,
        paths: RunPaths,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.on_event = on_event or (lambda kind, data: None)
        self.totals = Totals()
        self.queue: deque[Task] = deque()
        self._queued_urls: set[str] = set()  # the queue's URLs, for duplicate checks in constant time
        self.workers: dict[int, _WorkerHandle] = {}
        self.draining = False
        self.urgent = False
        self._drain_deadline: float | None = None
        self._lock_handle: Any = None
        self._started_at = time.monotonic()
        self.launcher: Launcher | None = None  # started by `open`
        self.ledger: Ledger | None = None
        # URL -> its final state for this run, so the summary counts each URL once.
        self.outcomes: dict[str, str] = {}
        service = settings.service
        self.disk = DiskGate(
            [
                Floor("temp", paths.temp_root, service.min_free_temp_mb),
                Floor("output", paths.output_dir, service.min_free_output_mb),
            ],
            service.disk_check_seconds,
        )
        # Extra file descriptors that end `step`'s wait early (the service's inbox and signal pipe).
        self.wake_fds: list[int] = []
        self._startup_deaths = 0
        # Set when the run cannot go on (workers keep dying at start-up): the reason, in one line.
        self.fatal: str | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        self.paths.output_dir.mkdir(parents=True, exist_ok=True)
        self.paths.state_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.paths.state_dir / LOCK_NAME
        self._lock_handle = try_exclusive_lock(lock_path)
        if self._lock_handle is None:
            raise AlreadyRunning(f"another run is already using {self.paths.state_dir} (lock {lock_path})")
        self.ledger = Ledger(self.paths.ledger)
        recovered = self.ledger.recover_interrupted()
        if recovered:
            logger.info(f"{recovered} URL(s) interrupted by an earlier run are pending again")
        removed = remove_partial_files(self.paths.output_dir)
        if removed:
            logger.info(f"removed {removed} unfinished .part file(s) left by an earlier run")
        shutil.rmtree(self.paths.temp_root, ignore_errors=True)
        self.paths.temp_root.mkdir(parents=True, exist_ok=True)
        self.launcher = start_launcher(self.settings)

    def close(self) -> None:
        self._stop_all_workers(force=True)
        if self.launcher is not None:
            self.launcher.close()
        shutil.rmtree(self.paths.temp_root, ignore_errors=True)
        if self.ledger is not None:
            self.ledger.close()
        if self._lock_handle is not None:
            self._lock_handle.close()

    # --- planning -----------------------------------------------------------------------------

    def reject_lines(self, list_path: str, rejected: list[Rejected]) -> None:
        """Counts the list's bad lines in the summary and keeps them in the ledger for `status`."""
        assert self.ledger is not None
        self.ledger.set_rejected_lines(list_path, [(r.line, r.text, r.reason) for r in rejected])
        self.totals.rejected_lines += len(rejected)

    def submit(self, source: Source) -> str:
        """Record a source and queue what is missing of it; returns 'queued' or its final state."""
        assert self.ledger is not None
        row = self.ledger.add_url(source.url, source.video_id, source.list_path)
        if row.state == "running" or source.url in self._queued_urls:
            return "queued"
        if row.state == "failed" and not row.retryable and not self.settings.run.retry_failed:
            logger.warning(f"{source.url}: failed earlier, not retried ({row.error}); use --retry-failed")
            return self._conclude(source.url, "failed", row.error, retryable=False, update=False)
        clip_path = clip_file_path(self.paths.clip_dir, source.video_id)
        try:
            clip_file = read_clip_file(clip_path)
        except FileNotFoundError:
            return self._conclude(source.url, "skipped", f"no clip file {clip_path}")
        except (OSError, UnicodeDecodeError) as exc:
            return self._conclude(source.url, "failed", f"cannot read clip file {clip_path}: {exc}")
        for problem in clip_file.problems:
            logger.warning(problem)
            self.on_event("problem", {"message": problem})
        if not clip_file.clips:
            return self._conclude(source.url, "skipped", f"clip file {clip_path} has no valid clip line")
        finished = self._finished_clips(source.video_id)
        missing = [clip for clip in clip_file.clips if clip not in finished]
        if not missing:
            return self._conclude(source.url, "done", None)
        if finished:
            logger.info(f"{source.video_id}: {len(finished)} clip(s) already made, {len(missing)} to make")
        if row.state == "failed":
            self.ledger.reset_crashes(source.url)
        self.ledger.set_pending(source.url)
        self._queued_urls.add(source.url)
        self.queue.append(
            Task(
                url=source.url,
                video_id=source.video_id,
                clips=tuple((c.start_frame, c.end_frame) for c in missing),
                local=source.is_local,
            )
        )
        self.on_event("queued", {"url": source.url})
        # The first worker starts (a few seconds of imports) while the rest of the list is read.
        self._start_due_workers()
        return "queued"

    def _finished_clips(self, video_id: str) -> set[Clip]:
        """Clips already made (and still on disk) or known to be impossible for this source."""
        assert self.ledger is not None
        finished: set[Clip] = set()
        for row in self.ledger.clips(video_id):
            if row.state == "failed" or (row.path and Path(row.path).is_file()):
                finished.add(Clip(row.start_frame, row.end_frame))
        return finished

    def _conclude(
        self,
        url: str,
        state: str,
        error: str | None,
        retryable: bool = False,
        update: bool = True,
        download_seconds: float | None = None,
        process_seconds: float | None = None,
    ) -> str:
        assert self.ledger is not None
        if update:
            self.ledger.finish(
                url,
                state,
                error=error,
                retryable=retryable,
                download_seconds=download_seconds,
                process_seconds=process_seconds,
            )
        if state == "skipped" and error:
            logger.warning(f"{url}: skipped: {error}")
        elif state == "failed" and update:
            logger.error(f"{url}: failed: {error}")
        self.outcomes[url] = state
        self.totals.urls[state] += 1
        self.on_event(
            "url",
            {
                "url": url,
                "state": state,
                "error": error,
                "download_seconds": download_seconds,
                "process_seconds": process_seconds,
            },
        )
        return state

    # --- workers ------------------------------------------------------------------------------

    def _worker_paths(self, index: int) -> WorkerPaths:
        return WorkerPaths(
            output_dir=str(self.paths.output_dir),
            temp_dir=str(self.paths.worker_temp(index)),
            log_dir=str(self.paths.log_dir),
        )

    def _start_worker(self, index: int) -> None:
        assert self.launcher is not None
        link = self.launcher.start(index, self.settings, self._worker_paths(index))
        self.workers[index] = _WorkerHandle(index=index, link=link)

    def _start_due_workers(self) -> None:
        if self.draining:
            return
        elapsed = time.monotonic() - self._started_at
        for index in range(self.settings.run.workers):
            if index in self.workers:
                continue
            # Staggered starts keep workers from hitting the same site at the same moment.
            if elapsed >= index * self.settings.run.start_delay and (self.queue or index == 0):
                self._start_worker(index)

    def _assign(self, handle: _WorkerHandle) -> None:
        assert self.ledger is not None
        if not handle.link.alive():
            return  # its death is handled by `step`, with no URL charged to it
        if self.draining:
            self._send_stop(handle)
            return
        # A worker asking for work while disk space is low waits idle; `step` asks again later.
        if not self.queue or self.disk.blocked():
            handle.idle = True
            return
        task = self.queue.popleft()
        self._queued_urls.discard(task.url)
        handle.task, handle.idle, handle.phase = task, False, "queued"
        handle.last_progress, handle.announced_wait = time.monotonic(), 0.0
        self.ledger.mark_running(task.url, handle.index, handle.node)
        handle.link.send(Assign(task))

    def _send_stop(self, handle: _WorkerHandle) -> None:
        if handle.stop_sent:
            return
        handle.stop_sent = True
        handle.link.send(Stop())

    def _handle_message(self, handle: _WorkerHandle, message: FromWorker) -> None:
        assert self.ledger is not None
        # Every message is a sign of life; a heartbeat may announce a deliberate wait.
        handle.last_progress = time.monotonic()
        handle.announced_wait = message.waiting_seconds if isinstance(message, Heartbeat) else 0.0
        match message:
            case Heartbeat():
                pass
            case Ready(node=node):
                handle.ready_seen = True
                handle.node = node or handle.node
                self._startup_deaths = 0
                handle.task = None
                self._assign(handle)
            case PhaseChanged(url=url, phase=phase):
                handle.phase = phase
                self.ledger.set_phase(url, phase)
                self.on_event("stage", {"worker": handle.index, "url": url, "stage": phase})
            case FramesEncoded(count=count):
                # Live progress only: the summary counts the frames of clips written, when they are.
                self.on_event("frames", {"count": count})
            case SourceProbed():
                meta = SourceMeta(message.codec, message.width, message.height, message.fps)
                self.ledger.set_source(message.url, meta)
            case ClipFinished():
                self._record_clip(handle, message)
            case UrlFinished():
                self._finish_task(handle, message)

    def _record_clip(self, handle: _WorkerHandle, message: ClipFinished) -> None:
        assert self.ledger is not None
        result, output = message.result, message.output
        video_id = handle.task.video_id if handle.task else "?"
        state = "failed" if result.error else "done"
        self.ledger.record_clip(
            video_id,
            message.url,
            result.start_frame,
            result.end_frame,
            state,
            path=result.path,
            frames=result.frames,
            size=result.bytes,
            error=result.error,
            sha256=message.sha256,
            width=output.width if output else None,
            height=output.height if output else None,
            fps=output.fps if output else None,
        )
        if state == "done":
            self.totals.clips_written += 1
            self.totals.frames += result.frames
            self.totals.bytes += result.bytes
        else:
            self.totals.clips_failed += 1
            logger.warning(result.error)
        self.on_event("clip", {"url": message.url, **asdict(result)})

    def _finish_task(self, handle: _WorkerHandle, message: UrlFinished) -> None:
        url = message.url
        handle.task = None
        if message.state == "interrupted":
            assert self.ledger is not None
            self.ledger.set_pending(url)
            logger.info(f"{url}: stopped early; its remaining clips stay pending")
            self.on_event("url", {"url": url, "state": "pending", "error": None})
            return
        self._conclude(
            url,
            message.state,
            message.error,
            retryable=message.retryable,
            download_seconds=message.download_seconds,
            process_seconds=message.process_seconds,
        )

    def _handle_death(self, handle: _WorkerHandle) -> None:
        assert self.ledger is not None
        del self.workers[handle.index]
        how = handle.link.death()
        handle.link.close()
        shutil.rmtree(self.paths.worker_temp(handle.index), ignore_errors=True)
        task = handle.task
        if task is not None:
            for part in (self.paths.output_dir / task.video_id).glob(f"*{PART_SUFFIX}"):
                part.unlink(missing_ok=True)
            crashes = self.ledger.record_crash(task.url)
            if crashes >= CRASH_LIMIT:
                reason = (
                    handle.stalled or f"worker died {crashes} times while processing this URL (last: {how})"
                )
                self._conclude(task.url, "failed", reason, retryable=False)
            elif self.urgent:
                self.ledger.set_pending(task.url)
            else:
                what = handle.stalled or f"died ({how})"
                logger.warning(f"worker {handle.index} {what} on {task.url}; the URL goes back in the queue")
                self.ledger.set_pending(task.url)
                self.queue.appendleft(task)
                self._queued_urls.add(task.url)
        elif not handle.stop_sent:
            when = "while idle" if handle.ready_seen else "at start-up"
            logger.warning(f"worker {handle.index} died ({how}) {when}")
        if not handle.ready_seen and not handle.stop_sent:
            self._startup_deaths += 1
            if self._startup_deaths >= STARTUP_DEATH_LIMIT and self.fatal is None:
                log = self.paths.log_dir / f"worker-{handle.index}.log"
                self.fatal = (
                    f"workers died {self._startup_deaths} times in a row before they were ready "
                    f"(last: worker {handle.index}, {how}); its reason is on stderr above and in {log} "
                    "when that can be written; unfinished URLs stay pending"
                )
                logger.error(self.fatal)
                self.request_stop(urgent=True)
        if not self.draining and not handle.stop_sent:
            self.on_event("restart", {"worker": handle.index})
            self._start_worker(handle.index)

    # --- the loop -----------------------------------------------------------------------------

    def step(self, timeout: float = 0.5) -> None:
        """Start due workers, then handle whatever the workers said within `timeout` seconds."""
        self._start_due_workers()
        if self.draining:
            for handle in self.workers.values():
                self._send_stop(handle)
            if (
                not self.urgent
                and self._drain_deadline is not None
                and time.monotonic() > self._drain_deadline
            ):
                logger.warning("grace period over: stopping workers now")
                self.urgent = True
            if self.urgent:
                self._stop_all_workers(force=True)
                return
        for handle in list(self.workers.values()):
            if handle.idle and self.queue and not self.draining:
                self._assign(handle)
        if not self.workers:
            time.sleep(min(timeout, 0.1))
            return
        assert self.launcher is not None
        self.launcher.wait([h.link for h in self.workers.values()], timeout, self.wake_fds)
        dead: list[_WorkerHandle] = []
        for handle in list(self.workers.values()):
            self._receive(handle)
            if not handle.link.alive():
                dead.append(handle)
        for handle in dead:
            handle.link.join(timeout=5)
            self._receive(handle)  # a result sent just before exiting still counts
            self._handle_death(handle)
        # Last, once every message that arrived has been read: a long pause of the supervisor
        # itself (a huge list being queued) must not make its workers look stalled.
        self._kill_stalled()

    def _kill_stalled(self) -> None:
        """Defence in depth: a worker with work and no sign of life for run.stall_seconds is killed.

        Its death is then handled like a crash (the URL is retried once, then failed), with the
        stall as the reason."""
        limit = self.settings.run.stall_seconds
        if not limit:
            return
        now = time.monotonic()
        for handle in self.workers.values():
            if handle.task is None or handle.stalled or not handle.link.alive():
                continue
            if now - handle.last_progress <= limit + handle.announced_wait:
                continue
            handle.stalled = f"stalled: no progress for {limit:g} s in {handle.phase}"
            logger.error(f"worker {handle.index} {handle.stalled} on {handle.task.url}; killing it")
            handle.link.kill()

    def _receive(self, handle: _WorkerHandle) -> None:
        for message in handle.link.receive():
            self._handle_message(handle, message)

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(h.task is not None for h in self.workers.values())

    def request_stop(self, urgent: bool = False) -> None:
        """First call: finish in-flight clips within the grace period. Second: stop now.

        Only sets flags (it runs inside signal handlers); `step` acts on them.
        """
        if urgent or self.draining:
            self.urgent = True
            self.draining = True
            return
        self.draining = True
        self._drain_deadline = time.monotonic() + self.settings.run.grace_seconds
        logger.info(
            f"stopping: no new URLs; in-flight clips get up to {self.settings.run.grace_seconds:g}s to finish"
        )

    def run_until_idle(self, should_continue: Callable[[], bool] = lambda: True) -> None:
        while should_continue() and (self.busy or (self.draining and self.workers)):
            if self.draining and not self.workers:
                break
            self.step()
        self._stop_all_workers(force=False)

    def _stop_all_workers(self, force: bool) -> None:
        for handle in list(self.workers.values()):
            if force:
                handle.link.stop_now()
            else:
                self._send_stop(handle)
        deadline = time.monotonic() + (10 if not force else 5)
        for handle in list(self.workers.values()):
            handle.link.join(timeout=max(0.1, deadline - time.monotonic()))
            if handle.link.alive():
                handle.link.kill()
                handle.link.join(timeout=5)
            self._receive(handle)
            if handle.task is not None and self.ledger is not None:
                self.ledger.set_pending(handle.task.url)
            handle.link.close()
            shutil.rmtree(self.paths.worker_temp(handle.index), ignore_errors=True)
        self.workers.clear()


def install_signal_handlers(supervisor: Supervisor) -> None:
    """SIGTERM, SIGINT and SIGHUP (a closed terminal or SSH session) stop the run the same way: in-flight
    clips finish, then the workers stop and their downloads are removed. A second signal stops at once."""
    import os

    # Known now: once the terminal hangs up, isatty() on it fails too.
    terminal_fds = [fd for fd in (1, 2) if os.isatty(fd)]

    def detach_hung_up_terminal() -> None:
        # Writes to a hung-up terminal fail (EIO): what was the terminal goes to /dev/null from here
        # on, so the stop goes on quietly and the log file still gets every line.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            for fd in terminal_fds:
                os.dup2(devnull, fd)
        finally:
            os.close(devnull)

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            detach_hung_up_terminal()
        if supervisor.draining:
            logger.warning(f"{name} again: stopping at once")
            supervisor.request_stop(urgent=True)
        else:
            logger.warning(f"{name}: finishing in-flight clips, then stopping (send again to stop at once)")
            supervisor.request_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGHUP, handler)


def start_launcher(settings: Settings) -> Launcher:
    """Local worker processes, or Ray actors on the cluster run.ray_address names."""
    if settings.run.backend == "ray":
        from daemon.ray_links import RayLauncher

        return RayLauncher(settings)
    return ProcessLauncher()
