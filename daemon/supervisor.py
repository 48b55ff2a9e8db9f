"""The supervisor: hands URLs to workers on request, replaces workers that die, and is the only
writer of the ledger.

It is the fleet (start, stagger, assign, deaths, stalls); what it hands out comes from planning
(daemon.planning), what workers report goes to recording (daemon.recording), and what follows a
failure is the failure policy's (daemon.policy).
"""

from __future__ import annotations

import heapq
import itertools
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.config import Settings
from daemon.diskspace import DiskGate, Floor, hold_for
from daemon.encode import remove_partial_files
from daemon.failures import Failure, Kind, Scope, site_blocked
from daemon.folders import LOCK_NAME, PART_SUFFIX, RunPaths
from daemon.ledger import Ledger, LedgerError
from daemon.links import Launcher, ProcessLauncher, WorkerLink
from daemon.locking import AlreadyLocked, FolderLocks
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
from daemon.planning import Planned, Planner
from daemon.policy import FailurePolicy, GiveUp, RetryLater, WaitFor, worst
from daemon.recording import EventSink, Recorder, Totals
from daemon.sites import SiteBreakers, site_of
from daemon.urls import Rejected, Source

CRASH_LIMIT = 2
# Workers that die before they ever ask for work, one after another: the cause is the machine or
# the settings (a log file that cannot be opened, a broken install), and restarting cannot help.
STARTUP_DEATH_LIMIT = 3

__all__ = ["AlreadyRunning", "Supervisor", "Totals", "install_signal_handlers", "lock_run"]


class AlreadyRunning(Exception):
    pass


def lock_run(paths: RunPaths, who: str) -> FolderLocks:
    """The output folder's lock (and the state folder's, where that is elsewhere), held by one run
    or service at a time whatever run.state_dir says. Raises AlreadyRunning naming the holder."""
    paths.output_dir.mkdir(parents=True, exist_ok=True)
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        return FolderLocks([paths.output_dir, paths.state_dir], LOCK_NAME, who)
    except AlreadyLocked as exc:
        raise AlreadyRunning(str(exc)) from None


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
    # The task's clips settled in this try (made, or impossible), and those that failed for a
    # passing reason: what is left of the task if it has to be tried again.
    settled: set[tuple[int, int]] = field(default_factory=set)
    clip_failures: list[Failure] = field(default_factory=list)


class Supervisor:
    """Single writer of the ledger. Feed it sources with `submit`, then drive it with `step`."""

    def __init__(
        self,
        settings: Settings,
        paths: RunPaths,
        on_event: EventSink | None = None,
        lock: FolderLocks | None = None,
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.on_event: EventSink = on_event or (lambda kind, data: None)
        self.queue: deque[Task] = deque()
        self._queued_urls: set[str] = set()  # the queue's URLs, for duplicate checks in constant time
        # URLs to try again after a transient failure: (when, order, task), soonest first.
        self.delayed: list[tuple[float, int, Task]] = []
        self._order = itertools.count()
        self.workers: dict[int, _WorkerHandle] = {}
        self.draining = False
        self.urgent = False
        self._drain_deadline: float | None = None
        self._lock = lock
        self._started_at = time.monotonic()
        self.launcher: Launcher | None = None  # started by `open`
        self.ledger: Ledger | None = None
        self.planner: Planner | None = None
        self.recorder: Recorder | None = None
        self.policy = FailurePolicy(settings.run)
        service = settings.service
        self.disk = DiskGate(
            [
                Floor("temp", paths.temp_root, service.min_free_temp_mb),
                Floor("output", paths.output_dir, service.min_free_output_mb),
            ],
            service.disk_check_seconds,
        )
        self._disk_said: str | None = None  # the disk condition the ledger shows now
        # Sites that block us pause for every worker at once; URLs of a paused or paced site wait
        # here (in queue order, per site) while other sites' URLs and local files go on.
        self.sites = SiteBreakers(settings.download)
        self.parked: dict[str, deque[Task]] = {}
        self._sites_said: set[str] = set()  # the site conditions the ledger shows now
        self._site_rows: dict[str, tuple[str, float]] = {}
        self._block_waited: set[str] = set()  # URLs that waited on a block in this run
        # A run gives up on a block past download.block_give_up_hours (its URLs stay pending);
        # the service keeps waiting.
        self.give_up_on_blocks = True
        self._gave_up_said = False
        # Extra file descriptors that end `step`'s wait early (the service's inbox and signal pipe).
        self.wake_fds: list[int] = []
        self._startup_deaths = 0
        # Set when the run cannot go on (workers keep dying at start-up, the ledger cannot be
        # written): the reason, in one line.
        self.fatal: str | None = None

    @property
    def totals(self) -> Totals:
        return self.recorder.totals if self.recorder else Totals()

    @property
    def outcomes(self) -> dict[str, str]:
        return self.recorder.outcomes if self.recorder else {}

    # --- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the folders, open the ledger, clean what a killed run left; raises AlreadyRunning
        or LedgerError (the ledger cannot be created or written: one line naming it)."""
        if self._lock is None:
            self._lock = lock_run(self.paths, "run")
        self.ledger = Ledger(self.paths.ledger)
        self.planner = Planner(self.ledger, self.paths.clip_dir, self.settings.run.retry_failed)
        self.recorder = Recorder(self.ledger, self.on_event)
        recovered = self.ledger.recover_interrupted()
        if recovered:
            logger.info(f"{recovered} URL(s) interrupted by an earlier run are pending again")
        removed = remove_partial_files(self.paths.output_dir)
        if removed:
            logger.info(f"removed {removed} unfinished .part file(s) left by an earlier run")
        shutil.rmtree(self.paths.temp_root, ignore_errors=True)
        self.paths.temp_root.mkdir(parents=True, exist_ok=True)
        self.launcher = start_launcher(self.settings)
        self._say_js_runtime()

    def _say_js_runtime(self) -> None:
        """Once per run: which JavaScript runtime yt-dlp will use for YouTube, or how to get one."""
        from daemon.download import js_runtime_line

        try:
            found, line = js_runtime_line(self.settings.download)
        except ImportError:
            return  # a light install without yt-dlp downloads nothing
        if found:
            logger.info(line)
        else:
            logger.warning(line)

    def close(self) -> None:
        self._stop_all_workers(force=True)
        if self.launcher is not None:
            self.launcher.close()
        shutil.rmtree(self.paths.temp_root, ignore_errors=True)
        if self.ledger is not None:
            self.ledger.close()
        if self._lock is not None:
            self._lock.close()

    def _ledger_failed(self, exc: LedgerError) -> None:
        """The ledger cannot be written: stop at once, before anything is done that it cannot record.
        What is in flight stays pending in the ledger as it last was; the next run resumes it."""
        if self.fatal is None:
            self.fatal = f"{exc}; stopping: URLs in flight stay pending for the next run"
            logger.error(self.fatal)
        self.request_stop(urgent=True)

    # --- planning -----------------------------------------------------------------------------

    def reject_lines(self, list_path: str, rejected: list[Rejected]) -> None:
        """Counts the list's bad lines in the summary and keeps them in the ledger for `status`."""
        assert self.ledger is not None and self.recorder is not None
        try:
            self.ledger.set_rejected_lines(list_path, [(r.line, r.text, r.reason) for r in rejected])
        except LedgerError as exc:
            self._ledger_failed(exc)
        self.recorder.totals.rejected_lines += len(rejected)

    def submit(self, source: Source) -> str:
        """Record a source and queue what is missing of it; returns 'queued' or its final state."""
        if self.fatal is not None:
            return "pending"
        try:
            return self._submit(source)
        except LedgerError as exc:
            self._ledger_failed(exc)
            return "pending"

    def _submit(self, source: Source) -> str:
        assert self.ledger is not None and self.planner is not None and self.recorder is not None
        row = self.ledger.url(source.url)
        if (row is not None and row.state == "running") or source.url in self._queued_urls:
            return "queued"
        if any(task.url == source.url for _, _, task in self.delayed):
            return "queued"
        plan = self.planner.plan(source)
        for problem in plan.problems:
            logger.warning(problem)
            self.on_event("problem", {"message": problem})
        self.recorder.totals.rejected_clip_lines += plan.rejected_lines
        if not isinstance(plan, Planned):
            return self.recorder.conclude(
                source.url, plan.state, plan.error, retryable=plan.retryable, update=not plan.recorded
            )
        self._queue(plan.task)
        self.on_event("queued", {"url": source.url})
        # The first worker starts (a few seconds of imports) while the rest of the list is read.
        self._start_due_workers()
        return "queued"

    def _queue(self, task: Task, first: bool = False) -> None:
        self._queued_urls.add(task.url)
        if first:
            self.queue.appendleft(task)
        else:
            self.queue.append(task)

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
        task = None if self.disk.blocked() else self._next_task(time.monotonic())
        if task is None:
            handle.idle = True
            return
        self._queued_urls.discard(task.url)
        handle.task, handle.idle, handle.phase = task, False, "queued"
        handle.settled, handle.clip_failures = set(), []
        handle.last_progress, handle.announced_wait = time.monotonic(), 0.0
        self.ledger.mark_running(task.url, handle.index, handle.node)
        handle.link.send(Assign(task))

    def _next_task(self, now: float) -> Task | None:
        """The next URL a worker may start: the oldest one whose site is neither paused (but for
        its one probe) nor paced; URLs passed over wait in `parked`, in order, for their site."""
        for site, tasks in list(self.parked.items()):
            if not tasks:
                del self.parked[site]
            elif self.sites.take_start(site, now):
                task = tasks.popleft()
                if not tasks:
                    del self.parked[site]
                return task
        while self.queue:
            task = self.queue.popleft()
            site = "" if task.local else site_of(task.url)
            if site in self.parked:  # behind the site's earlier URLs
                self.parked[site].append(task)
            elif self.sites.take_start(site, now):
                return task
            else:
                self.parked.setdefault(site, deque()).append(task)
        return None

    @property
    def _waiting(self) -> bool:
        return bool(self.queue) or any(self.parked.values())

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
                assert self.recorder is not None
                self.recorder.source(message)
            case ClipFinished():
                self._record_clip(handle, message)
            case UrlFinished():
                self._finish_task(handle, message)

    def _record_clip(self, handle: _WorkerHandle, message: ClipFinished) -> None:
        assert self.recorder is not None
        self.recorder.clip(message)
        failure = message.result.failure
        clip = (message.result.start_frame, message.result.end_frame)
        if failure is None or failure.permanent:
            handle.settled.add(clip)
        else:
            handle.clip_failures.append(failure)

    def _finish_task(self, handle: _WorkerHandle, message: UrlFinished) -> None:
        assert self.ledger is not None and self.recorder is not None
        url, task = message.url, handle.task
        handle.task = None
        self.recorder.say_unlisted_clip_failures(url)
        if task is None:
            return
        left = tuple(clip for clip in task.clips if clip not in handle.settled)
        failure = message.failure if message.state == "failed" else worst(handle.clip_failures)
        site = "" if task.local else site_of(url)
        if failure is not None and failure.http_status == 403 and self.sites.forbidden(site, url):
            failure = site_blocked(site, f"HTTP 403 from several of {site}'s URLs in a row: {failure.reason}")
        if failure is None or failure.permanent:
            self._site_answered(site)  # it answered (a removed video is an answer too)
        elif failure.scope is not Scope.SITE:
            self.sites.probe_lost(site)  # no answer either way: another URL may probe
        if message.state == "interrupted" and left and failure is None:
            self.ledger.set_pending(url)
            logger.info(f"{url}: stopped early; {len(left)} of its clips stay pending")
            self.on_event("url", {"url": url, "state": "pending", "error": None})
            return
        if failure is None:
            self.recorder.conclude(
                url,
                "done",
                None,
                download_seconds=message.download_seconds,
                process_seconds=message.process_seconds,
            )
            return
        attempts = self.ledger.charge_failed_try(url, failure.reason) if failure.kind is Kind.TRANSIENT else 0
        remaining = Task(task.url, task.video_id, left or task.clips, task.local)
        match self.policy.decide(failure, attempts):
            case WaitFor(failure=condition) if condition.scope is Scope.SITE:
                self.ledger.set_pending(url)
                self._queue(remaining, first=True)
                self._block_site(condition, url)
                self.on_event("url", {"url": url, "state": "pending", "error": condition.reason})
            case WaitFor(failure=condition):
                self._hold(condition)
                self.ledger.set_pending(url)
                self._queue(remaining, first=True)
                logger.warning(f"{url}: waits ({condition.reason}); nothing charged")
                self.on_event("url", {"url": url, "state": "pending", "error": condition.reason})
            case RetryLater(delay_seconds=delay):
                self.ledger.set_pending(url)
                heapq.heappush(self.delayed, (time.monotonic() + delay, next(self._order), remaining))
                self.recorder.totals.url_retries += 1
                budget = self.policy.budget(failure)
                logger.warning(
                    f"{url}: {failure.reason}; try {attempts} of {budget} failed, tried again in {delay:.0f}s"
                )
                self.on_event("url", {"url": url, "state": "pending", "error": failure.reason})
            case GiveUp(reason=reason, retryable=retryable):
                self.recorder.conclude(url, "failed", reason, retryable=retryable)

    def _hold(self, condition: Failure) -> None:
        """A condition of a folder (its disk is full): nothing is handed out until it clears."""
        if condition.scope is Scope.DISK and condition.where:
            self.disk.hold(hold_for(Path(condition.where), condition.reason))
            self.disk.blocked()  # says so now, once

    def _urls_of(self, site: str) -> int:
        """URLs of `site` waiting to start (a count over the queue: said when a block opens)."""
        queued = sum(1 for task in self.queue if not task.local and site_of(task.url) == site)
        return queued + len(self.parked.get(site, ()))

    def _block_site(self, condition: Failure, url: str) -> None:
        """A site refuses us: none of its URLs is handed out until the wait is over, then one probe."""
        assert self.recorder is not None
        site = condition.where
        now = time.monotonic()
        opened = self.sites.block(site, condition.reason, condition.retry_after_seconds, now)
        self.sites.held(site, url)
        self._block_waited.add(url)
        self.recorder.totals.urls_waited_on_blocks = len(self._block_waited)
        if opened.new:
            logger.warning(
                f"site {site} blocks us ({condition.reason}); all its URLs pause, next try in "
                f"{opened.wait_seconds:.0f}s; {self._urls_of(site)} URL(s) wait"
            )
            self.on_event("site", {"site": site, "state": "blocked", "reason": condition.reason})
        else:
            logger.info(f"site {site} still blocks us ({url}); next try in {opened.wait_seconds:.0f}s")

    def _site_answered(self, site: str) -> None:
        """A URL of `site` ended without a block: a paused site's breaker closes."""
        blocked = self.sites.succeeded(site, time.monotonic())
        if blocked is not None:
            seconds, waited = blocked
            logger.warning(
                f"site {site} answers again after {seconds:.0f}s blocked; its {self._urls_of(site)} "
                f"waiting URL(s) go on ({waited} waited on the block)"
            )
            self.on_event("site", {"site": site, "state": "open"})

    def _give_up_on_long_blocks(self) -> None:
        limit_seconds = self.settings.download.block_give_up_hours * 3600
        now = time.monotonic()
        for site, (reason, opened_at, _) in self.sites.paused().items():
            if now - opened_at < limit_seconds or self._gave_up_said:
                continue
            self._gave_up_said = True
            hours = self.settings.download.block_give_up_hours
            if not self.give_up_on_blocks:
                logger.error(f"site {site} has blocked us for over {hours:g} h ({reason}); still waiting")
                continue
            if self.fatal is None:
                self.fatal = (
                    f"site {site} has blocked us for over {hours:g} h (download.block_give_up_hours; "
                    f"{reason}); stopping: its URLs stay pending for the next run"
                )
                logger.error(self.fatal)
            self.request_stop()

    def _show_conditions(self) -> None:
        """Keeps the ledger's account of what the run waits for in step with the disk gate and the
        site breakers, for `status`."""
        assert self.ledger is not None
        self._show_sites()
        reason = self.disk.reason
        if reason == self._disk_said:
            return
        if reason is None:
            self.ledger.clear_condition("disk")
        else:
            next_look = time.time() + self.disk.recheck_seconds
            self.ledger.set_condition("disk", "space", reason, next_look, len(self.queue))
        self._disk_said = reason

    def _show_sites(self) -> None:
        assert self.ledger is not None
        paused = self.sites.paused()
        for site in self._sites_said - paused.keys():
            self.ledger.clear_condition("site", site)
        now, wall = time.monotonic(), time.time()
        for site, (reason, _, reopen_at) in paused.items():
            key = (site, reopen_at)
            if site in self._sites_said and self._site_rows.get(site) == key:
                continue
            waiting = len(self.parked.get(site, ()))
            self.ledger.set_condition("site", site, reason, wall + max(0.0, reopen_at - now), waiting)
            self._site_rows[site] = key
        self._sites_said = set(paused)

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
            if not task.local:
                self.sites.probe_lost(site_of(task.url))
            crashes = self.ledger.record_crash(task.url)
            if crashes >= CRASH_LIMIT:
                reason = (
                    handle.stalled or f"worker died {crashes} times while processing this URL (last: {how})"
                )
                assert self.recorder is not None
                self.recorder.conclude(task.url, "failed", reason, retryable=False)
            elif self.urgent:
                self.ledger.set_pending(task.url)
            else:
                what = handle.stalled or f"died ({how})"
                logger.warning(f"worker {handle.index} {what} on {task.url}; the URL goes back in the queue")
                self.ledger.set_pending(task.url)
                self._queue(task, first=True)
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
        try:
            self._step(timeout)
        except LedgerError as exc:
            self._ledger_failed(exc)
            self._stop_all_workers(force=True)

    def _step(self, timeout: float) -> None:
        self._release_delayed()
        self._give_up_on_long_blocks()
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
            if handle.idle and self._waiting and not self.draining:
                self._assign(handle)
        self._show_conditions()
        if not self.workers:
            time.sleep(min(timeout, 0.1))
            return
        if self.parked and any(h.idle for h in self.workers.values()):
            # An idle worker waits for a paced or paused site: wake when the next may start.
            soonest = min(self.sites.next_start(site) for site in self.parked)
            timeout = min(timeout, max(0.01, soonest - time.monotonic()))
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

    def _release_delayed(self) -> None:
        """URLs whose retry delay is over go to the back of the queue."""
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            _, _, task = heapq.heappop(self.delayed)
            self._queue(task)

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
        return self._waiting or bool(self.delayed) or any(h.task is not None for h in self.workers.values())

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
            try:
                self._receive(handle)
                if handle.task is not None and self.ledger is not None:
                    self.ledger.set_pending(handle.task.url)
            except LedgerError as exc:
                self._ledger_failed(exc)  # the next run finds the URL 'running' and resumes it
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
